"""Repository hygiene checks run by `make test` before the notebooks execute.

    python tests/check_repo.py clean [--strict]  # notebooks committed in their clean form (see below)
    python tests/check_repo.py strip [NB ...]    # write that form (`make clean-nbs`)
    python tests/check_repo.py export            # lexvla/ equals what nbdev_export writes from nbs/

Two kinds of notebook. *Library* notebooks (a `#| default_exp` or `#| export` cell, or settings.ini's `readme_nb`)
are committed with the outputs of one fresh top-to-bottom run (`make run-nbs`, tests/run_nbs.py): outputs and
execution counts kept, counts 1, 2, 3, ... in cell order, no errors. *Experiment* notebooks (papermill, with a
`parameters`-tagged cell) are committed without outputs or counts. Both keep only the `tags` cell metadata.
Until every library notebook has been run once, a library notebook may also be committed without any outputs;
`REQUIRE_EXECUTED = True` (or `clean --strict`) makes a run compulsory. No committed output prints a float with more
than `MAX_SIGNIFICANT` significant digits (`0.10000000149011612` is float32 noise, not a result): round what is shown.

Every check exits non-zero and names each offending file.
"""
from __future__ import annotations

import configparser
import copy
import filecmp
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

REQUIRE_EXECUTED = True      # library notebooks must carry the outputs of one top-to-bottom run (`make run-nbs`)
WARN_BYTES = 1_000_000       # a library notebook above this size is reported
MAX_BYTES = 2_000_000        # ... and above this one fails the check (keep the repository small)
MAX_SIGNIFICANT = 6          # digits a float printed in a committed output may carry (leading and trailing zeros not counted)

Notebook = dict[str, Any]
_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+):?\s*(.*)$")


def _notebooks(folder: Path) -> list[Path]:
    "Every notebook under `folder` (library notebooks live in nbs/lib/), none in hidden or `_` folders."
    return sorted(p for p in folder.rglob("*.ipynb")
                  if not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts))


def _settings(root: Path) -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(root / "settings.ini")
    return cfg["DEFAULT"]


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _directives(cell: dict) -> dict[str, str]:
    "The cell's leading `#| name: value` lines (nbdev's syntax)."
    out = {}
    for line in _source(cell).splitlines():
        if not line.strip(): continue
        m = _DIRECTIVE.match(line)
        if not m: break
        out[m.group(1)] = m.group(2).strip()
    return out


def read_nb(path: Path) -> Notebook:
    return json.loads(path.read_text(encoding="utf-8"))


def nb_text(nb: Notebook) -> str:
    "The bytes nbformat (and so Jupyter and nbstripout) writes."
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def is_library(path: Path, nb: Notebook, root: Path = ROOT) -> bool:
    "A notebook that exports to lexvla/ (or is the README notebook): committed with outputs."
    if path.name == _settings(root).get("readme_nb", "index.ipynb"): return True
    return any(k in ("default_exp", "export", "exports") for c in nb["cells"] if c["cell_type"] == "code"
               for k in _directives(c))


HARDWARE_FLAGS = ("cuda",)   # tst_flags whose cells need hardware a reader may lack; `#| slow` cells do run


def skipped(cell: dict, root: Path = ROOT) -> bool:
    """Cells a committed run leaves out: `#| eval: false`, and cells flagged for hardware (`#| cuda`). A reader's
    "run all" runs `#| slow` cells, so run-nbs does too (nbdev_test skips them, to keep CI short)."""
    d = _directives(cell)
    return d.get("eval", "").lower() == "false" or bool(set(HARDWARE_FLAGS) & d.keys())


def normalise(nb: Notebook, library: bool, root: Path = ROOT) -> Notebook:
    """The committed form: nbdev_clean's rules (metadata other than settings.ini's allowed keys removed, memory
    addresses removed from text outputs), then outputs and counts stripped (experiment) or kept (library)."""
    from nbdev.clean import clean_nb
    cfg = _settings(root)
    nb = copy.deepcopy(nb)
    counts = [(c.get("execution_count"), [o.get("execution_count") for o in c.get("outputs", [])]) for c in nb["cells"]]
    clean_nb(nb, False, cfg.get("allowed_metadata_keys", "").split(), cfg.get("allowed_cell_metadata_keys", "").split(),
             cfg.getboolean("clean_ids", True))
    for cell, (n, outs) in zip(nb["cells"], counts):
        if cell["cell_type"] != "code": continue
        if not library:
            cell["outputs"], cell["execution_count"] = [], None
            continue
        cell["execution_count"] = n
        for o, on in zip(cell["outputs"], outs):
            if "execution_count" in o: o["execution_count"] = on
    return nb


# A float as Python, NumPy or pandas print it: digits, a point, digits, an optional exponent; not part of a longer dotted
# token (a version `2.13.0`, an address `127.0.0.1`) nor of a word (`0.5em`, `v1.23`).
FLOAT_REPR = re.compile(r"(?<![\w.])[-+]?(\d+\.\d+)(?:[eE][-+]?\d+)?(?![\w.])")


def significant_digits(number: str) -> int:
    "Significant digits of a float as printed: the mantissa's digits without leading or trailing zeros (`9200000.0`: 2)."
    digits = re.sub(r"\D", "", re.split(r"[eE]", number)[0])
    return len(digits.strip("0"))


def long_floats(text: str, limit: int = MAX_SIGNIFICANT) -> list[str]:
    "The float reprs in `text` with more than `limit` significant digits, in order."
    return [m.group(0) for m in FLOAT_REPR.finditer(text) if significant_digits(m.group(1)) > limit]


def _output_texts(cell: dict) -> list[str]:
    "The text of a code cell's outputs: streams and every text/* form of results and displays (not images)."
    out = []
    for o in cell.get("outputs", []):
        if "text" in o: out.append(_source({"source": o["text"]}))
        out += [_source({"source": v}) for k, v in o.get("data", {}).items() if k.startswith("text/")]
    return out


def long_float_outputs(nb: Notebook, limit: int = MAX_SIGNIFICANT) -> list[str]:
    "One line per code cell whose outputs print a float with more than `limit` significant digits, with the first ones."
    out = []
    for i, cell in enumerate(nb["cells"], 1):
        if cell["cell_type"] != "code": continue
        found = list(dict.fromkeys(f for t in _output_texts(cell) for f in long_floats(t, limit)))
        if found:
            out.append(f"cell {i} (id {cell.get('id', '?')}) prints {', '.join(found[:3])}"
                       + (f" and {len(found) - 3} more" if len(found) > 3 else ""))
    return out


def _has_outputs(nb: Notebook) -> bool:
    return any(c.get("outputs") or c.get("execution_count") is not None for c in nb["cells"] if c["cell_type"] == "code")


def run_order_problem(nb: Notebook, root: Path = ROOT) -> str | None:
    "Why `nb` is not the result of one top-to-bottom run (None when it is): counts 1, 2, 3, ... in cell order, no errors."
    expected = 1
    for i, cell in enumerate(nb["cells"], 1):
        if cell["cell_type"] != "code": continue
        where = f"cell {i} (id {cell.get('id', '?')})"
        n = cell.get("execution_count")
        if n is None:
            if _source(cell).strip() and not skipped(cell, root): return f"{where} has no execution count"
            continue
        if n != expected: return f"{where} has execution count {n}, expected {expected} (run out of order or partly re-run)"
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors: return f"{where} raised {errors[0].get('ename', 'an error')}"
        expected += 1
    return None


def notebook_problems(path: Path, root: Path = ROOT, strict: bool = REQUIRE_EXECUTED) -> list[str]:
    "Everything wrong with one notebook's committed form, one line each, naming the file and what to run."
    rel, nb = path.relative_to(root), read_nb(path)
    library = is_library(path, nb, root)
    rerun = f"run `make run-nbs NBS={path.stem}`, then commit"
    out = []
    if not library and not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]):
        out.append(f"NO PARAMETERS TAG: {rel} exports nothing, so it is an experiment (papermill) notebook, and needs a "
                   "cell tagged `parameters`")
    if not library and _has_outputs(nb):
        out.append(f"NOT CLEAN: {rel} is an experiment notebook and has outputs or execution counts; "
                   "run `make clean-nbs` and commit")
    elif library and (_has_outputs(nb) or strict):
        if not _has_outputs(nb):
            out.append(f"NOT EXECUTED: {rel} has no outputs (strict rule); {rerun}")
        elif problem := run_order_problem(nb, root):
            out.append(f"NOT RUN IN ORDER: {rel}: {problem}; {rerun}")
        text, size = path.read_text(encoding="utf-8"), path.stat().st_size
        if str(root) in text:
            out.append(f"MACHINE-SPECIFIC: {rel} has this checkout's absolute path {root} in its outputs; "
                       f"print paths relative to nbs/, then {rerun}")
        if size > MAX_BYTES:
            out.append(f"TOO LARGE: {rel} is {size / 1e6:.1f} MB (limit {MAX_BYTES / 1e6:.1f} MB); "
                       f"make its outputs smaller (fewer rows, smaller figures), then {rerun}")
        elif size > WARN_BYTES:
            print(f"warning: {rel} is {size / 1e6:.1f} MB with its outputs", file=sys.stderr)
        out += [f"LONG FLOAT: {rel}: {where} (more than {MAX_SIGNIFICANT} significant digits); round what the cell shows "
                f"(round(x, 4), f'{{x:.4g}}'), then {rerun}" for where in long_float_outputs(nb)]
    if not out and nb_text(normalise(nb, library, root)) != path.read_text(encoding="utf-8"):
        out.append(f"NOT CLEAN: {rel} has stray metadata (only cell `tags` are kept) or is not in nbformat's layout; "
                   "run `make clean-nbs` and commit")
    return out


def check_clean(root: Path = ROOT, strict: bool = REQUIRE_EXECUTED) -> int:
    nbs = _notebooks(root / "nbs")
    problems = [p for nb in nbs for p in notebook_problems(nb, root, strict)]
    for p in problems: print(p, file=sys.stderr)
    print(f"check-clean: {len(nbs)} notebooks, {len(problems)} problem(s)" + (" (strict)" if strict else ""))
    return 1 if problems else 0


def strip(paths: list[Path], root: Path = ROOT) -> int:
    "Write the committed form of each notebook (`make clean-nbs`): experiment notebooks stripped, library ones cleaned."
    for path in paths:
        nb = read_nb(path)
        text = nb_text(normalise(nb, is_library(path, nb, root), root))
        if text != path.read_text(encoding="utf-8"):
            path.write_text(text, encoding="utf-8")
            print(f"cleaned {path.relative_to(root)}")
    return 0


def check_export() -> int:
    """Export nbs/ into lexvla/ and report every file that changed (or appeared/disappeared)."""
    lib = ROOT / "lexvla"
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "lexvla"
        shutil.copytree(lib, before, ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([BIN / "nbdev_export"], cwd=ROOT, check=True)
        cmp = filecmp.dircmp(before, lib, ignore=["__pycache__"])
        changed = _diff_files(cmp, Path("lexvla"))
    for f in changed:
        print(f"OUT OF SYNC: {f} differs from what nbdev_export writes from nbs/; "
              "edit the notebook, run `make export` and commit", file=sys.stderr)
    print(f"check-export: {len(changed)} file(s) out of sync")
    return 1 if changed else 0


def _diff_files(cmp: filecmp.dircmp, prefix: Path) -> list[str]:
    out = [str(prefix / f) for f in cmp.diff_files + cmp.left_only + cmp.right_only]
    for name, sub in cmp.subdirs.items():
        out += _diff_files(sub, prefix / name)
    return out


def select(names: list[str], root: Path = ROOT) -> list[Path]:
    "Notebooks named by stem, file name or path (all of nbs/ when none); an unknown name is an error."
    nbs = _notebooks(root / "nbs")
    if not names: return nbs
    by = {k: p for p in nbs for k in (p.stem, p.name, str(p.relative_to(root)))}
    unknown = [n for n in names if n not in by]
    if unknown: sys.exit(f"no such notebook in nbs/: {', '.join(unknown)}")
    return [by[n] for n in names]


if __name__ == "__main__":
    cmd, args = (sys.argv[1] if len(sys.argv) > 1 else ""), sys.argv[2:]
    if cmd == "clean" and set(args) <= {"--strict"}: sys.exit(check_clean(strict=REQUIRE_EXECUTED or bool(args)))
    if cmd == "strip": sys.exit(strip(select(args)))
    if cmd == "export" and not args: sys.exit(check_export())
    sys.exit(f"usage: {sys.argv[0]} clean [--strict] | strip [NB ...] | export")
