"""Training callbacks that SIGKILL their own process at a chosen point of a run, for the fault tests
(`tests/test_train.py`, and the paper-scale section of `nbs/train.ipynb`).

A run in another process loads them by import path, with this folder on its PYTHONPATH:

    PYTHONPATH=tests python -m lexvla.train --config run.yaml --callback kill_hooks:kill_at_step_10
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from lexvla.train import TrainCallback, TrainRun


def _die() -> None: os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(TrainCallback):
    "SIGKILL right after step `step` (after its checkpoint, if it is a checkpoint step)."
    def __init__(self, step: int): self.step = step
    def after_step(self, run: TrainRun) -> None:
        if run.step == self.step: _die()


class KillInCheckpoint(TrainCallback):
    "SIGKILL in the middle of writing checkpoint `step`: its files are written, state.json is not, the folder is not renamed."
    def __init__(self, step: int): self.step = step
    def before_checkpoint_commit(self, run: TrainRun, folder: Path) -> None:
        if run.step == self.step: _die()


kill_at_step_2 = KillAtStep(2)                # nbs/train.ipynb: the first launch of the paper-scale test
kill_at_step_10 = KillAtStep(10)              # tests/test_train.py: between the checkpoints of steps 8 and 12
kill_in_checkpoint_8 = KillInCheckpoint(8)    # tests/test_train.py: while checkpoint 8 is being written
