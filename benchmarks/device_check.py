#!/usr/bin/env python
"""One script for a lent GPU: does LexVLA train and evaluate on CUDA, how fast is the paper model, and how far the
optimised step goes. Each part runs in its own process under its own time limit; what it measured is saved as it
goes, so a part cut short still leaves its earlier results.

    # on the GPU machine (writes into OUT; parts: cuda, bench):
    PYTHONPATH=. python benchmarks/device_check.py --out $OUT
    # the same on a CPU, small (tiny shapes, a 2-layer LM at the paper's widths):
    PYTHONPATH=. python benchmarks/device_check.py --out /tmp/devcheck --cpu-smoke
    # back on a CPU: does the checkpoint written on the GPU give the same vectors here?
    PYTHONPATH=. python benchmarks/device_check.py --verify OUT

Part `cuda` (the `tiny` config, random weights, on the scene world, through `nbs/train.ipynb`'s paper-scale path):
a first launch of `python -m lexvla.train` is killed (SIGKILL) after step 10; `train.ipynb` (papermill, bf16, one
process) resumes it from its last checkpoint, trains to the end and evaluates the final checkpoint; `evaluate.ipynb`
evaluates it again on the world's Karpathy and VOC sets; the final checkpoint, and the vectors it gives on the GPU
for fixed inputs (float32 with TF32 off, and under bf16 autocast), are saved for `--verify`.

Part `bench`: `benchmarks/bench_paper.py` on the `paper` config (random weights, the real shapes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILL_AT = 10   # tests/kill_hooks.py:kill_at_step_10


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None, cwd: Path = ROOT) -> dict:
    "Run `cmd`, appending its output to `log`; its exit code and seconds (exit code None: stopped at `timeout`)."
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n"); f.flush()
        try: code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd,
                                   timeout=timeout).returncode
        except subprocess.TimeoutExpired: code = None
    return {"cmd": shlex.join(cmd), "exitcode": code, "seconds": round(time.perf_counter() - t, 1)}


def tail(log: Path, n: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def part_cuda(out: Path, work: Path, summary: dict, budget: float, args_steps: int = 120) -> None:
    import torch
    from lexvla.scenes import build_world
    from lexvla.train import latest_checkpoint, list_checkpoints, prepare_run
    t0, log = time.perf_counter(), out / "cuda.log"
    left = lambda: max(10.0, budget - (time.perf_counter() - t0))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = summary["cuda"] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "steps": {}}
    world = build_world(work / "world", n_train=512, n_test=64, image_size=32, progress=False)
    s["world"] = {"n_train": world.n_train, "n_test": world.n_test, "image_size": world.config.image_size}
    run_dir = work / "tiny_run"
    train_set = [f"max_steps={args_steps}", "save_every=10", "log_every=10", "warmup_steps=8", "data.batch_size=32",
                 *(f"lr_{g}=3e-3" for g in ("lora", "adapter", "codebook", "logit_scale")),
                 f"mixed_precision={'bf16' if device == 'cuda' else repr('no')}", "progress=false", "data.num_workers=2"]
    cfg, run_file = prepare_run(ROOT / "lexvla/configs/tiny_scenes.yaml", run_dir, str(world.root / "train"), train_set)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # 1. a launch killed after step KILL_AT: its last checkpoint survives
    s["steps"]["killed_launch"] = r = run([sys.executable, "-m", "lexvla.train", "--config", str(run_file), "--callback",
                                          f"kill_hooks:kill_at_step_{KILL_AT}"], log, left(), env)
    s["killed_at"], s["checkpoints_after_kill"] = KILL_AT, [st for st, _ in list_checkpoints(run_dir)]
    # 2. train.ipynb's paper-scale path resumes it, finishes, and evaluates the final checkpoint
    nb_out = work / "nb"; nb_out.mkdir(exist_ok=True)
    bench = {"flickr30k": str(world.karpathy_json.parent), "voc": str(world.voc_dir)}
    params = {"train_config": str(ROOT / "lexvla/configs/tiny_scenes.yaml"), "out_dir": str(run_dir),
              "data_urls": str(world.root / "train"), "num_processes": 1, "train_set": train_set, "benchmarks": bench}
    s["steps"]["train_notebook"] = run([sys.executable, "-m", "papermill", "--log-output", "train.ipynb",
                                        str(nb_out / "train.ipynb"), "-y", json.dumps(params)], log, left(), env, ROOT / "nbs")
    text = log.read_text(errors="replace")
    s["resumed_from_step"] = next((int(l.split("resuming from step ")[1].split()[0]) for l in text.splitlines()
                                   if "resuming from step " in l), None)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        st = json.loads((ckpt / "state.json").read_text())
        losses = [(h["step"], round(h["loss"], 4), round(h["nce"], 4)) for h in st["history"] if "loss" in h]
        s["final_step"], s["losses"], s["nce_chance"] = st["step"], losses, round(math.log(32), 4)   # (step, loss, nce)
        s["nce_falls"] = bool(losses) and min(l[2] for l in losses[len(losses) // 2:]) < losses[0][2] - 0.05
        for f in ("table1_retrieval.md", "table2_patchdis.md"):
            if (run_dir / "eval" / f).is_file(): s[f"train_nb_{f}"] = (run_dir / "eval" / f).read_text()
        # 3. the vectors of the final checkpoint on this device, for --verify on a CPU
        s["vectors"] = save_vectors(ckpt, world, out / "vectors.pt", device)
        with tarfile.open(out / "checkpoint.tar", "w") as tar: tar.add(ckpt, arcname="checkpoint")
    # 4. evaluate.ipynb on the same checkpoint
    ev = work / "eval"; ev.mkdir(exist_ok=True)
    s["steps"]["evaluate_notebook"] = run([sys.executable, "-m", "papermill", "--log-output", "evaluate.ipynb",
                                           str(nb_out / "evaluate.ipynb"), "-p", "checkpoint", str(run_dir), "-p", "flickr30k",
                                           bench["flickr30k"], "-p", "voc", bench["voc"], "-p", "out_dir", str(ev)],
                                          log, left(), env, ROOT / "nbs")
    for f in sorted(ev.glob("*.md")): s[f"evaluate_nb_{f.name}"] = f.read_text()
    s["seconds"] = round(time.perf_counter() - t0, 1)


def fixed_inputs(world) -> tuple[list[Path], list[str]]:
    "The first 16 held-out images of the world's Karpathy file and their first captions."
    d = json.loads(Path(world.karpathy_json).read_text())
    imgs = [i for i in d["images"] if i.get("split") == "test"][:16]
    folder = Path(world.karpathy_json).parent
    paths = [next(p for p in (folder / "images" / i["filename"], folder / i["filename"]) if p.exists()) for i in imgs]
    return paths, [i["sentences"][0]["raw"] for i in imgs]


def encode(model, paths, captions, device: str, bf16: bool):
    import torch
    from PIL import Image
    ctx = torch.autocast(device, dtype=torch.bfloat16) if bf16 else torch.autocast(device, enabled=False)
    with torch.no_grad(), ctx:
        return (model.encode_image([Image.open(p) for p in paths]).float().cpu(),
                model.encode_text(captions).float().cpu())


def save_vectors(ckpt: Path, world, path: Path, device: str) -> dict:
    import torch
    from lexvla.pretrained import from_pretrained
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # float32 means float32
    model = from_pretrained(ckpt, device=device).eval()
    paths, caps = fixed_inputs(world)
    img32, txt32 = encode(model, paths, caps, device, bf16=False)
    img16, txt16 = encode(model, paths, caps, device, bf16=True)
    torch.save({"images": [p.name for p in paths], "captions": caps, "image_fp32": img32, "text_fp32": txt32,
                "image_bf16": img16, "text_bf16": txt16}, path)
    return {"n": len(paths), "bf16_vs_fp32_max_abs": {"image": float((img16 - img32).abs().max()),
                                                      "text": float((txt16 - txt32).abs().max())}}


def verify(out: Path) -> dict:
    "On a CPU: rebuild the checkpoint of `out/checkpoint.tar`, encode the same inputs, compare with the GPU's vectors."
    import tempfile
    import torch
    from PIL import Image
    from lexvla.pretrained import from_pretrained
    from lexvla.scenes import build_world
    gpu = torch.load(out / "vectors.pt", weights_only=True)
    with tempfile.TemporaryDirectory() as d:
        with tarfile.open(out / "checkpoint.tar") as tar: tar.extractall(d, filter="data")
        model = from_pretrained(Path(d) / "checkpoint", device="cpu").eval()
        world = build_world(Path(d) / "world", n_train=512, n_test=64, image_size=32, progress=False)
        paths, caps = fixed_inputs(world)
        assert [p.name for p in paths] == gpu["images"] and caps == gpu["captions"], "the world differs from the GPU's"
        img, txt = encode(model, paths, caps, "cpu", bf16=False)
    res = {f"{k}_{p}_max_abs": float((v - gpu[f"{k}_{p}"]).abs().max()) for k, v in (("image", img), ("text", txt))
           for p in ("fp32", "bf16")}
    res["same_top10_words"] = float(sum((img[i].topk(10).indices == gpu["image_fp32"][i].topk(10).indices).all()
                                        for i in range(len(img))) / len(img))
    print(json.dumps(res, indent=1))
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lexvla_device_check"))
    ap.add_argument("--parts", default="cuda,bench")
    ap.add_argument("--cuda-budget", type=float, default=150, help="seconds for part cuda")
    ap.add_argument("--steps", type=int, default=120, help="training steps of part cuda")
    ap.add_argument("--bench-budget", type=float, default=330, help="seconds for part bench")
    ap.add_argument("--bench-args", default="", help="extra arguments for bench_paper.py")
    ap.add_argument("--cpu-smoke", action="store_true", help="small shapes for a CPU run of the whole script")
    ap.add_argument("--verify", type=Path, help="an OUT folder of a GPU run: compare its vectors with this CPU's")
    args = ap.parse_args(argv)
    if args.verify: verify(args.verify); return
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    if work.exists(): shutil.rmtree(work)
    work.mkdir(parents=True)
    summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
    save = lambda: (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    parts = args.parts.split(",")
    if "cuda" in parts:
        try: part_cuda(out, work, summary, args.cuda_budget, args.steps)
        except Exception as e:
            import traceback
            summary.setdefault("cuda", {})["error"] = traceback.format_exc()[-3000:]
        save()
    if "bench" in parts:
        small = ["--lm-layers", "2", "--device", "cpu", "--batch", "2", "--infer-batch", "2", "--steps", "1", "--warmup", "1",
                 "--variants", "baseline,fp32_opt,optimised"] if args.cpu_smoke else \
                ["--variants", "baseline,fp32_opt,optimised,optimised_ckpt,optimised_compile", "--max-batch", "optimised_ckpt",
                 "--mem-caps", "40,80", "--deadline", str(0.8 * args.bench_budget)]
        cmd = [sys.executable, "benchmarks/bench_paper.py", "--config", "paper", "--out", str(out / "bench_paper.json"),
               *small, *shlex.split(args.bench_args)]
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        summary["bench"] = run(cmd, out / "bench.log", args.bench_budget, {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1",
                                                                         "PYTHONUNBUFFERED": "1"})
        summary["bench"]["log_tail"] = tail(out / "bench.log")
        save()
    summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(json.dumps({k: v for k, v in summary.items() if k != "cuda"}, indent=1, default=str)[:4000])
    if "cuda" in summary: print(json.dumps({k: v for k, v in summary["cuda"].items() if "md" not in k}, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
