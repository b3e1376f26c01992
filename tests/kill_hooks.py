"""Training callbacks that inject a fault at a chosen point of a run: SIGKILL their own process or their machine's
launcher, hang, or raise; for the fault tests (`tests/test_train.py`, `tests/test_multinode.py`, and the paper-scale
section of `nbs/train.ipynb`).

A run in another process loads them by import path, with this folder on its PYTHONPATH:

    PYTHONPATH=tests python -m lexvla.train --config run.yaml --callback kill_hooks:kill_at_step_10
"""
from __future__ import annotations

import json
import os
import signal
import time
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


# Several machines (tests/test_multinode.py). Each writes a stamp first, {"time", "pid", "launcher"} as JSON into the
# file named by LEXVLA_TEST_STAMP, so the test knows when the fault happened and which processes it concerns.

def _stamp() -> None:
    path = os.environ.get("LEXVLA_TEST_STAMP")
    if path:
        tmp = f"{path}.tmp"
        Path(tmp).write_text(json.dumps({"time": time.time(), "pid": os.getpid(), "launcher": os.getppid()}))
        os.replace(tmp, path)


class KillLauncherAtStep(TrainCallback):
    """SIGKILL this rank's launcher (its parent: `accelerate launch`, torchrun's agent) right after step `step`, as
    when its machine is lost; the rank then dies with it (`lexvla.multinode.follow_launcher`)."""
    def __init__(self, step: int): self.step = step
    def after_step(self, run: TrainRun) -> None:
        if run.step != self.step: return
        _stamp()
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)
        raise AssertionError("this rank outlived its launcher by 60 s: follow_launcher did not take effect")


class HangAtStep(TrainCallback):
    "Hang (sleep, holding no lock) right after step `step`, as a rank stuck in a filesystem or a driver would."
    def __init__(self, step: int): self.step = step
    def after_step(self, run: TrainRun) -> None:
        if run.step != self.step: return
        _stamp()
        time.sleep(3600)


class RaiseAtStep(TrainCallback):
    "Raise a ValueError of this rank's own right after step `step`."
    def __init__(self, step: int): self.step = step
    def after_step(self, run: TrainRun) -> None:
        if run.step == self.step:
            _stamp()
            raise ValueError(f"rank {run.acc.process_index} cannot go on after step {self.step}")


kill_launcher_at_step_3 = KillLauncherAtStep(3)   # tests/test_multinode.py: machine 1 is lost after the checkpoint of step 2
hang_at_step_2 = HangAtStep(2)                    # tests/test_multinode.py: machine 1 hangs, machine 0 times out
raise_at_step_2 = RaiseAtStep(2)                  # tests/test_multinode.py: a rank on machine 1 raises
