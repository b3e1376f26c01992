"""Run every notebook under nbs/ (experiments) and nbs/lib/ (the library) the way nbdev_test does, one pytest result per notebook."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parents[1] / "nbs"
NOTEBOOKS = sorted((p for p in NBS.rglob("*.ipynb") if not any(s.startswith((".", "_")) for s in p.relative_to(NBS).parts)),
                   key=lambda p: p.name)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbdev.test import test_nb

    monkeypatch.chdir(nb.parent)  # nbdev_test runs each notebook from its own folder with IN_TEST=1
    monkeypatch.setenv("IN_TEST", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ok, secs = test_nb(nb, skip_flags=["slow", "cuda"], force_flags=[], do_print=False, basepath=NBS.parent)
    assert ok, f"{nb.name} failed (see the traceback above)"
