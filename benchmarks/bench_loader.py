"""How many image-caption pairs one data-loader core delivers from img2dataset-layout shards, and so how many loader
workers a GPU needs to be fed at the paper's step.

The shards are written as img2dataset writes CC-12M (`--image_size 256 --resize_mode keep_ratio`, JPEG quality 95,
`{key}.jpg/.txt/.json` members, `_stats.json` beside each tar): `photo` crops of a real photograph (matplotlib's
sample `grace_hopper.jpg`, 512 x 600) at CC-12M-like aspect ratios (3:4 to 16:9), the shorter side scaled to 256,
with captions of CC-12M's length distribution (bench_paper.make_captions); or `scenes`, the captioned-scene world
(lexvla.scenes) at 256 px, flat colours that compress ~4x smaller than photos. Every stage runs in this one process
on one thread (one core), which is what one DataLoader worker is:

- `read`: the tar members grouped into samples (lexvla.data.read_shard);
- `decode`: PIL's JPEG decoder (libjpeg-turbo in Pillow's wheels), full size, as lexvla.data.decode_sample does;
- `resize_crop`: lexvla.vision.image_bytes at 224 px (bicubic resize of the shorter side, centre crop, uint8),
  which resamples only the region the crop keeps; `resize_crop_full`: resizing the whole image, then cropping (what
  lexvla did before, and the reference pixels below);
- decode + resize + crop to 224, timed together, for the reference (`full_resize`: PIL decode, whole-image bicubic
  resize, crop), for lexvla's path (`lexvla`: PIL decode, image_bytes) and for the options a user would reach for,
  each compared with the reference pixels: `pil_draft` (PIL's JPEG draft mode, DCT scaling by 1/2, 1/4, 1/8, then
  image_bytes), and where they install `simplejpeg` (libjpeg-turbo decoding at reduced size, 7/8 for 256 -> 224,
  then crop), `cv2` (OpenCV decode and bicubic resize), `torchvision` (torchvision.io.decode_jpeg, antialiased
  bicubic resize);
- `pipeline`: lexvla.data.PairLoader with lexvla.train.image_transform of the paper model, num_workers=0: the whole
  per-sample path of one worker (read, decode, resize, crop, batch of 128);
- `tokenise`: the paper's Llama-2 tokenizer on the captions, in batches of 128 (this runs in the training process,
  in the text tower, not in the loader workers).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_loader.py --out benchmarks/results/cpu_loader.json

The JSON records the load average before and after: timings on a shared machine carry the other jobs' load.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import numpy as np
import PIL
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paper import make_captions  # noqa: E402

from lexvla.config import get_config  # noqa: E402
from lexvla.data import DataConfig, PairLoader, read_shard, write_shards  # noqa: E402
from lexvla.train import image_transform  # noqa: E402
from lexvla.vision import image_bytes  # noqa: E402

SIZE = 224          # the paper model's input (DINOv2 ViT-B/14: 16 x 16 patches)
SHARD_SIDE = 256    # img2dataset --image_size 256 --resize_mode keep_ratio: the shorter side
RESULTS = Path(__file__).resolve().parent / "results"


def photo_samples(n: int, seed: int = 0):
    "(key, image, caption, meta): crops of a real photograph, 3:4 to 16:9, the shorter side scaled to 256 (keep_ratio)."
    import matplotlib
    src = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    rng, caps = np.random.default_rng(seed), make_captions(n, random.Random(seed))
    for i in range(n):
        ar = rng.uniform(0.75, 16 / 9)                             # width / height
        w = int(rng.integers(160, src.width + 1)); h = min(src.height, max(120, round(w / ar)))
        x, y = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1))
        im = src.crop((x, y, x + w, y + h))
        if rng.random() < 0.5: im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        s = SHARD_SIDE / min(im.size)
        yield f"p{i:06d}", im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC), caps[i], {}


def build_shards(kind: str, n: int, folder: Path, per_shard: int) -> list[Path]:
    if kind == "photo": return write_shards(photo_samples(n), folder, samples_per_shard=per_shard)
    from lexvla.scenes import SceneConfig, build_world
    world = build_world(folder / "world", n_train=n, n_test=0, n_val=0, config=SceneConfig(image_size=SHARD_SIDE,
                        samples_per_shard=per_shard), progress=False)
    return list(world.shards)


def rate(fn, items, repeats: int) -> float:
    "Items per second of `fn` over `items`, the best of `repeats` passes."
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for x in items: fn(x)
        best = min(best, time.perf_counter() - t)
    return len(items) / best


# --- decode + resize + crop to SIZE: the reference and the options -----------------------------------------------
def pil_decode(b: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(b)); im.load()
    return im.convert("RGB")

def full_resize_crop(img: Image.Image, size: int) -> Image.Image:
    "Resize the whole image (shorter side to `size`, bicubic), then crop the centre: lexvla's path before box resizing."
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    l, t = (nw - size) // 2, (nh - size) // 2
    return img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0 if s < 0.5 else None).crop((l, t, l + size, t + size))

def reference(b: bytes) -> np.ndarray:
    return np.asarray(full_resize_crop(pil_decode(b), SIZE))

def lexvla_path(b: bytes) -> np.ndarray:
    return image_bytes(pil_decode(b), SIZE).permute(1, 2, 0).numpy()

def pil_draft(b: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(b)); im.draft("RGB", (SIZE, SIZE)); im.load()
    return image_bytes(im.convert("RGB"), SIZE).permute(1, 2, 0).numpy()

def _centre(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    t, l = (h - SIZE) // 2, (w - SIZE) // 2
    return a[t:t + SIZE, l:l + SIZE]

def options(tv_path: str | None = None) -> dict:
    "The decode options that import here: name -> (function bytes -> HxWx3 uint8, note)."
    opts = {"lexvla": (lexvla_path, "PIL decode; lexvla.vision.image_bytes, which resizes only the region the centre crop keeps"),
            "pil_draft": (pil_draft, "PIL draft mode: DCT scaling by 1/2, 1/4 or 1/8 while the image stays >= 224 px, then image_bytes")}
    try:
        import simplejpeg
        def sj(b: bytes) -> np.ndarray:
            a = simplejpeg.decode_jpeg(b, "RGB", min_height=SIZE, min_width=SIZE)   # libjpeg-turbo scales by k/8
            return _centre(np.asarray(Image.fromarray(a).resize(_short_side(a.shape[1], a.shape[0]), Image.BICUBIC))
                           if min(a.shape[:2]) != SIZE else a)
        opts["simplejpeg"] = (sj, f"simplejpeg {simplejpeg.__version__}: libjpeg-turbo decodes at the scale k/8 nearest above 224 px, then crop")
    except ImportError: pass
    try:
        import cv2
        cv2.setNumThreads(1)
        def cv(b: bytes) -> np.ndarray:
            a = cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            return _centre(cv2.resize(a, _short_side(a.shape[1], a.shape[0]), interpolation=cv2.INTER_CUBIC))
        opts["cv2"] = (cv, f"OpenCV {cv2.__version__}: imdecode, INTER_CUBIC resize, crop")
    except ImportError: pass
    probe = subprocess.run([sys.executable, "-c", "import torchvision.io"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tv_path, os.environ.get("PYTHONPATH")]))})
    if probe.returncode != 0:   # probed in another process: a broken torchvision also breaks transformers' imports here
        opts["torchvision"] = (None, "does not import here: " + (probe.stderr.strip().splitlines() or ["?"])[-1][:300])
        return opts
    if tv_path: sys.path.insert(0, tv_path)
    try:
        import torchvision
        from torchvision.io import decode_jpeg
        from torchvision.transforms.v2.functional import center_crop, resize
        def tv(b: bytes) -> np.ndarray:
            x = decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))
            return center_crop(resize(x, SIZE, antialias=True, interpolation=3), SIZE).permute(1, 2, 0).numpy()
        opts["torchvision"] = (tv, f"torchvision {torchvision.__version__}: decode_jpeg, antialiased bicubic resize, crop")
    except Exception as e: opts["torchvision"] = (None, f"does not import here: {type(e).__name__}: {str(e)[:200]}")
    return opts

def _short_side(w: int, h: int) -> tuple[int, int]:
    s = SIZE / min(w, h)
    return max(SIZE, round(w * s)), max(SIZE, round(h * s))

def deviation(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - ref.astype(np.int16)).ravel()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="photo,scenes", help="shard sets: photo, scenes (comma-separated)")
    p.add_argument("--n", type=int, default=1000, help="samples per set")
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--repeats", type=int, default=3, help="passes per stage; the best is reported")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--gpu-result", default=str(RESULTS / "h200_paper_b128.json"), help="bench_paper result for the step rate")
    p.add_argument("--gpu-variant", default="optimised_pad")
    p.add_argument("--margin", type=float, default=0.5, help="headroom on top of the bare worker count (0.5: +50%%)")
    p.add_argument("--torchvision-from", default=None, help="a folder holding a (throw-away) torchvision install to try")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    res: dict = {"args": vars(args), "meta": {
        "python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__,
        "cpu": next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor(),
        "cores": os.cpu_count(), "loadavg_before": load0}, "sets": {}}
    tf = image_transform(get_config("paper"))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.images.split(","):
            shards = build_shards(kind, args.n, Path(tmp) / kind, args.per_shard)
            samples = [s for u in shards for s in read_shard(str(u))]
            jpgs, caps = [s["jpg"] for s in samples], [s["txt"].decode() for s in samples]
            sizes = [Image.open(io.BytesIO(b)).size for b in jpgs[:200]]
            r: dict = {"samples": len(samples), "shards": len(shards), "jpeg_kib_mean": float(np.mean([len(b) for b in jpgs]) / 1024),
                       "size_example": sizes[0], "aspect_range": [round(min(w / h for w, h in sizes), 2), round(max(w / h for w, h in sizes), 2)]}
            r["read"] = rate(lambda u: sum(1 for _ in read_shard(str(u))), shards, args.repeats) * len(samples) / len(shards)
            r["decode"] = rate(pil_decode, jpgs, args.repeats)
            decoded = [pil_decode(b) for b in jpgs]
            r["resize_crop"] = rate(lambda im: image_bytes(im, SIZE), decoded, args.repeats)
            r["resize_crop_full"] = rate(lambda im: full_resize_crop(im, SIZE), decoded, args.repeats)
            r["full_resize"] = rate(reference, jpgs, args.repeats)
            refs = [reference(b) for b in jpgs]
            r["options"] = {}
            for name, (fn, note) in options(args.torchvision_from).items():
                if fn is None: r["options"][name] = {"note": note}; continue
                d = np.concatenate([deviation(fn(b), ref) for b, ref in zip(jpgs, refs)])
                r["options"][name] = {"note": note, "samples_per_s": rate(fn, jpgs, args.repeats),
                                      "identical": float((d == 0).mean()), "within_1": float((d <= 1).mean()),
                                      "mean_abs": float(d.mean()), "p99": float(np.percentile(d, 99)), "max": int(d.max())}
            if "pil_draft" in r["options"]:
                im = Image.open(io.BytesIO(jpgs[0])); im.draft("RGB", (SIZE, SIZE))
                r["options"]["pil_draft"]["decoded_size_example"] = im.size
            cfg = DataConfig(urls=[str(u) for u in shards], batch_size=args.batch, shuffle_buffer=1000, resampled=False,
                             num_workers=0, drop_last=False)
            def epoch(_):
                return sum(len(b["text"]) for b in PairLoader(cfg, tf, rank=0, world_size=1))
            r["pipeline"] = rate(epoch, [0], args.repeats) * len(samples)
            from lexvla.pretrained import load_tokenizer
            tok = load_tokenizer(get_config("paper").text)
            batches = [caps[i:i + args.batch] for i in range(0, len(caps), args.batch)]
            r["tokenise"] = rate(lambda c: tok(c, add_special_tokens=False), batches, args.repeats) * len(caps) / len(batches)
            for rs in ("resize_crop", "resize_crop_full"):   # where a sample's time goes, with each resize
                total = r["read"] ** -1 + r["decode"] ** -1 + r[rs] ** -1
                r[f"share_{rs}"] = {k: r[k] ** -1 / total for k in ("read", "decode", rs)}
            res["sets"][kind] = r
            print(f"{kind}: {r['samples']} samples, {r['jpeg_kib_mean']:.1f} KiB per JPEG; samples/s on one core: read "
                  f"{r['read']:.0f}, decode {r['decode']:.0f}, resize+crop {r['resize_crop']:.0f} (whole-image resize "
                  f"{r['resize_crop_full']:.0f}), pipeline {r['pipeline']:.0f}, "
                  f"tokenise {r['tokenise']:.0f}", flush=True)
            for name, o in r["options"].items():
                print(f"  {name}: " + (f"{o['samples_per_s']:.0f}/s (reference {r['full_resize']:.0f}/s), identical "
                                      f"{o['identical']:.4f}, within 1 level {o['within_1']:.5f}, mean |d| {o['mean_abs']:.3f}, max {o['max']}"
                                      if "samples_per_s" in o else o["note"]), flush=True)
    res["meta"]["loadavg_after"] = os.getloadavg()
    gpu = json.loads(Path(args.gpu_result).read_text())
    step = gpu["train"][args.gpu_variant]["samples_per_s"]
    core = res["sets"]["photo" if "photo" in res["sets"] else next(iter(res["sets"]))]["pipeline"]
    res["workers"] = {"gpu": gpu["meta"].get("gpu"), "variant": args.gpu_variant, "batch": gpu["train"][args.gpu_variant]["batch"],
                      "gpu_samples_per_s": step, "core_samples_per_s": core, "margin": args.margin,
                      "bare": step / core, "per_gpu": max(1, math.ceil(step * (1 + args.margin) / core)),
                      "formula": "workers per GPU = ceil(r_gpu * (1 + margin) / r_core)"}
    w = res["workers"]
    print(f"{w['gpu']} {w['variant']}: {step:.1f} samples/s per GPU / {core:.0f} per loader core = {w['bare']:.2f} cores; "
          f"with {args.margin:.0%} headroom: {w['per_gpu']} worker(s) per GPU", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
