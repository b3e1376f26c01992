"""Repository hygiene checks run by `make test` before the notebooks execute.

    python tests/check_repo.py clean   # notebooks committed clean (no outputs, tags kept)
    python tests/check_repo.py export  # lexvla/ equals what nbdev_export writes from nbs/

Both exit non-zero and name every offending file.
"""
from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith((".", "_")))


def check_clean() -> int:
    """Run nbdev_clean and nbstripout on a copy of nbs/; any change means a dirty notebook."""
    nbs = _notebooks(ROOT / "nbs")
    with tempfile.TemporaryDirectory() as tmp:
        copies = []
        for nb in nbs:
            dst = Path(tmp) / nb.name
            shutil.copy2(nb, dst)
            copies.append(dst)
        # nbdev_clean reads settings.ini from the cwd (allowed_cell_metadata_keys = tags keeps tags)
        subprocess.run([BIN / "nbdev_clean", "--fname", tmp], cwd=ROOT, check=True, capture_output=True)
        subprocess.run([BIN / "nbstripout", "--keep-id", *map(str, copies)], check=True, capture_output=True)
        dirty = [nb for nb, cp in zip(nbs, copies) if not filecmp.cmp(nb, cp, shallow=False)]
    for nb in dirty:
        print(f"NOT CLEAN: {nb.relative_to(ROOT)} has outputs, execution counts or stray metadata; "
              "run `make clean-nbs` and commit", file=sys.stderr)
    missing = [nb for nb in nbs if '"parameters"' not in nb.read_text() and nb.stem == "train"]
    for nb in missing:
        print(f"NO PARAMETERS TAG: {nb.relative_to(ROOT)}", file=sys.stderr)
    print(f"check-clean: {len(nbs)} notebooks, {len(dirty) + len(missing)} problem(s)")
    return 1 if dirty or missing else 0


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


if __name__ == "__main__":
    checks = {"clean": check_clean, "export": check_export}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(checks)}}}")
    sys.exit(checks[sys.argv[1]]())
