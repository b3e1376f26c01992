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
    nb_path = repo / "nbs" / "lib" / "70_core.ipynb"
    nb = json.loads(nb_path.read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["execution_count"] = 3
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hello\n"]}]
    nb_path.write_text(json.dumps(nb, indent=1))
    res = _check(repo, "clean")
    assert res.returncode == 1 and "nbs/lib/70_core.ipynb" in res.stderr


def test_library_out_of_sync_fails_naming_it(tmp_path: Path) -> None:
    repo = _mini_repo(tmp_path)
    # a hand edit to the library that the notebook does not contain
    (repo / "lexvla" / "core.py").write_text((repo / "lexvla" / "core.py").read_text() + "\nHAND_EDIT = 1\n")
    res = _check(repo, "export")
    assert res.returncode == 1 and "lexvla/core.py" in res.stderr


# Synthetic notebooks for the clean check: a library notebook (exports) and an experiment one (papermill).

def _code(src: str, n: int | None = None, out: str | None = None, **meta) -> dict:
    outputs = [] if out is None else [{"name": "stdout", "output_type": "stream", "text": [out]}]
    return {"cell_type": "code", "execution_count": n, "id": f"c{abs(hash((src, n))) % 10**6:06d}",
            "metadata": meta, "outputs": outputs, "source": [src]}


def _write_nb(path: Path, cells: list[dict]) -> None:
    nb = {"cells": cells, "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n")


def _lib(*counts: int | None) -> list[dict]:
    "A library notebook whose code cells have these execution counts (each prints its index)."
    return [_code("#| default_exp lib", counts[0])] + [
        _code(f"print({i})", n, None if n is None else f"{i}\n") for i, n in enumerate(counts[1:], 1)]


def _exp(n: int | None = None, out: str | None = None) -> list[dict]:
    return [_code("x: int = 1", tags=["parameters"]), _code("print(x)", n, out)]


def _nb_repo(tmp_path: Path, **nbs: list[dict]) -> Path:
    repo = tmp_path / "nbrepo"
    (repo / "nbs").mkdir(parents=True)
    (repo / "tests").mkdir()
    shutil.copy(ROOT / "settings.ini", repo)
    shutil.copy(ROOT / "tests" / "check_repo.py", repo / "tests")
    for name, cells in nbs.items(): _write_nb(repo / "nbs" / f"{name}.ipynb", cells)
    return repo


def _clean(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tests/check_repo.py", "clean", *args], cwd=repo, capture_output=True, text=True)


def test_executed_in_order_and_clean_notebooks_pass(tmp_path: Path) -> None:
    gpu = _code("#| cuda\nprint('gpu')")  # needs hardware a reader may lack: run-nbs leaves it out, no count needed
    repo = _nb_repo(tmp_path, lib=_lib(1, 2, 3) + [gpu, _code("print(4)", 4, "4\n")], exp=_exp())
    res = _clean(repo)
    assert res.returncode == 0, res.stderr
    assert "2 notebooks, 0 problem(s)" in res.stdout


def test_slow_cell_left_unrun_fails(tmp_path: Path) -> None:
    slow = _code("#| slow\nprint('long')")  # a reader's "run all" runs it, so a committed run must have too
    res = _clean(_nb_repo(tmp_path, lib=_lib(1, 2) + [slow, _code("print(3)", 3, "3\n")]))
    assert res.returncode == 1 and "nbs/lib.ipynb: cell 3" in res.stderr and "no execution count" in res.stderr


def test_out_of_order_notebook_fails_naming_it_and_the_cell(tmp_path: Path) -> None:
    res = _clean(_nb_repo(tmp_path, lib=_lib(1, 2, 4, 3)))
    assert res.returncode == 1
    assert "NOT RUN IN ORDER: nbs/lib.ipynb: cell 3" in res.stderr and "expected 3" in res.stderr
    assert "make run-nbs NBS=lib" in res.stderr


def test_partly_run_notebook_fails(tmp_path: Path) -> None:
    res = _clean(_nb_repo(tmp_path, lib=_lib(1, 2, None)))  # the last cell never ran
    assert res.returncode == 1 and "nbs/lib.ipynb: cell 3" in res.stderr and "no execution count" in res.stderr


def test_notebook_rerun_from_the_middle_fails(tmp_path: Path) -> None:
    res = _clean(_nb_repo(tmp_path, lib=_lib(1, 5, 6)))  # cells 2-3 re-run after a restart elsewhere
    assert res.returncode == 1 and "cell 2" in res.stderr and "execution count 5, expected 2" in res.stderr


def test_error_output_fails(tmp_path: Path) -> None:
    cells = _lib(1, 2)
    cells[1]["outputs"] = [{"ename": "ValueError", "evalue": "bad", "output_type": "error", "traceback": []}]
    res = _clean(_nb_repo(tmp_path, lib=cells))
    assert res.returncode == 1 and "nbs/lib.ipynb: cell 2" in res.stderr and "raised ValueError" in res.stderr


def test_experiment_notebook_with_outputs_or_counts_fails(tmp_path: Path) -> None:
    for name, cells in {"out": _exp(1, "1\n"), "count": _exp(1)}.items():
        res = _clean(_nb_repo(tmp_path / name, exp=cells))
        assert res.returncode == 1 and "NOT CLEAN: nbs/exp.ipynb is an experiment notebook" in res.stderr, name


def test_experiment_notebook_without_parameters_tag_fails(tmp_path: Path) -> None:
    res = _clean(_nb_repo(tmp_path, exp=[_code("x = 1")]))
    assert res.returncode == 1 and "NO PARAMETERS TAG: nbs/exp.ipynb" in res.stderr


def test_stray_metadata_fails_and_strip_removes_it_keeping_outputs(tmp_path: Path) -> None:
    lib = _lib(1, 2)
    lib[1]["metadata"] = {"scrolled": True, "tags": ["keep"]}
    exp = _exp(1, "1\n")
    repo = _nb_repo(tmp_path, lib=lib, exp=exp)
    res = _clean(repo)
    assert res.returncode == 1 and "NOT CLEAN: nbs/lib.ipynb has stray metadata" in res.stderr
    subprocess.run([sys.executable, "tests/check_repo.py", "strip"], cwd=repo, check=True, capture_output=True)
    assert _clean(repo).returncode == 0
    lib_nb, exp_nb = (json.loads((repo / "nbs" / f"{n}.ipynb").read_text()) for n in ("lib", "exp"))
    assert lib_nb["cells"][1]["metadata"] == {"tags": ["keep"]}
    assert [c["execution_count"] for c in lib_nb["cells"]] == [1, 2] and lib_nb["cells"][1]["outputs"][0]["text"] == ["1\n"]
    assert exp_nb["cells"][1]["outputs"] == [] and exp_nb["cells"][1]["execution_count"] is None
    assert exp_nb["cells"][0]["metadata"] == {"tags": ["parameters"]}


def test_library_notebook_never_run_fails(tmp_path: Path) -> None:
    repo = _nb_repo(tmp_path, lib=_lib(None, None))   # committed clean: a reader would see no outputs
    for args in ((), ("--strict",)):                  # the rule is on by default (REQUIRE_EXECUTED)
        res = _clean(repo, *args)
        assert res.returncode == 1 and "NOT EXECUTED: nbs/lib.ipynb" in res.stderr, args


def test_oversized_notebook_fails(tmp_path: Path) -> None:
    res = _clean(_nb_repo(tmp_path, lib=_lib(1, 2)[:1] + [_code("print(x)", 2, "x" * 2_100_000)]))
    assert res.returncode == 1 and "TOO LARGE: nbs/lib.ipynb" in res.stderr


def test_absolute_checkout_path_in_outputs_fails(tmp_path: Path) -> None:
    repo = _nb_repo(tmp_path, lib=[])
    _write_nb(repo / "nbs" / "lib.ipynb", _lib(1)[:1] + [_code("print(p)", 2, f"{repo}/nbs/data.bin\n")])
    res = _clean(repo)
    assert res.returncode == 1 and "MACHINE-SPECIFIC: nbs/lib.ipynb" in res.stderr


def test_significant_digits_and_float_reprs() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from check_repo import long_floats, significant_digits
    # by hand: the mantissa's digits without leading or trailing zeros
    assert [significant_digits(x) for x in ("9200000.0", "0.10000000149011612", "1.44e-05", "0.583333", "100.0", "0.000123")] \
        == [2, 17, 3, 6, 1, 3]
    assert long_floats("a 0.10000000149011612 b 66.66666865348816 c 0.583333 d 9200000.0 e 1.0000001e-05") \
        == ["0.10000000149011612", "66.66666865348816", "1.0000001e-05"]
    # versions, addresses, words and integers are not float reprs
    assert long_floats("torch 2.13.0+cpu on 127.0.0.1:29500, 22056576 weights, v1.2345678, 0.1234567em") == []


def test_long_float_in_an_output_fails_naming_the_cell(tmp_path: Path) -> None:
    noisy = _lib(1)[:1] + [_code("x", 2, "{'loss': 0.10000000149011612}\n")]
    res = _clean(_nb_repo(tmp_path / "noisy", lib=noisy))
    assert res.returncode == 1 and "LONG FLOAT: nbs/lib.ipynb: cell 2" in res.stderr and "0.10000000149011612" in res.stderr
    html = _lib(1)[:1] + [{**_code("df", 2), "outputs": [{"output_type": "execute_result", "execution_count": 2, "metadata": {},
                                                           "data": {"text/html": ["<td>66.66666865348816</td>"],
                                                                    "text/plain": ["66.67"]}}]}]
    res = _clean(_nb_repo(tmp_path / "html", lib=html))
    assert res.returncode == 1 and "LONG FLOAT: nbs/lib.ipynb: cell 2" in res.stderr and "66.66666865348816" in res.stderr
    rounded = _lib(1)[:1] + [_code("x", 2, "{'loss': 0.1, 'scale': 9200000.0, 'p': 0.583333}\n")]
    assert _clean(_nb_repo(tmp_path / "rounded", lib=rounded)).returncode == 0
