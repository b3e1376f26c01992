"""A short end-to-end check of an installed lexvla: what a new user does first, in a few minutes on a CPU.

    python tests/smoke.py [--out numbers.json]

Run it with the Python of the environment to check (`tests/compat.py` runs it in fresh environments at both ends of
settings.ini's version ranges). Offline (HF_HUB_OFFLINE=1 is set here); set LEXVLA_CACHE to a fresh folder to
exercise the weight conversions too. Steps:

1. import every module of the package (and the plotting libraries the experiment notebooks use);
2. build `smol` (SmolLM2-135M from its GGUF file, the DINOv2 ViT-S/14 from its ONNX file): no Hub kernels requested;
3. encode an image and two captions; read their top words; draw a word cloud and a figure;
4. train the random `tiny` model for one optimizer step (accelerate, tensorboard logging, a checkpoint);
5. save it with `save_pretrained`, reload it and its training checkpoint with `from_pretrained`: the same weights and
   the same vectors, bit for bit.

Any deprecation notice raised on the way (a FutureWarning or DeprecationWarning, or a transformers log line that says
"deprecated") fails the run: lexvla must call its dependencies through the interfaces they keep. The numbers of step 3
go to `--out` (JSON), so that two environments can be compared (`tests/compat.py`).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

IMAGE_SIZE = 160
CAPTIONS = ["a red square and a blue circle on a grey background", "a green triangle"]


class _Records(logging.Handler):
    "Keeps the warnings that libraries log (transformers reports most deprecations through its logger)."
    def __init__(self): super().__init__(logging.WARNING); self.records: list[str] = []
    def emit(self, record: logging.LogRecord) -> None: self.records.append(f"[{record.name}] {record.getMessage()}")


def _image():
    "A deterministic test image made with NumPy arithmetic only (no drawing library whose rendering could change)."
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / IMAGE_SIZE
    img = np.stack([0.5 + 0 * x, 0.5 + 0 * x, 0.5 + 0 * x], -1)                       # grey background
    img[(x > 0.1) & (x < 0.45) & (y > 0.15) & (y < 0.5)] = (0.85, 0.1, 0.1)           # red square
    img[(x - 0.7) ** 2 + (y - 0.65) ** 2 < 0.04] = (0.1, 0.2, 0.85)                   # blue circle
    return Image.fromarray((img * 255).round().astype(np.uint8))


def _samples(n: int):
    "n small (key, image, caption, meta) pairs for one training step of `tiny`."
    import numpy as np
    from PIL import Image
    colours = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40)}
    for i in range(n):
        name, rgb = list(colours.items())[i % 4]
        rng = np.random.default_rng(i)
        img = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
        r, c = rng.integers(2, 18, 2)
        img[r:r + 20, c:c + 20] = rgb
        yield f"s{i:04d}", Image.fromarray(img), f"a {name} square on a dark background", {}


def _step(name: str, t0: float, times: dict) -> None:
    times[name] = round(time.time() - t0, 1)
    print(f"  {name}: {times[name]} s", flush=True)


def _no_hub_kernels(model) -> list[str]:
    "Names of the transformers models inside `model` that have hub kernels switched on (should be none)."
    from transformers import PreTrainedModel
    return [n or "model" for n, m in model.named_modules() if isinstance(m, PreTrainedModel) and getattr(m, "use_kernels", False)]


def run(tmp: Path) -> dict:
    times, t0 = {}, time.time()
    import torch
    torch.manual_seed(0)
    import lexvla
    mods = [m.name for m in pkgutil.iter_modules(lexvla.__path__) if not m.name.startswith("_")]
    for m in mods: importlib.import_module(f"lexvla.{m}")
    import matplotlib.pyplot as plt
    import seaborn  # noqa: F401 (the experiment notebooks' plots)
    print(f"lexvla {lexvla.__version__} from {Path(lexvla.__file__).parent}; {len(mods)} modules imported")
    _step("import", t0, times)

    from lexvla.interpret import cloud_figure, word_cloud
    from lexvla.pretrained import create_model, from_pretrained
    t0 = time.time()
    smol = create_model("smol").eval()
    assert not _no_hub_kernels(smol), f"hub kernels switched on in {_no_hub_kernels(smol)}"
    _step("build smol", t0, times)

    t0 = time.time()
    image = _image()
    with torch.no_grad():
        img, txt = smol.encode_image([image]), smol.encode_text(CAPTIONS)
    sims = (img @ txt.T)[0]
    for v in (img[0], *txt):
        assert (v >= 0).all() and abs(float(v.norm()) - 1) < 1e-4, "lexical vectors are non-negative with unit norm"
    top_img, top_txt = smol.top_words(img[0], 8), [smol.top_words(t, 8) for t in txt]
    print(f"  image: {[w for w, _ in top_img]}\n  caption 0: {[w for w, _ in top_txt[0]]}\n"
          f"  image·captions: {[round(float(s), 4) for s in sims]}")
    wc = word_cloud(dict(top_img))
    plt.close(cloud_figure(smol, image))
    assert wc.size == (400, 300)
    _step("encode and read", t0, times)

    t0 = time.time()
    from lexvla.data import DataConfig, write_shards
    from lexvla.train import TrainConfig, train
    write_shards(_samples(8), tmp / "shards", samples_per_shard=8)
    cfg = TrainConfig(data=DataConfig(urls=str(tmp / "shards"), batch_size=4, resampled=False, shuffle_buffer=0,
                                      num_workers=0), model="tiny", max_steps=1, warmup_steps=0, save_every=1,
                      out_dir=str(tmp / "run"), mixed_precision="no", tracker="tensorboard", progress=False)
    res = train(cfg)
    loss = [h["loss"] for h in res.history if "loss" in h]
    assert res.step == 1 and len(loss) == 1 and loss[0] == loss[0] and abs(loss[0]) < float("inf"), res.history
    assert not _no_hub_kernels(res.model), "hub kernels switched on in tiny"
    assert list((tmp / "run").rglob("events.out.tfevents*")), "no tensorboard log written"
    _step("train tiny 1 step", t0, times)

    t0 = time.time()
    trained = res.model.eval()
    trained.save_pretrained(tmp / "saved")
    with torch.no_grad():
        ref = trained.encode_image([image]), trained.encode_text(CAPTIONS)
        for where in (tmp / "saved", tmp / "run"):   # the saved folder and the training run's newest checkpoint
            back = from_pretrained(where)
            a, b = trained.trainable_state_dict(), back.trainable_state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{where}: weights differ"
            assert torch.equal(back.encode_image([image]), ref[0]) and torch.equal(back.encode_text(CAPTIONS), ref[1]), \
                f"{where}: the reloaded model encodes differently"
    _step("save and reload", t0, times)

    from lexvla.core import environment_info
    return {"times_s": times, "versions": environment_info()["packages"], "tiny_loss": loss[0],
            "smol": {"image": img[0].tolist(), "captions": txt.tolist(), "similarities": sims.tolist(),
                     "top_words_image": top_img, "top_words_captions": top_txt}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write the numbers (JSON) here")
    args = ap.parse_args(argv)
    handler = _Records()
    logging.getLogger().addHandler(handler)
    for name in ("transformers", "peft", "accelerate", "huggingface_hub"): logging.getLogger(name).addHandler(handler)
    start = time.time()
    with warnings.catch_warnings(record=True) as caught, tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("always")
        result = run(Path(tmp))
    notes = sorted({f"{w.category.__name__}: {w.message} ({Path(w.filename).name}:{w.lineno})" for w in caught})
    logged = sorted(set(handler.records))
    for line in notes + logged: print(f"  warning: {line}")
    deprecations = [n for n in notes if n.startswith(("FutureWarning", "DeprecationWarning", "PendingDeprecationWarning"))]
    deprecations += [r for r in logged if "deprecat" in r.lower()]
    result |= {"warnings": notes + logged, "total_s": round(time.time() - start, 1)}
    if args.out: args.out.write_text(json.dumps(result, indent=1))
    if deprecations:
        print(f"smoke test FAILED: {len(deprecations)} deprecation notice(s):\n  " + "\n  ".join(deprecations))
        return 1
    print(f"smoke test passed in {result['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
