"""Training over several machines, tested with two "machines" on 127.0.0.1: each machine is its own launcher
(`launch_training`, as `train.ipynb` runs it on every machine, `python -m lexvla.train --num_processes ...`, or
`scripts/slurm_train.sh` under a stand-in for SLURM), with one gloo process each, training the random `tiny` model
on 32 samples in 4 shards (4 steps of 4 pairs per rank = one epoch).

- two machines compute what one machine with the same number of processes computes: the samples each rank reads,
  the all-gathered features (the contrastive negatives) and the checkpoints, to the bit (tolerance 0);
- a machine whose launcher is killed: the other stops within a bound and names the lost rank; the committed
  checkpoint is intact, and restarting both machines (through scripts/slurm_train.sh) continues bit-identically;
- a machine that hangs: the other stops after `dist_timeout` and names it; a rank that raises: both machines fail
  with its error;
- bad starts (a machine rank out of range, a port in use, an address that does not resolve, unequal process counts,
  a main machine nobody reaches, a machine that never joins, an out_dir the machines do not share) stop with an error
  that names them, within a bound.

Each test prints the times it measured (pytest -s shows them).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import THREADS, _sample  # noqa: E402

from lexvla.core import ConfigError  # noqa: E402
from lexvla.data import DataConfig, write_shards  # noqa: E402
from lexvla.multinode import Machines, free_port  # noqa: E402
from lexvla.train import LaunchError, TrainConfig, launch_training, list_checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = str(ROOT / "tests")
ENV = {"PYTHONPATH": TESTS, "HF_HUB_OFFLINE": "1", **THREADS}
RECORD = "record_hooks:recorder"
N_SAMPLES, STEPS = 32, 4
SLACK = 90.0   # seconds, on top of the timeouts: process start and teardown on a loaded 2-core machine


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    write_shards((_sample(i) for i in range(N_SAMPLES)), d, samples_per_shard=8)
    return d


def _config(path: Path, shards: Path, out_dir: Path | str, **kw) -> Path:
    base = dict(data=DataConfig(urls=str(shards), batch_size=4, resampled=False, shuffle_buffer=8, num_workers=0),
                model="tiny", max_steps=STEPS, warmup_steps=1, lr_lora=1e-3, lr_adapter=1e-3, lr_codebook=1e-3,
                lr_logit_scale=1e-3, log_every=1, save_every=2, out_dir=str(out_dir), mixed_precision="no",
                tracker="none", progress=False, dist_timeout=40.0)
    path.write_text(TrainConfig(**(base | kw)).to_yaml())
    return path


def _launch(config: Path, machines: Machines, callbacks=(), env=None, num_processes: int = 1) -> dict:
    "One machine's launch_training in this thread: {'error': LaunchError | Exception | None, 'end': time}."
    res: dict = {"error": None}
    try: launch_training(config, num_processes, env={**ENV, **(env or {})}, callbacks=list(callbacks), machines=machines)
    except Exception as e: res["error"] = e
    res["end"] = time.time()
    return res


def _machines(config: Path, callbacks: dict[int, list[str]], env: dict, n: int = 2) -> list[dict]:
    "Launch `n` machines of one run on 127.0.0.1, each in its own thread; their results, by machine rank."
    port, results = free_port(), [None] * n
    def run(r: int) -> None: results[r] = _launch(config, Machines(n, r, "127.0.0.1", port), callbacks.get(r, []), env)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads: t.start()
    for t in threads: t.join()
    return results


def _alive(pid: int) -> bool:
    "The process exists and is not a zombie."
    try: return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError): return False


def _dies(pid: int, within: float = 10.0) -> bool:
    "The process is gone (or a zombie) within `within` seconds."
    end = time.time() + within
    while _alive(pid) and time.time() < end: time.sleep(0.1)
    return not _alive(pid)


def _same_checkpoint(a: Path, b: Path) -> None:
    "Two checkpoints hold the same weights, optimizer state and training state, to the bit."
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"weights differ: {a} {b}"
    oa, ob = (torch.load(p / "optimizer.pt", weights_only=True)["state"] for p in (a, b))
    assert oa.keys() == ob.keys()
    assert all(torch.equal(oa[k][n], ob[k][n]) for k in oa for n in oa[k]), f"optimizer states differ: {a} {b}"
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    for k in ("step", "samples_seen", "world_size", "data"): assert sa[k] == sb[k], (k, sa[k], sb[k])
    assert [h["loss"] for h in sa["history"]] == [h["loss"] for h in sb["history"]]


def _records(folder: Path) -> dict[tuple[int, int], dict]:
    "(rank, step) -> what record_hooks wrote: the keys the rank read and the gathered features."
    return {(int(p.stem[4:p.stem.index("_")]), int(p.stem.rsplit("step", 1)[1])): torch.load(p, weights_only=True)
            for p in folder.glob("rank*_step*.pt")}


def _stamp(path: Path) -> dict:
    return json.loads(path.read_text())


def _fake_slurm(bin_dir: Path) -> Path:
    "`srun` and `scontrol` stand-ins: every node is this machine (127.0.0.1); srun runs its command once per node."
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "scontrol").write_text('#!/bin/bash\nfor ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done\n')
    (bin_dir / "srun").write_text(
        '#!/bin/bash\n# one task per node: SLURM_NODEID=0..SLURM_NNODES-1, in parallel; the exit code of a failed one\n'
        'while [[ "$1" == --* ]]; do shift; done\npids=()\n'
        'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n')
    for f in ("scontrol", "srun"): (bin_dir / f).chmod(0o755)
    return bin_dir


def test_two_machines_equal_one_and_resume_after_a_lost_machine(shards, tmp_path):
    # one machine, two processes: the reference
    one = _config(tmp_path / "one.yaml", shards, tmp_path / "one")
    res = _launch(one, Machines(), [RECORD], {"RECORD_DIR": str(tmp_path / "rec_one")}, num_processes=2)
    assert res["error"] is None, res["error"]
    # two machines, one process each; machine 1's launcher is killed with SIGKILL right after step 3
    two_dir, stamp = tmp_path / "two", tmp_path / "stamp.json"
    two = _config(tmp_path / "two.yaml", shards, two_dir)
    lost = _machines(two, {0: [RECORD], 1: [RECORD, "kill_hooks:kill_launcher_at_step_3"]},
                     {"RECORD_DIR": str(tmp_path / "rec_two_a"), "LEXVLA_TEST_STAMP": str(stamp)})
    killed = _stamp(stamp)
    err0, err1 = lost[0]["error"], lost[1]["error"]
    print(f"machine 0 stopped {lost[0]['end'] - killed['time']:.1f} s after machine 1's launcher was killed "
          f"(dist_timeout 40 s, roll call 10 s)")
    assert isinstance(err1, LaunchError) and err1.exitcode == -signal.SIGKILL, err1   # its launcher, killed
    assert _dies(killed["pid"]), "machine 1's rank outlived its launcher"
    assert isinstance(err0, LaunchError) and err0.rank == 0, err0
    assert "LostRankError" in str(err0) and "rank 1 (machine 1," in str(err0) and "was lost" in str(err0), str(err0)
    assert lost[0]["end"] - killed["time"] < 40.0 / 4 + SLACK
    # nothing committed is lost: the checkpoint of step 2 is complete and is the one machine's
    assert [s for s, _ in list_checkpoints(two_dir)] == [2]
    _same_checkpoint(two_dir / "checkpoints" / "step_000002", tmp_path / "one" / "checkpoints" / "step_000002")

    # restart both machines, as a SLURM job (scripts/slurm_train.sh); the run resumes from step 2
    bin_dir = _fake_slurm(tmp_path / "bin")
    env = {**os.environ, **ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_ID": "1", "CONFIG": str(two), "OUT_DIR": str(two_dir),
           "GPUS_PER_NODE": "1", "PYTHON": sys.executable, "MAIN_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), TESTS]), "RECORD_DIR": str(tmp_path / "rec_two_b")}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_train.sh"), "--callback", RECORD], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "resuming from step 2 of 4" in p.stdout, p.stdout[-3000:]
    _same_checkpoint(two_dir / "checkpoints" / "step_000004", tmp_path / "one" / "checkpoints" / "step_000004")

    # per step and rank: the same samples and the same all-gathered features as on one machine (tolerance 0)
    ref, a, b = _records(tmp_path / "rec_one"), _records(tmp_path / "rec_two_a"), _records(tmp_path / "rec_two_b")
    two_machines = {**{k: v for k, v in a.items() if k[1] <= 2}, **{k: v for k, v in b.items() if k[1] >= 3}}
    assert sorted(ref) == sorted(two_machines) == [(r, s) for r in (0, 1) for s in range(1, STEPS + 1)]
    for k, v in ref.items():
        w = two_machines[k]
        assert v["keys"] == w["keys"], (k, v["keys"], w["keys"])
        assert v["img"].shape == (8, 1024) and torch.equal(v["img"], w["img"]) and torch.equal(v["txt"], w["txt"]), k
    # machine 1's third step, before its launcher was killed, had read what the resumed run read again
    assert a[(1, 3)]["keys"] == b[(1, 3)]["keys"]
    # one epoch: every sample read by exactly one rank, none twice, none missing, on either topology
    everything = sorted(f"s{i:04d}" for i in range(N_SAMPLES))
    for records in (ref, two_machines):
        assert sorted(key for v in records.values() for key in v["keys"]) == everything


def test_a_hung_machine_is_timed_out(shards, tmp_path):
    "Machine 1's rank hangs after step 2 (its process lives, its connections stay open): machine 0 stops after dist_timeout."
    stamp = tmp_path / "stamp.json"
    cfg = _config(tmp_path / "run.yaml", shards, tmp_path / "run", dist_timeout=20.0)
    port, results = free_port(), [None, None]
    def run(r, cbs): results[r] = _launch(cfg, Machines(2, r, "127.0.0.1", port), cbs, {"LEXVLA_TEST_STAMP": str(stamp)})
    threads = [threading.Thread(target=run, args=(0, [])), threading.Thread(target=run, args=(1, ["kill_hooks:hang_at_step_2"]))]
    for t in threads: t.start()
    threads[0].join(timeout=600)
    hung = _stamp(stamp)
    assert _alive(hung["pid"])   # still hanging when machine 0 gave up
    os.kill(hung["launcher"], signal.SIGKILL)   # end machine 1: its rank dies with its launcher
    threads[1].join(timeout=120)
    waited = results[0]["end"] - hung["time"]
    print(f"machine 0 stopped {waited:.1f} s after machine 1 hung (dist_timeout 20 s, roll call 5 s)")
    err = results[0]["error"]
    assert isinstance(err, LaunchError) and "rank 1 (machine 1," in str(err) and "was lost" in str(err), err
    assert "Timed out" in str(err), err   # gloo's timeout, after dist_timeout
    assert 20.0 <= waited < 20.0 + 5.0 + SLACK
    assert not threads[1].is_alive() and _dies(hung["pid"]), "machine 1's rank outlived its launcher"


def test_a_rank_that_raises_fails_both_machines_with_its_error(shards, tmp_path):
    stamp = tmp_path / "stamp.json"
    cfg = _config(tmp_path / "run.yaml", shards, tmp_path / "run")
    res = _machines(cfg, {1: ["kill_hooks:raise_at_step_2"]}, {"LEXVLA_TEST_STAMP": str(stamp)})
    raised = _stamp(stamp)["time"]
    print("machines stopped " + ", ".join(f"{r['end'] - raised:.1f}" for r in res) + " s after rank 1 raised")
    err0, err1 = res[0]["error"], res[1]["error"]
    assert isinstance(err1, LaunchError) and err1.rank == 1 and err1.exitcode == 1, err1
    assert "ValueError: rank 1 cannot go on after step 2" in str(err1), err1
    assert isinstance(err0, LaunchError) and err0.rank == 0, err0
    assert "rank 1 (machine 1," in str(err0) and "failed: ValueError: rank 1 cannot go on after step 2" in str(err0), err0
    assert all(r["end"] - raised < SLACK for r in res)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]   # committed before rank 1 raised


def _wait_listening(port: int, limit: float = 120.0) -> None:
    end = time.time() + limit
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0: return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {limit:g} s")


def _cli(config: Path, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lexvla.train", "--config", str(config), "--num_processes", "1", *args],
                            cwd=cwd, env={**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), TESTS])},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_bad_starts_stop_with_an_error_naming_them(shards, tmp_path):
    t0 = time.time()
    cfg = _config(tmp_path / "run.yaml", shards, tmp_path / "run", dist_timeout=10.0)
    # at once, before anything starts: a rank out of range, a port in use on the main machine, an address that does not resolve
    with pytest.raises(ConfigError, match=r"machine_rank must be in \[0, num_machines=2\), got 2"):
        launch_training(cfg, 1, machines=Machines(2, 2, "127.0.0.1", 29500))
    with socket.socket() as busy:
        busy.bind(("", 0)); busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"main_port {port} is in use on the main machine"):
            launch_training(cfg, 1, machines=Machines(2, 0, "127.0.0.1", port))
    with pytest.raises(ConfigError, match="main_address 'no-such-host.invalid' does not resolve"):
        launch_training(cfg, 1, machines=Machines(2, 1, "no-such-host.invalid", port))
    p = _cli(cfg, tmp_path, "--num_machines", "2", "--machine_rank", "2", "--main_port", "29500")
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 1 and "machine_rank must be in [0, num_machines=2), got 2" in out, out
    immediate = time.time() - t0

    # then, all at once: unequal process counts (2 + 1); a machine 1 that reaches no main machine; a machine 0 that
    # nobody joins, and a second machine 0 on its port; an out_dir that is not one folder for the two machines
    results: dict[str, dict] = {}
    def run(name: str, n: int, m: Machines) -> None: results[name] = _launch(cfg, m, num_processes=n)
    p_uneq, p_alone, p_joined = free_port(), free_port(), free_port()
    jobs = [("unequal 0", 2, Machines(2, 0, "127.0.0.1", p_uneq)), ("unequal 1", 1, Machines(2, 1, "127.0.0.1", p_uneq)),
            ("no main", 1, Machines(2, 1, "127.0.0.1", p_alone)), ("alone", 1, Machines(2, 0, "127.0.0.1", p_joined))]
    threads = [threading.Thread(target=run, args=j) for j in jobs]
    t1 = time.time()
    for t in threads: t.start()
    _wait_listening(p_joined)   # machine 0 of port p_joined is up; a second machine 0 there is refused
    with pytest.raises(ConfigError, match=f"main_port {p_joined} is in use .*another machine was also given machine_rank 0"):
        launch_training(cfg, 1, machines=Machines(2, 0, "127.0.0.1", p_joined))
    (tmp_path / "a").mkdir(); (tmp_path / "b").mkdir()   # a relative out_dir, from two working directories: two folders
    rel = _config(tmp_path / "rel.yaml", shards, "rel_run", dist_timeout=10.0)
    p_rel = free_port()
    clis = [_cli(rel, tmp_path / d, "--num_machines", "2", "--machine_rank", str(r), "--main_port", str(p_rel))
            for r, d in ((0, "a"), (1, "b"))]
    outs = [c.communicate(timeout=600)[0] for c in clis]
    for t in threads: t.join(timeout=600)
    together = time.time() - t1
    print(f"refused at once: {immediate:.1f} s for the four checks; the rest, run together: {together:.1f} s (dist_timeout 10 s)")

    for name in ("unequal 0", "unequal 1"):
        e = results[name]["error"]
        assert isinstance(e, LaunchError), (name, e)
        assert "the machines run unequal numbers of processes: machine 0 (" in str(e) and ") 2, machine 1 (" in str(e), e
    e = results["no main"]["error"]
    assert isinstance(e, LaunchError) and e.rank is None, e
    assert f"machine 1 of 2 could not reach the main machine at 127.0.0.1:{p_alone} within 10 s" in str(e), e
    e = results["alone"]["error"]
    assert isinstance(e, LaunchError) and f"only 1 of 2 machines joined the rendezvous at 127.0.0.1:{p_joined}" in str(e), e
    for c, out in zip(clis, outs):
        assert c.returncode == 1, out[-3000:]
        assert "out_dir rel_run is not one folder for every machine: rank(s) 1 (machine 1," in out, out[-3000:]
    assert together < 10.0 + SLACK
