"""A training callback that records, for every step and rank, the keys of the samples the rank read and the
all-gathered features of the step (the contrastive negatives every rank scores against), for the multi-machine tests
(`tests/test_multinode.py`).

Loaded by import path into a launched run (`--callback record_hooks:recorder`, this folder on PYTHONPATH), with the
folder to write into in RECORD_DIR. Importing this module wraps two names of `lexvla.train` in that process, which
only a test may do: `DataCursor.__next__` (the batches the training loop takes; not the fast-forward of a resumed
run) and `loss_for_head` (the objective, which it leaves unchanged: the features are gathered a second time, with
lexvla.losses.gather_features, the function the contrastive loss uses). Every step is written when it ends, as
`rank{r}_step{s:03d}.pt` = {"keys": [...], "img": [W·B, V], "txt": [W·B, V]}, so a rank killed later keeps its steps.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

import lexvla.train as T
from lexvla.losses import gather_features

_step: dict = {"keys": [], "img": [], "txt": []}

_next = T.DataCursor.__next__
def _recording_next(self):
    b = _next(self)
    _step["keys"] += list(b["key"])
    return b
T.DataCursor.__next__ = _recording_next

_loss_for_head = T.loss_for_head
def _recording_loss_for_head(head: str):
    loss = _loss_for_head(head)
    def recording_loss(out, step, cfg):
        img, txt = out["image"].detach(), out["text"].detach()
        if dist.is_initialized() and dist.get_world_size() > 1: img, txt = gather_features(img, txt)
        _step["img"].append(img.float().clone()); _step["txt"].append(txt.float().clone())
        return loss(out, step, cfg)
    return recording_loss
T.loss_for_head = _recording_loss_for_head


class Recorder(T.TrainCallback):
    def after_step(self, run: T.TrainRun) -> None:
        out = Path(os.environ["RECORD_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"rank{run.acc.process_index}_step{run.step:03d}.pt"
        torch.save({"keys": _step["keys"], "img": torch.cat(_step["img"]), "txt": torch.cat(_step["txt"])}, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
        _step.update(keys=[], img=[], txt=[])


recorder = Recorder()
