"""Run library notebooks top to bottom, one at a time, and save them with their outputs (`make run-nbs`).

    python tests/run_nbs.py [NB ...]   # stems, file names or paths; all library notebooks when none

Each notebook runs in a fresh Jupyter kernel with nbs/ as its working directory, as a reader's "Restart kernel and
run all" would (`#| slow` cells included), except cells marked `#| eval: false` or needing a GPU (`#| cuda`). Progress bars and library chatter are switched off (ENV) so that they do not land in the
outputs, and this machine's paths in outputs are replaced (`scrub`). The notebook is then written in the committed
form of tests/check_repo.py (metadata stripped, outputs and execution counts kept); a notebook whose run fails is
left untouched and named at the end.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
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
    # warnings that say nothing about the notebook: tqdm.auto without ipywidgets and torch's "beta" notice (a -W
    # filter matches the start of the message; no commas inside one). Deprecation notices are fixed, never filtered.
    "PYTHONWARNINGS": ",".join(["ignore:IProgress not found", "ignore:Sparse CSR tensor support is in beta:UserWarning"]),
    "PYTHONHASHSEED": "0",                   # set iteration order, so that a re-run prints the same
}


_SCRUB = [(re.compile(re.escape(str(ROOT))), "<repo>"),  # this checkout, e.g. in a warning's file name
          (re.compile(re.escape(tempfile.gettempdir()) + r"/(?:tmp|ipykernel_)[\w.-]+"), "<tmp>")]  # random names


def scrub(text: str) -> str:
    "`text` with this checkout's path as <repo> and temporary folders as <tmp>: the same on every machine and run."
    for pattern, repl in _SCRUB: text = pattern.sub(repl, text)
    return text


def _scrub_outputs(nb: dict) -> None:
    lines = lambda v: scrub(v) if isinstance(v, str) else [scrub(s) for s in v]
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            if "text" in o: o["text"] = lines(o["text"])
            for k, v in o.get("data", {}).items():
                if k.startswith("text/"): o["data"][k] = lines(v)


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
    saved = json.loads(nbformat.writes(nb))
    _scrub_outputs(saved)
    path.write_text(nb_text(normalise(saved, library=True)), encoding="utf-8")


def main(names: list[str]) -> int:
    paths = select(names)
    experiments = [p for p in paths if not is_library(p, read_nb(p))]
    if names and experiments:
        sys.exit(f"{', '.join(p.name for p in experiments)}: experiment notebooks are run with papermill "
                 "(README) and committed without outputs")
    paths = [p for p in paths if p not in experiments]
    os.environ.update(ENV)
    os.environ.pop("IN_TEST", None)  # a reader's run, not nbdev_test's (only 08_scenes reads it: a larger sample)
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
