"""The training path off the CPU's default device, without a GPU: whole steps on the `meta` device, and FSDP2 in two gloo
processes.

On a GPU, the model, the data and every tensor of a training step live on `cuda`, while a tensor built without an
explicit device lands on the CPU; mixing the two fails (`torch.stack`, `torch.cat`) or silently copies. CI has no
GPU, so these tests move the whole step to the `meta` device instead: there, too, mixing with a CPU tensor is an
error ("Tensor on device cpu is not on the expected device meta"), including for 0-dim tensors in `torch.stack`
(PyTorch's fake CUDA tensors let those through, so they would not catch this class of defect). Meta tensors have
shapes but no values, so nothing is learned; `lexvla.core.host_tensor` reads them as zeros where values leave the
device (logs, checks, checkpoints).

FSDP: accelerate selects FSDP only on accelerators; `lexvla.train.make_accelerator` switches a gloo CPU run launched
with FSDP to it, so the real FSDP2 path (sharding, mixed-precision policy, gathered checkpoints, resumption) runs here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lexvla.train as T
from lexvla.data import DataConfig
from lexvla.losses import lexical_loss
from lexvla.model import list_checkpoints

sys.path.insert(0, str(Path(__file__).parent))
from test_train import THREADS, _free_port, shards  # noqa: E402,F401  (the module-scoped shard fixture)

ROOT = Path(__file__).resolve().parents[1]


def _cfg(shards: Path, out_dir: Path, **kw) -> T.TrainConfig:
    base = dict(data=DataConfig(urls=str(shards), batch_size=4, resampled=False, shuffle_buffer=16, num_workers=0),
                model="tiny", max_steps=4, warmup_steps=1, log_every=2, save_every=2, keep_checkpoints=2,
                out_dir=str(out_dir), mixed_precision="no", tracker="none", progress=False)
    return T.TrainConfig(**(base | kw))


@pytest.fixture
def on_meta(monkeypatch):
    "Runs made by `lexvla.train` put the model and every batch on the `meta` device (as accelerate would on `cuda`)."
    from accelerate.state import AcceleratorState, PartialState
    made = T.make_accelerator

    def make(cfg):
        acc = made(cfg)
        PartialState._shared_state["device"] = AcceleratorState._shared_state["device"] = torch.device("meta")
        assert acc.device.type == "meta"
        return acc
    monkeypatch.setattr(T, "make_accelerator", make)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)   # the next run of this process starts on the CPU again


def test_training_steps_logs_and_checkpoints_on_meta(shards, tmp_path, on_meta):
    "Steps, log entries, checkpoints and a resumption on another device than the CPU's default: no tensor is left behind."
    seen: list[set] = []

    def loss_fn(out, step, cfg):
        terms = lexical_loss(out, step, cfg)
        seen.append({v.device.type for v in terms.values()} | {v.device.type for v in out.values()})
        return terms

    cfg = _cfg(shards, tmp_path / "run")
    res = T.train(cfg, loss_fn=loss_fn, stop_at=2)
    assert res.step == 2 and seen == [{"meta"}] * 2
    assert all(p.device.type == "meta" for p in res.model.parameters())
    entry = res.history[-1]
    assert {"loss", "lambda_flops", "grad_norm", "active_words_img", "logit_scale"} <= set(entry)
    ck = list_checkpoints(tmp_path / "run")[-1][1]
    assert set(load_file(str(ck / "model.safetensors"))) == set(res.model.trainable_state_dict())
    res = T.train(cfg, loss_fn=loss_fn)   # resumes from step 2, on meta again
    assert res.resumed_from == ck and res.step == 4 and len(seen) == 4


def test_meta_run_catches_a_tensor_built_on_the_cpu(shards, tmp_path, on_meta):
    "The check these tests rely on: a tensor created without a device (so on the CPU) and mixed in stops the meta run."
    def cpu_term(out, step, cfg):
        terms = lexical_loss(out, step, cfg)
        return {**terms, "loss": terms["loss"] + torch.zeros(1)}   # would fail the same way on cuda
    with pytest.raises(RuntimeError, match="device"):
        T.train(_cfg(shards, tmp_path / "run", log_every=1, save_every=0), loss_fn=cpu_term)


# FSDP2 in two CPU processes (gloo), launched as `accelerate launch --config_file accelerate_fsdp_8gpu.yaml` would
# launch them, with bf16 parameters for compute. Each rank writes a result file (written whole, then renamed).
FSDP_SCRIPT = r"""
import json, os, sys, torch
from pathlib import Path
from lexvla.losses import lexical_loss
from lexvla.train import TrainConfig, train
from lexvla.core import ConfigError
cfg = TrainConfig.from_file(sys.argv[1])
dtypes = set()
def loss_fn(out, step, c):
    terms = lexical_loss(out, step, c)
    dtypes.update(str(v.dtype) for v in terms.values())
    return terms
full = train(cfg.replace(out_dir=cfg.out_dir + "/full"), loss_fn=loss_fn)
part = train(cfg.replace(out_dir=cfg.out_dir + "/part"), loss_fn=loss_fn, stop_at=2)
resumed = train(cfg.replace(out_dir=cfg.out_dir + "/part"), loss_fn=loss_fn)
a = {n: t.full_tensor() for n, t in full.model.trainable_state_dict().items()}
b = {n: t.full_tensor() for n, t in resumed.model.trainable_state_dict().items()}
sharded = all(type(t).__name__ == "DTensor" for t in full.model.trainable_state_dict().values())
try:
    train(cfg.replace(out_dir=cfg.out_dir + "/cached", model_overrides={"text": {"prefix_cache": True}}))
    refused = ""
except ConfigError as e: refused = str(e)
rank = int(os.environ["RANK"])
out = Path(sys.argv[2]) / f"result_{rank}.json"
out.parent.mkdir(parents=True, exist_ok=True)
tmp = out.with_suffix(".tmp")
tmp.write_text(json.dumps({"rank": rank, "same": all(torch.equal(a[n], b[n]) for n in a), "dtypes": sorted(dtypes),
                           "sharded": sharded, "resumed_from": str(resumed.resumed_from), "step": resumed.step,
                           "loss_full": [h["loss"] for h in full.history if "loss" in h],
                           "loss_resumed": [h["loss"] for h in resumed.history if "loss" in h], "refused": refused}))
os.replace(tmp, out)
"""


def _fsdp_env(num_processes: int) -> dict[str, str]:
    "The environment `accelerate launch` gives each process for the shipped FSDP config (read with accelerate's own code)."
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "lexvla/configs/accelerate_fsdp_8gpu.yaml"),
                                               "--num_processes", str(num_processes), "x.py"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}


def test_fsdp_two_processes_train_checkpoint_resume(shards, tmp_path):
    """FSDP2 on two gloo processes with the shipped FSDP config (bf16 compute): the loss terms are float32, the
    weights are sharded, checkpoints hold only the trainable weights and their unsharded optimizer state, and a
    paused run resumes to exactly the weights of an uninterrupted one. The prompt-prefix cache is refused."""
    cfg = _cfg(shards, tmp_path, mixed_precision="bf16", log_every=1,
               model_overrides={"text": {"prefix_cache": False, "gradient_checkpointing": True}})
    (tmp_path / "fsdp.yaml").write_text(cfg.to_yaml())
    (tmp_path / "fsdp.py").write_text(FSDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **THREADS, **_fsdp_env(2)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(_free_port()), str(tmp_path / "fsdp.py"), str(tmp_path / "fsdp.yaml"),
                        str(tmp_path / "results")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    results = [json.loads(f.read_text()) for f in sorted((tmp_path / "results").glob("result_*.json"))]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["sharded"] and r["dtypes"] == ["torch.float32"], r
        assert r["same"] and r["step"] == 4 and r["resumed_from"].endswith("step_000002")
        assert r["loss_full"] == r["loss_resumed"]
        assert "prefix_cache" in r["refused"] and "FSDP" in r["refused"]
    ck = tmp_path / "full" / "checkpoints" / "step_000004"
    state = json.loads((ck / "state.json").read_text())
    assert state["fsdp"] is True and state["world_size"] == 2
    weights = load_file(str(ck / "model.safetensors"))
    assert weights and all("lora_" in n or n.startswith(("vision.adapter", "vision.codebook")) or n == "logit_scale"
                           for n in weights)   # only what trains: no frozen LM, ViT or Z_txt weight
    optim = torch.load(ck / "optimizer.pt", weights_only=True)
    assert set(optim["state"]) == set(weights)   # one unsharded AdamW state per trainable tensor, by name
    for n, st in optim["state"].items(): assert st["exp_avg"].shape == weights[n].shape, n
