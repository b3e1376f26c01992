"""The repository cites only what it contains.

Every notebook, module, config, test, benchmark script and README is scanned for
(a) mentions of the team's working files that live outside the repository (the method is documented in
    `nbs/index.ipynb`, section "The method", and the notebooks cite the paper and each other instead), and
(b) citations of repository files that do not exist: paths in backticks (`nbs/lib/12_train.ipynb`,
    `lexvla/configs/paper_cc12m.yaml`), markdown links `[text](path)`, and notebook names in backticks
    (`12_train` must be `nbs/lib/12_train.ipynb`; `train` is `nbs/train.ipynb`).
Outputs written at run time (`runs/...`, `$OUT/...`, `~/...`), absolute paths, URLs and templates are not citations.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Assembled from pieces so that this file does not itself contain the names it forbids.
FORBIDDEN = re.compile(r"\b" + "DESI" + r"GN\b(?!_)|\b" + "PLA" + r"N\.md\b")

TOP_DIRS = ("nbs", "lexvla", "tests", "benchmarks", "docs", "shared", ".ci")  # a path starting here is a repo path
DOC_EXTS = (".md", ".ipynb")            # a bare file name with these endings is a repo file too
BACKTICK = re.compile(r"`([^`\n]+)`")
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
NOTEBOOK = re.compile(r"\d\d_[A-Za-z]\w*")
# Written at run time, not committed (benchmarks/results/ holds what the benchmark scripts write, e.g. a GPU run's
# results cited before they are committed), or not a repository path at all.
OUTPUT_PREFIXES = ("runs/", "../runs/", "benchmarks/results/", "../benchmarks/results/", "$", "~", "/")


def sources() -> list[Path]:
    "Every file the check reads."
    files = sorted(p for p in (ROOT / "nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    files += sorted((ROOT / "lexvla").rglob("*.py"))
    files += sorted((ROOT / "lexvla" / "configs").glob("*.yaml")) + sorted((ROOT / "tests").glob("*.py"))
    files += sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.md"))
    return [f for f in files + [ROOT / "README.md"] if "__pycache__" not in f.parts and not f.name.startswith(".")]


def text_of(path: Path) -> str:
    "A notebook's cell sources (not outputs, which are not committed), or a file's text."
    if path.suffix != ".ipynb": return path.read_text(encoding="utf-8")
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"])


def is_citation(ref: str) -> bool:
    "Whether `ref`, found in backticks or a link, names a file of this repository rather than code or an output."
    if not ref or any(ch in ref for ch in " \t{}<>*?|\"'()[],;=…") or "://" in ref or "..." in ref: return False
    if ref.startswith(OUTPUT_PREFIXES) or "/runs/" in ref: return False
    if NOTEBOOK.fullmatch(ref): return True
    if "/" in ref: return ref.startswith("../") or ref.removeprefix("./").split("/")[0] in TOP_DIRS
    return ref.endswith(DOC_EXTS)


def exists(ref: str, cited_in: Path) -> bool:
    "`ref` resolves inside the repository: from the citing file's folder, the root, or nbs/ (notebook names: nbs/ or nbs/lib/)."
    if NOTEBOOK.fullmatch(ref): return any((ROOT / d / f"{ref}.ipynb").is_file() for d in ("nbs", "nbs/lib"))
    ref = ref.split("#")[0]
    for base in (cited_in.parent, ROOT, ROOT / "nbs"):
        p = (base / ref).resolve()
        if p.is_relative_to(ROOT) and p.exists(): return True
    return False


def citations(text: str) -> list[str]:
    refs = [m.group(1).strip() for m in BACKTICK.finditer(text)] + [m.group(1) for m in MD_LINK.finditer(text)]
    return [r for r in refs if is_citation(r)]


def problems(path: Path) -> list[str]:
    "Every forbidden mention and every missing cited file in `path`, one message each."
    text, rel = text_of(path), path.relative_to(ROOT)
    out = [f"{rel}: cites a file outside the repository: {m.group(0)!r} in {line.strip()[:100]!r}"
           for line in text.splitlines() for m in FORBIDDEN.finditer(line)]
    out += [f"{rel}: cites `{r}`, which is not in the repository" for r in dict.fromkeys(citations(text))
            if not exists(r, path)]
    return out


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_cites_only_the_repository(path: Path) -> None:
    found = problems(path)
    assert not found, "\n".join(found)


def test_the_check_finds_bad_citations(tmp_path: Path) -> None:
    bad = tmp_path / "bad.md"
    bad.write_text("See " + "DESI" + "GN.md §6 and " + "PLA" + "N.md.\n")
    assert len([m for m in FORBIDDEN.finditer(bad.read_text())]) == 2
    for ref in ("nbs/99_missing.ipynb", "lexvla/configs/missing.yaml", "docs/history.md", "99_missing", "MISSING.md",
                "../shared/assets/x.gguf"):
        assert is_citation(ref) and not exists(ref, ROOT / "nbs" / "index.ipynb"), ref
    for ref in ("nbs/lib/12_train.ipynb", "lexvla/configs/paper_cc12m.yaml", "12_train", "41_ablations", "index.ipynb", "README.md",
                "../lexvla/train.py"):
        assert is_citation(ref) and exists(ref, ROOT / "nbs" / "index.ipynb"), ref
    for ref in ("runs/train/metrics.json", "../runs/x.md", "$OUT/a.md", "~/x.md", "https://a.b/c.md", "lexvla.losses",
                "{key}.jpg", "/data/cc12m/x.tar", "x / y"):
        assert not is_citation(ref), ref
    tick = "`"  # sample text assembled so that this file cites nothing missing
    sample = "a [link](" + "docs/x.md) and " + tick + "nbs/70_core.ipynb" + tick + ", " + tick + "30_prompt_study" + tick
    assert citations(sample) == ["nbs/70_core.ipynb", "30_prompt_study", "docs/x.md"]
