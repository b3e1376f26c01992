"""The hygiene checks must catch a dirty notebook and say which file."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mini_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "settings.ini", repo)
    shutil.copytree(ROOT / "nbs", repo / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(ROOT / "tests", repo / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "lexvla", repo / "lexvla", ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def _check(repo: Path, what: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tests/check_repo.py", what], cwd=repo, capture_output=True, text=True)


def test_clean_notebook_passes(tmp_path: Path) -> None:
    assert _check(_mini_repo(tmp_path), "clean").returncode == 0


def test_notebook_with_output_fails_naming_it(tmp_path: Path) -> None:
    repo = _mini_repo(tmp_path)
    nb_path = repo / "nbs" / "00_core.ipynb"
    nb = json.loads(nb_path.read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["execution_count"] = 3
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hello\n"]}]
    nb_path.write_text(json.dumps(nb, indent=1))
    res = _check(repo, "clean")
    assert res.returncode == 1 and "nbs/00_core.ipynb" in res.stderr


def test_library_out_of_sync_fails_naming_it(tmp_path: Path) -> None:
    repo = _mini_repo(tmp_path)
    # a hand edit to the library that the notebook does not contain
    (repo / "lexvla" / "core.py").write_text((repo / "lexvla" / "core.py").read_text() + "\nHAND_EDIT = 1\n")
    res = _check(repo, "export")
    assert res.returncode == 1 and "lexvla/core.py" in res.stderr
