"""Run library notebooks top to bottom, one at a time, and save them with their outputs (`make run-nbs`).

    python tests/run_nbs.py [NB ...]   # stems, file names or paths; all library notebooks when none

Each notebook runs in a fresh Jupyter kernel with nbs/ as its working directory, as a reader's "Restart kernel and
run all" would, except that cells nbdev_test skips (`#| eval: false`, settings.ini's tst_flags such as `#| slow`)
are skipped here too. Progress bars and library chatter are switched off (ENV) so that they do not land in the
outputs. The notebook is then written in the committed form of tests/check_repo.py (metadata stripped, outputs and
execution counts kept); a notebook whose run fails is left untouched and named at the end.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_repo import ROOT, is_library, nb_text, normalise, read_nb, select, skipped  # noqa: E402

TIMEOUT_S = 900  # per cell
ENV = {
    "HF_HUB_OFFLINE": "1",                   # everything a notebook loads is cached or vendored
    "TQDM_DISABLE": "1",                     # tqdm (lexvla's bars, transformers', huggingface_hub's)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",       # no "Some weights were not initialized ..." advisories
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",       # no fork warning from the Rust tokenizers
    "PYTHONWARNINGS": "ignore:IProgress not found",  # tqdm.auto without ipywidgets (a warning naming a venv path)
    "PYTHONHASHSEED": "0",                   # set iteration order, so that a re-run prints the same
}


def run_notebook(path: Path) -> None:
    "Execute `path` in place in a fresh kernel (raises nbclient's CellExecutionError naming the failing cell)."
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3", record_timing=False,
                            store_widget_state=False, resources={"metadata": {"path": str(path.parent)}})
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code": continue
            if skipped(cell):
                cell.outputs, cell.execution_count = [], None
                continue
            client.execute_cell(cell, i)
    # nbformat.writes splits sources and outputs into lines, as every committed notebook has them
    path.write_text(nb_text(normalise(json.loads(nbformat.writes(nb)), library=True)), encoding="utf-8")


def main(names: list[str]) -> int:
    paths = select(names)
    experiments = [p for p in paths if not is_library(p, read_nb(p))]
    if names and experiments:
        sys.exit(f"{', '.join(p.name for p in experiments)}: experiment notebooks are run with papermill "
                 "(README) and committed without outputs")
    paths = [p for p in paths if p not in experiments]
    os.environ.update(ENV)
    os.environ.pop("IN_TEST", None)  # a reader's run, not nbdev_test's (only 12_scenes reads it: a larger sample)
    failed, total = [], 0.0
    for path in paths:
        before, start = path.stat().st_size, time.time()
        try: run_notebook(path)
        except Exception as e:  # noqa: BLE001 -- report and go on with the next notebook
            failed.append(path.name)
            print(f"FAILED {path.relative_to(ROOT)}: {type(e).__name__}: {str(e)[-2000:]}", file=sys.stderr)
            continue
        secs = time.time() - start
        total += secs
        print(f"{path.relative_to(ROOT)}: {secs:.1f} s, {before / 1e3:.1f} kB -> {path.stat().st_size / 1e3:.1f} kB",
              flush=True)
    print(f"run-nbs: {len(paths) - len(failed)} notebook(s) run in {total:.0f} s" +
          (f"; FAILED: {', '.join(failed)} (left as they were)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
