"""lexvla.train: exact resumption after SIGKILL, atomic checkpoints, NaN handling, the CLI and the shipped configs.

The training runs use the random `tiny` model on a few dozen synthetic image-caption pairs on the CPU.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

import lexvla
from lexvla.data import DataConfig, write_shards
from lexvla.losses import lexical_loss
from lexvla.train import TrainConfig, latest_checkpoint, list_checkpoints, model_config, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(lexvla.__file__).parent / "configs"
COLOURS = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40)}
SHAPES = ("square", "circle", "triangle")
N_STEPS = 12
# Bitwise comparisons between this process and the training subprocesses need the same CPU kernels: one thread each
# (a different thread count may change the order of floating-point reductions).
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sample(i: int) -> tuple[str, Image.Image, str, dict]:
    rng = np.random.default_rng(i)
    colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 3]
    img = Image.fromarray(rng.integers(0, 60, (40, 40, 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    x, y = rng.integers(4, 16, 2)
    box = (int(x), int(y), int(x) + 20, int(y) + 20)
    if shape == "square": d.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle": d.ellipse(box, fill=COLOURS[colour])
    else: d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[colour])
    return f"s{i:04d}", img, f"a {colour} {shape} on a dark background", {}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    write_shards((_sample(i) for i in range(48)), d, samples_per_shard=24)
    return d


def _cfg(shards: Path, out_dir: Path, **kw) -> TrainConfig:
    base = dict(data=DataConfig(urls=str(shards), batch_size=4, resampled=False, shuffle_buffer=16, num_workers=0),
                model="tiny", max_steps=N_STEPS, warmup_steps=2, lr_lora=1e-3, lr_adapter=1e-3, lr_codebook=1e-3,
                lr_logit_scale=1e-3, log_every=2, save_every=4, keep_checkpoints=3, out_dir=str(out_dir),
                mixed_precision="no", tracker="none", progress=False)
    return TrainConfig(**(base | kw))


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.trainable_state_dict().items()}


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [n for n in a if not torch.equal(a[n], b[n])]
    assert not diff, f"{len(diff)} of {len(a)} trainable tensors differ, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory):
    "The uninterrupted N_STEPS-step run: its weights and its logged losses."
    res = train(_cfg(shards, tmp_path_factory.mktemp("reference")))
    assert res.step == N_STEPS
    return _weights(res.model), [h["loss"] for h in res.history if "loss" in h]


def _run_cli(cfg: TrainConfig, tmp: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    path = tmp / "train.yaml"
    path.write_text(cfg.to_yaml())
    e = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **THREADS, **env}
    return subprocess.run([sys.executable, "-m", "lexvla.train", "--config", str(path), *args], cwd=tmp, env=e,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("hook,at,resume_from", [("kill_hooks:kill_at_step_10", 10, 8),
                                                  ("kill_hooks:kill_in_checkpoint_8", 8, 4)],
                         ids=["kill-between-checkpoints", "kill-while-writing-checkpoint"])
def test_resume_after_sigkill_is_bitwise_equal(shards, reference, tmp_path, hook, at, resume_from):
    "A run killed with SIGKILL (a callback of tests/kill_hooks.py) and resumed ends with exactly the weights of the uninterrupted run."
    out = tmp_path / "run"
    cfg = _cfg(shards, out)
    p = _run_cli(cfg, tmp_path, {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}, "--callback", hook)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps == [s for s in (4, 8) if s <= resume_from], steps
    ckdir = out / "checkpoints"
    assert (ckdir / "latest").read_text().strip() == f"step_{resume_from:06d}"
    if hook == "kill_hooks:kill_in_checkpoint_8":   # the half-written checkpoint is invisible under its final name
        assert (ckdir / f".step_{at:06d}.tmp").is_dir() and not (ckdir / f"step_{at:06d}").exists()
        assert not (ckdir / f".step_{at:06d}.tmp" / "state.json").exists()

    res = train(cfg)   # resume="auto"
    assert res.resumed_from.name == f"step_{resume_from:06d}" and res.step == N_STEPS
    weights, losses = reference
    _assert_bitwise_equal(_weights(res.model), weights)
    assert [h["loss"] for h in res.history if "loss" in h] == losses   # the history continues where it was saved
    assert [s for s, _ in list_checkpoints(out)] == [4, 8, 12]
    assert not [p.name for p in ckdir.iterdir() if p.name.startswith(".")]   # leftovers cleaned by the next save


def test_gradient_accumulation_pause_and_resume(shards, tmp_path):
    "With 2 micro-batches per step, a paused and resumed run equals an uninterrupted one; the data position counts micro-batches."
    cfg = _cfg(shards, tmp_path / "a", max_steps=6, gradient_accumulation_steps=2, save_every=3)
    full = train(cfg)
    state = json.loads((latest_checkpoint(tmp_path / "a") / "state.json").read_text())
    assert state["data"]["position"] == {"epoch": 0, "batches": 12}   # 6 steps x 2 micro-batches of 4 = the 48 samples
    cfg_b = cfg.replace(out_dir=str(tmp_path / "b"))
    assert train(cfg_b, stop_at=4).step == 4
    resumed = train(cfg_b)
    assert resumed.resumed_from.name == "step_000004"
    _assert_bitwise_equal(_weights(resumed.model), _weights(full.model))


def _tree_hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_nan_loss_stops_without_touching_the_last_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    seen: dict[str, dict] = {}

    def nan_at_7(o, step, cfg):
        terms = lexical_loss(o, step, cfg)
        if step + 1 == 7:   # snapshot the checkpoints as they were before the bad step, then poison the loss
            seen["before"] = _tree_hashes(out / "checkpoints")
            terms["loss"] = terms["loss"] + float("nan")
        return terms

    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 7"):
        train(_cfg(shards, out, save_every=2), loss_fn=nan_at_7)
    assert seen["before"] == _tree_hashes(out / "checkpoints")   # nothing written, changed or removed
    assert latest_checkpoint(out).name == "step_000006"
    assert "step_000006/model.safetensors" in seen["before"]


def test_inf_loss_names_the_step(shards, tmp_path):
    def inf_at_3(o, step, cfg):
        terms = lexical_loss(o, step, cfg)
        if step + 1 == 3: terms["loss"] = terms["loss"] * float("inf")
        return terms
    with pytest.raises(FloatingPointError, match=r"non-finite loss inf at step 3"):
        train(_cfg(shards, tmp_path / "run", save_every=0), loss_fn=inf_at_3)
    assert latest_checkpoint(tmp_path / "run") is None


def test_bf16_autocast_with_bf16_frozen_weights(shards, tmp_path):
    "mixed_precision bf16 (CPU autocast) with the frozen LM/ViT stored in bf16: trainables stay fp32, the loss is finite."
    res = train(_cfg(shards, tmp_path / "run", max_steps=2, save_every=0, mixed_precision="bf16", frozen_dtype="bfloat16"))
    m = res.model
    assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
    assert any(p.dtype == torch.bfloat16 for p in m.parameters() if not p.requires_grad)
    assert all(np.isfinite(h["loss"]) for h in res.history if "loss" in h)
    with pytest.raises(ValueError, match="frozen_dtype"):
        train(_cfg(shards, tmp_path / "run2", mixed_precision="no", frozen_dtype="bfloat16"))


def test_cli_help_and_print_config(tmp_path):
    p = subprocess.run([sys.executable, "-m", "lexvla.train", "--help"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert p.returncode == 0 and "--config" in p.stdout and "--set" in p.stdout, p.stderr[-2000:]
    p = subprocess.run([sys.executable, "-m", "lexvla.train", "--config", str(CONFIGS / "paper_cc12m.yaml"),
                        "--set", "data.batch_size=64", "--set", "lr_lora=3e-4", "--print-config"],
                       cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = TrainConfig.from_dict(yaml.safe_load(p.stdout))
    assert (cfg.data.batch_size, cfg.lr_lora, cfg.model) == (64, 3e-4, "paper")


def test_main_guard_is_inert_under_nbdev_test():
    "nbdev_test runs notebook cells with __name__ == '__main__': the exported guard cell must not call main() there."
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    cell = next(c.source for c in read_nb(ROOT / "nbs" / "lib" / "76_training.ipynb").cells if 'if __name__ == "__main__"' in c.source)
    sh = CaptureShell()
    sh.run("called = []\ndef main(*args): called.append(args)")
    sh.run(cell)
    sh.run("assert __name__ == '__main__' and called == []")
    assert sh.exc is None, sh.exc


def test_shipped_train_configs():
    paper = TrainConfig.from_file(CONFIGS / "paper_cc12m.yaml")
    assert (paper.model, paper.mixed_precision, paper.frozen_dtype, paper.data.batch_size) == ("paper", "bf16", "bfloat16", 128)
    assert model_config(paper).text.gradient_checkpointing
    assert TrainConfig.from_file(CONFIGS / "tiny_scenes.yaml").model == "tiny"


@pytest.mark.parametrize("name,kind", [("accelerate_ddp_8gpu.yaml", "MULTI_GPU"), ("accelerate_fsdp_8gpu.yaml", "FSDP")])
def test_accelerate_configs_load(name, kind, monkeypatch):
    "accelerate's own loader and `accelerate launch` argument handling accept the shipped configs."
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = str(CONFIGS / name)
    c = load_config_from_file(path)
    assert (c.distributed_type.value, c.num_processes, c.mixed_precision) == (kind, 8, "bf16")
    args = launch_command_parser().parse_args(["--config_file", path, "-m", "lexvla.train", "--config", "x.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    assert (args.multi_gpu, args.use_fsdp) == ((True, False) if kind == "MULTI_GPU" else (False, True))
    if kind == "FSDP":   # the environment accelerate launch would hand to each process, read back by the FSDP plugin
        from accelerate.utils import FullyShardedDataParallelPlugin
        env = prepare_multi_gpu_env(args)
        for k, v in env.items():
            if k.startswith(("FSDP_", "ACCELERATE_")): monkeypatch.setenv(k, v)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer", "Dinov2Layer"]
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"
        # the classes to wrap exist in a LexVLA model
        from lexvla.pretrained import create_model
        classes = {type(m).__name__ for m in create_model("tiny").modules()}
        assert {"LlamaDecoderLayer", "Dinov2Layer"} <= classes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Each rank writes its own result file (written whole, then renamed): two ranks printing to one shared stdout can
# interleave their lines under load, which once made this test fail although training was fine.
DDP_SCRIPT = r"""
import json, os, sys, torch
from pathlib import Path
from lexvla.train import TrainConfig, train
cfg = TrainConfig.from_file(sys.argv[1])
full = train(cfg.replace(out_dir=cfg.out_dir + "/full"))
part = train(cfg.replace(out_dir=cfg.out_dir + "/part"), stop_at=3)
resumed = train(cfg.replace(out_dir=cfg.out_dir + "/part"))
a, b = full.model.trainable_state_dict(), resumed.model.trainable_state_dict()
same = all(torch.equal(a[n], b[n]) for n in a)
rank = int(os.environ["RANK"])
out = Path(sys.argv[2]) / f"result_{rank}.json"
out.parent.mkdir(parents=True, exist_ok=True)
tmp = out.with_suffix(".tmp")
tmp.write_text(json.dumps({"rank": rank, "same": same, "resumed_from": str(resumed.resumed_from), "step": resumed.step,
                           "loss_full": [h["loss"] for h in full.history if "loss" in h],
                           "loss_resumed": [h["loss"] for h in resumed.history if "loss" in h]}))
os.replace(tmp, out)
"""


def test_two_process_ddp_pause_and_resume(shards, tmp_path):
    "Two CPU processes (torchrun, gloo DDP): per-rank data, cross-rank negatives, per-rank RNG files; resumption is exact."
    cfg = _cfg(shards, tmp_path, max_steps=5, save_every=0, log_every=1)
    (tmp_path / "ddp.yaml").write_text(cfg.to_yaml())
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **THREADS}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(_free_port()), str(tmp_path / "ddp.py"), str(tmp_path / "ddp.yaml"),
                        str(tmp_path / "results")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    files = sorted((tmp_path / "results").glob("result_*.json"))
    assert [f.name for f in files] == ["result_0.json", "result_1.json"], files   # one file per rank
    results = [json.loads(f.read_text()) for f in files]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["same"] and r["step"] == 5 and r["resumed_from"].endswith("step_000003")
        assert r["loss_full"] == r["loss_resumed"]
    state = json.loads((tmp_path / "full" / "checkpoints" / "step_000005" / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 5 * 2 * 4
    assert {p.name for p in (tmp_path / "full" / "checkpoints" / "step_000005").glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}
    assert abs(state["history"][0]["nce"] - np.log(8)) < 0.5   # 8 = 2 ranks x 4: negatives from both ranks
