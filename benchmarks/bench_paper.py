#!/usr/bin/env python
"""Training and inference speed of LexVLA: a plain baseline and the optimised path, measured side by side.

Random weights (the compute does not depend on them); built directly on the target device.

    # GPU, the paper's architecture (DINOv2 ViT-B/14 + Llama-2-7B, V = 17,109):
    PYTHONPATH=. python benchmarks/bench_paper.py --config paper --out benchmarks/results/h100_paper.json
    # CPU, small configs (the ratios only; no memory search):
    PYTHONPATH=. python benchmarks/bench_paper.py --config tiny --device cpu --out /tmp/tiny.json

Variants (applied in place to one model, so every variant sees the same weights):
  baseline        float32 weights and compute, eager attention, no prompt-prefix cache, the B×N×V patch scores
                  materialised, PyTorch's default AdamW (foreach), TF32 off (PyTorch's default)
  fp32_opt        baseline + SDPA + prefix cache + chunked max-pool (float32): checks that these change nothing
  optimised       frozen weights (LM, ViT, Z_txt) in bf16, trainable ones float32 under bf16 autocast, SDPA
                  attention, prefix KV cache, chunked max-pool with its own backward, fused AdamW, TF32 on
  optimised_ckpt  optimised + gradient checkpointing on the LM (larger batches, +1 LM forward of recompute)

The JSON holds every measurement plus the analytic FLOPs (lexvla.flops) and the model-FLOP utilisation.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

from lexvla.codebook import elu1p
from lexvla.config import get_config
from lexvla.flops import PEAK_BF16, Tokens, infer_flops, mfu, train_flops
from lexvla.losses import LossConfig, lexical_loss
from lexvla.pretrained import build_model, load_backbone, load_causal_lm, load_tokenizer, seeded
from lexvla.text import CaptionTruncatedWarning, length_buckets

# ---------------------------------------------------------------------------------------------------------------
# Synthetic captions with CC-12M's length distribution. Source: the CC-12M paper (Changpinyo et al., CVPR 2021,
# "Conceptual 12M", Table 1) gives caption lengths of 20.2 +- 16.3 words (mean +- sd), and its text filter keeps
# alt-texts of 3 to 256 words. We draw the word count from the log-normal with that mean and sd, clipped to
# [3, 256]: median 15.7 words, 5.0% of captions above 50 words, a long tail. Common words are one Llama token,
# numbers one token per digit and CC-12M's name placeholder <PERSON> several.
WORDS = """a an the of in on with and at by to from near under over man woman person people child dog cat car street
building tree trees grass beach water sea sky cloud clouds mountain city house room table chair window door wall
white black red blue green yellow brown grey old young small large big tall beautiful wooden modern vintage
sitting standing walking running playing holding looking wearing riding eating smiling posing shirt dress hat
jacket shoes bag phone book cup plate food pizza cake flower flowers garden park road bridge river lake forest field
snow winter summer sunset night light lights stock photo illustration vector image background design pattern logo
icon drawing painting portrait closeup view aerial interior exterior kitchen bedroom bathroom horse bird birds boat
train bus bicycle motorcycle airplane ball game team player stadium crowd stage concert wedding bride groom family
friends couple girl boy baby students teacher office computer laptop desk""".split()
RARE = """<PERSON> <PERSON> 2019 2021 1950s 4k watercolour handmade Mediterranean skyscrapers silhouette
hand-drawn seamless Victorian cobblestone Scandinavian""".split()


CC12M_WORDS = (20.2, 16.3)   # mean, sd of the caption length in words (CC-12M paper, Table 1)
CC12M_RANGE = (3, 256)       # the words an alt-text may have (CC-12M's text filter)


def lognormal_params(mean: float, sd: float) -> tuple[float, float]:
    "(mu, sigma) of the log-normal distribution with this mean and standard deviation."
    s2 = math.log(1 + (sd / mean) ** 2)
    return math.log(mean) - s2 / 2, math.sqrt(s2)


def caption_words(rng: random.Random, mean_sd: tuple[float, float] = CC12M_WORDS, clip: tuple[int, int] = CC12M_RANGE) -> int:
    "A caption length in words, drawn from CC-12M's length distribution (log-normal, clipped)."
    mu, sigma = lognormal_params(*mean_sd)
    return int(min(max(round(rng.lognormvariate(mu, sigma)), clip[0]), clip[1]))


def make_captions(n: int, rng: random.Random, words: tuple[int, int] | None = None, rare: float = 0.08) -> list[str]:
    """n synthetic captions, ~8% of their words rarer, multi-token ones; lengths from CC-12M's distribution, or
    uniform in `words` = (min, max) if given."""
    out = []
    for _ in range(n):
        k = rng.randint(*words) if words else caption_words(rng)
        out.append(" ".join(rng.choice(RARE) if rng.random() < rare else rng.choice(WORDS) for _ in range(k)))
    return out


# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    bf16: bool  # frozen weights in bf16 + bf16 autocast (trainable weights stay float32)
    attn: str  # "eager" or "sdpa"
    prefix_cache: bool
    patch_chunk: int | None
    checkpointing: bool
    fused_adam: bool
    tf32: bool
    compile: bool = False
    length_buckets: int = 1  # LM sub-batches of similar caption length (TextConfig.length_buckets)


def variants(patch_chunk: int, bf16: bool, buckets: int = 4) -> dict[str, Variant]:
    base = Variant("baseline", False, "eager", False, None, False, False, False)
    fp32_opt = replace(base, name="fp32_opt", attn="sdpa", prefix_cache=True, patch_chunk=patch_chunk, length_buckets=buckets)
    opt = replace(fp32_opt, name="optimised", bf16=bf16, fused_adam=True, tf32=True)
    return {v.name: v for v in (base, fp32_opt, opt, replace(opt, name="optimised_pad", length_buckets=1),
                                replace(opt, name="optimised_ckpt", checkpointing=True),
                                replace(opt, name="optimised_compile", compile=True))}


def _set_attn(module, impl: str) -> None:
    try: module.set_attn_implementation(impl)
    except Exception: module.config._attn_implementation = impl


class Bench:
    "One model on one device, switched between variants in place."

    def __init__(self, config: str, device: str, seed: int = 0, lm_layers: int | None = None):
        cfg = get_config(config)
        if config == "paper":  # random weights, same architecture: the configs carry lm_config / backbone_config
            cfg = cfg.replace(text=replace(cfg.text, lm="random"), vision=replace(cfg.vision, backbone="random"))
        if lm_layers:  # a smoke test at full width with fewer LM layers (NOT the paper's cost)
            if not cfg.text.lm_config: raise ValueError("--lm-layers needs a config with lm_config (paper, tiny)")
            cfg = cfg.replace(text=replace(cfg.text, lm_config={**cfg.text.lm_config, "num_hidden_layers": lm_layers}))
        self.cfg, self.device = cfg, torch.device(device)
        t = time.perf_counter()
        tokenizer = load_tokenizer(cfg.text)
        with torch.device(self.device):  # initialise 7B random weights directly on the GPU (fast), in float32
            lm = load_causal_lm(cfg.text, cfg.seed, torch.float32)
            backbone = load_backbone(cfg.vision, cfg.seed + 1, torch.float32)
            with seeded(cfg.seed + 2): self.model = build_model(cfg, lm, tokenizer, backbone)
        del lm, backbone
        self.model.to(self.device)
        gc.collect(); self._empty()
        self.build_s = time.perf_counter() - t
        self.variant: Variant | None = None
        self.opt = None
        self._compiled = False
        self.loss_cfg = LossConfig(gather=False)
        # every variant starts from the same trainable weights (training steps change them; restore() resets them)
        self.snapshot = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def restore(self) -> None:
        for n, p in self.model.named_parameters():
            if n in self.snapshot: p.copy_(self.snapshot[n])
        self.model.text._prefix_kv = None

    # -- variants ----------------------------------------------------------------------------------------------
    def _empty(self):
        if self.device.type == "cuda": torch.cuda.empty_cache()

    def apply(self, v: Variant) -> None:
        m = self.model
        self.restore()
        if v.bf16:  # one way: frozen weights become bf16 (trainable ones are float32 already)
            for p in m.parameters():
                if not p.requires_grad and p.is_floating_point() and p.dtype != torch.bfloat16: p.data = p.data.to(torch.bfloat16)
        _set_attn(m.text.lm, v.attn); _set_attn(m.vision.backbone, v.attn)
        m.text.cfg = replace(m.text.cfg, prefix_cache=v.prefix_cache, gradient_checkpointing=v.checkpointing,
                             attn_implementation=v.attn, length_buckets=v.length_buckets)
        m.vision.cfg = replace(m.vision.cfg, patch_chunk=v.patch_chunk, attn_implementation=v.attn)
        m.text._prefix_kv = None
        if v.checkpointing: m.text.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif any(getattr(x, "gradient_checkpointing", False) for x in m.text.lm.modules()):
            m.text.lm.activation_checkpointing_disable()
        if v.compile and not self._compiled:  # regional compilation: each decoder layer and the ViT layers
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            for layer in m.text.lm.layers: layer.compile(dynamic=True)
            for layer in m.vision.backbone.encoder.layer: layer.compile()
            m.vision.adapter.compile()
            self._compiled = True
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = v.tf32
            torch.backends.cudnn.allow_tf32 = v.tf32
        self.variant = v
        self.opt = None
        gc.collect(); self._empty()

    def autocast(self):
        v = self.variant
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if v.bf16 else nullcontext()

    def optimizer(self):
        if self.opt is None:
            params = [p for ps in self.model.param_groups().values() for p in ps]
            kw = dict(fused=True) if self.variant.fused_adam and self.device.type == "cuda" else {}
            self.opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, **kw)
        return self.opt

    # -- timing ------------------------------------------------------------------------------------------------
    def mark(self, marks: list, name: str) -> None:
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True); e.record(); marks.append((name, e))
        else: marks.append((name, time.perf_counter()))

    def intervals(self, marks: list) -> dict[str, float]:
        if self.device.type == "cuda": torch.cuda.synchronize()
        out = {}
        for (_, a), (n, b) in zip(marks, marks[1:]):
            out[n] = out.get(n, 0.0) + (a.elapsed_time(b) / 1e3 if self.device.type == "cuda" else b - a)
        return out

    def train_step(self, pixels, texts, step: int = 0) -> dict[str, float]:
        """One optimizer step, timed by phase. The backward runs in three calls (loss, vision, text) so that each
        tower's backward is timed on its own; mathematically this is the single `loss.backward()`."""
        m, marks = self.model, []
        opt = self.optimizer()
        hook = m.vision.backbone.register_forward_hook(lambda *_: self.mark(marks, "dinov2_fwd"))
        try:
            self.mark(marks, "start")
            with self.autocast():
                img = m.encode_image(pixels)
                self.mark(marks, "adapter_mapper_fwd")
                txt = m.encode_text(texts)
                self.mark(marks, "lm_fwd")
        finally:
            hook.remove()
        i_d, t_d = img.detach().requires_grad_(), txt.detach().requires_grad_()
        loss = lexical_loss({"image": i_d, "text": t_d, "logit_scale": m.logit_scale}, step, self.loss_cfg)["loss"]
        loss.backward()
        self.mark(marks, "loss")
        img.backward(i_d.grad)
        self.mark(marks, "adapter_mapper_bwd")
        txt.backward(t_d.grad)
        self.mark(marks, "lm_bwd")
        opt.step(); opt.zero_grad(set_to_none=True)
        self.mark(marks, "optimizer")
        ph = self.intervals(marks)  # synchronises
        ph["total"] = sum(ph.values())
        ph["loss_value"] = loss.detach().item()
        return ph

    def measure_train(self, batch: int, steps: int, warmup: int, rng: random.Random) -> dict:
        m = self.model.train()
        pix = torch.randn(batch, 3, m.cfg.vision.image_size, m.cfg.vision.image_size, device=self.device)  # one batch
        same = random.Random(f"captions-{batch}")   # every variant sees the same captions at the same batch size
        caps = [make_captions(batch, same) for _ in range(warmup + steps)]
        t0 = time.perf_counter()
        for i in range(warmup): self.train_step(pix, caps[i], i)
        warm_s = time.perf_counter() - t0
        if self.device.type == "cuda": torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        runs = [self.train_step(pix, caps[warmup + i], warmup + i) for i in range(steps)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "loss_value"}
        out = {"batch": batch, "steps": steps, "warmup": warmup, "warmup_s": warm_s, "phases_s": med,
               "step_s": med["total"], "step_s_all": [r["total"] for r in runs],
               "samples_per_s": batch / med["total"], "loss_finite": all(math.isfinite(r["loss_value"]) for r in runs),
               "padded_text_len": statistics.mean(max(map(len, self.model.text.token_ids(c))) for c in caps[warmup:]),
               **self.lm_tokens(caps[warmup:])}
        if self.device.type == "cuda":
            out["peak_alloc_gb"] = torch.cuda.max_memory_allocated() / 2**30
            out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        else: out["max_rss_gb"] = max_rss_gb()
        return out

    def lm_tokens(self, batches: list[list[str]]) -> dict[str, float]:
        """Caption tokens per step the LM reads (after the prompt prefix): real ones, and with padding, as the current
        variant pads them (one batch padded to its longest caption, or each length bucket to its own)."""
        t = self.model.text
        real, padded = [], []
        for caps in batches:
            lens = [len(s) for s in t.token_ids(caps)]
            real.append(sum(lens))
            padded.append(sum(len(b) * max(lens[i] for i in b) for b in length_buckets(lens, t.cfg.length_buckets)))
        return {"lm_tokens_real": statistics.mean(real), "lm_tokens_padded": statistics.mean(padded),
                "lm_padding_share": 1 - sum(real) / sum(padded)}

    @torch.no_grad()
    def measure_infer(self, batch: int, steps: int, warmup: int, rng: random.Random) -> dict:
        m = self.model.eval()
        S = m.cfg.vision.image_size
        pix = [torch.randn(batch, 3, S, S, device=self.device) for _ in range(2)]
        caps = [make_captions(batch, rng) for _ in range(warmup + steps)]
        res = {}
        for name, fn, inputs in (("encode_image", m.encode_image, [pix[i % 2] for i in range(warmup + steps)]),
                                 ("encode_text", m.encode_text, caps)):
            times = []
            for i, x in enumerate(inputs):
                marks = []
                self.mark(marks, "start")
                with self.autocast(): fn(x)
                self.mark(marks, "end")
                if i >= warmup: times.append(self.intervals(marks)["end"])
            t = statistics.median(times)
            res[name] = {"batch": batch, "s": t, "samples_per_s": batch / t}
        return res

    # -- equivalence -------------------------------------------------------------------------------------------
    def outputs(self, pixels, texts) -> dict[str, torch.Tensor]:
        """Scores, vectors and trainable-weight gradients on fixed inputs, in training mode (so checkpointing is
        active where enabled) with dropout switched off (so runs are deterministic)."""
        m = self.model.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout): mod.eval()
        with torch.no_grad(), self.autocast():
            img_s = m.vision.codebook.max_scores(m.vision.patch_features(pixels), m.vision.cfg.patch_chunk).float()
            txt_s = m.text.scores(texts)
            img, txt = m.encode_image(pixels), m.encode_text(texts)
            arg = m.vision.codebook(m.vision.patch_features(pixels)).argmax(1)  # winning patch per (image, word)
        with self.autocast(): out = m(pixels, texts)
        loss = lexical_loss(out, 0, self.loss_cfg)["loss"]
        groups = m.param_groups()
        params = [p for ps in groups.values() for p in ps]
        grads = iter(torch.autograd.grad(loss, params, allow_unused=True))
        res = {"img_scores": img_s.float().cpu(), "txt_scores": txt_s.float().cpu(), "img": img.float().cpu(),
               "txt": txt.float().cpu(), "img_argmax": arg.cpu()}
        for name, ps in groups.items():  # the gradient of the loss for each trainable part
            gs = [next(grads) for _ in ps]
            res[f"grad_{name}"] = torch.cat([(g if g is not None else torch.zeros_like(p)).float().flatten()
                                             for g, p in zip(gs, ps)]).cpu()
        return res

    def try_fit(self, batch: int, rng: random.Random) -> bool:
        "Does one training step at this batch fit in the allowed memory?"
        S = self.model.cfg.vision.image_size
        ok = True
        try:
            self.model.train()
            # captions that all reach max_caption_tokens, so that the batch fits whatever the padding
            self.train_step(torch.randn(batch, 3, S, S, device=self.device), make_captions(batch, rng, words=(80, 80)))
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e): raise
            ok = False
        if self.opt is not None: self.opt.zero_grad(set_to_none=True)
        gc.collect(); self._empty()
        return ok


def max_rss_gb() -> float:
    "Peak resident memory of this process so far (GiB): the CPU's peak memory (run one variant per process to compare)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def is_oom(e: BaseException) -> bool:
    "CUDA out of memory, also as cuBLAS/cuDNN report it when an allocation inside them fails."
    return isinstance(e, torch.OutOfMemoryError) or any(
        s in str(e) for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED"))


def compare(a: dict, b: dict) -> dict:
    out = {}
    for k in a:
        x, y = a[k], b[k]
        if not x.is_floating_point():  # argmax indices: the fraction that agree
            out[k] = {"agree": float((x == y).float().mean())}
            continue
        d = (x - y).abs()
        out[k] = {"max_abs": float(d.max()), "rel_l2": float((x - y).norm() / y.norm().clamp_min(1e-30)),
                  "ref_max_abs": float(y.abs().max())}
    return out


def search_max_batch(fits, start: int, granularity: float = 0.08, limit: int = 16384, log=print) -> tuple[int, int | None, list]:
    """Largest batch b (a multiple of 8) with fits(b): double from `start` until a batch fails, then bisect until the
    bracket is within `granularity` (relative) or 8. Returns (largest fitting, smallest failing or None, probes)."""
    probes, lo, hi, b = [], 0, None, start
    while b <= limit:
        ok = fits(b); probes.append((b, ok)); log(f"    probe B={b}: {'fits' if ok else 'OOM'}")
        if not ok: hi = b; break
        lo, b = b, b * 2
    while hi is not None and hi - lo > max(8, granularity * lo):
        mid = (lo + hi) // 2 // 8 * 8
        if mid <= lo: break
        ok = fits(mid); probes.append((mid, ok)); log(f"    probe B={mid}: {'fits' if ok else 'OOM'}")
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo, hi, probes


def max_batch(bench: Bench, fraction: float, start: int, rng: random.Random, log=print) -> dict:
    "Largest batch whose training step fits under `fraction` of the GPU's memory (0.5 of 80 GB emulates 40 GB)."
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction)
    t0 = time.perf_counter()
    try: lo, hi, probes = search_max_batch(lambda b: bench.try_fit(b, rng), start, log=log)
    finally: torch.cuda.set_per_process_memory_fraction(1.0)
    cap = fraction * torch.cuda.get_device_properties(0).total_memory / 2**30
    return {"fraction": fraction, "cap_gib": cap, "max_batch": lo, "first_oom": hi, "probes": probes,
            "search_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------------
def token_stats(bench: Bench, rng: random.Random, n: int = 2000) -> tuple[Tokens, tuple[int, int]]:
    "Mean token counts of the prompt prefix, a synthetic caption and the suffix; and the caption range."
    t = bench.model.text
    caps = make_captions(n, rng)
    lens = [len(ids) for ids in t.tokenizer(caps, add_special_tokens=False, truncation=True,
                                            max_length=t.cfg.max_caption_tokens)["input_ids"]]
    return Tokens(prefix=len(t.prefix_ids), caption=statistics.mean(lens), suffix=len(t.suffix_ids)), (min(lens), max(lens))


def padding_table(bench: Bench, rng: random.Random, batches: tuple[int, ...] = (32, 128),
                  buckets: tuple[int, ...] = (1, 2, 4, 8), n: int = 100) -> dict[str, dict[str, float]]:
    """Caption tokens the LM reads per batch (after the prompt prefix) for CC-12M-length captions: real ones, and
    padded, for each batch size and number of length buckets; the mean over `n` random batches."""
    t = bench.model.text
    out = {}
    for b in batches:
        lens = [[len(s) for s in t.token_ids(make_captions(b, rng))] for _ in range(n)]
        row = {"real": statistics.mean(map(sum, lens)),
               "reaches_max_caption_tokens": statistics.mean(max(l) >= t.cfg.max_caption_tokens + len(t.suffix_ids) for l in lens)}
        for k in buckets:
            row[f"padded_k{k}"] = statistics.mean(sum(len(g) * max(l[i] for i in g) for g in length_buckets(l, k)) for l in lens)
        out[str(b)] = row
    return out


def matmul_tflops(device) -> float:
    "Achieved bf16 matrix-product rate (8192³, random data, median of 10 after 3 warm-ups): the practical ceiling."
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3): a @ b
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); a @ b; e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192**3 / statistics.median(ts) / 1e12


def peak_for(name: str) -> tuple[str, float | None]:
    n = name.lower()
    if "h100" in n and "pcie" in n: return "H100 PCIe", PEAK_BF16["H100 PCIe"]
    if "h100" in n: return "H100 SXM", PEAK_BF16["H100 SXM"]
    if "h200" in n: return "H200", PEAK_BF16["H200"]
    if "a100" in n: return "A100", PEAK_BF16["A100"]
    return name, None


def derive(res: dict, args, cuda: bool) -> None:
    "Speed-ups against the baseline and the epoch projection (clearly a projection: single-GPU throughput x GPUs)."
    tr = res["train"]
    if "baseline" in tr:
        res["speedup"] = {n: {"train": t["samples_per_s"] / tr["baseline"]["samples_per_s"],
                              **{k: res["infer"][n][k]["samples_per_s"] / res["infer"]["baseline"][k]["samples_per_s"]
                                 for k in res["infer"].get(n, {})}} for n, t in tr.items()}
    proj = {}
    for name, per in (res["max_batch"] if cuda else {}).items():
        for f, mb in per.items():
            if mb.get("train"):
                sps = mb["train"]["samples_per_s"]
                proj[f"{name}@{mb['cap_gib']:.0f}GiB(B={mb['max_batch']})"] = {
                    "samples_per_s_per_gpu": sps, "gpus": args.gpus, "pairs": args.pairs,
                    "epoch_hours": args.pairs / (args.gpus * sps) / 3600}
    for name, t in (tr if cuda else {}).items():
        proj[f"{name}(B={t['batch']})"] = {"samples_per_s_per_gpu": t["samples_per_s"], "gpus": args.gpus,
                                            "pairs": args.pairs, "epoch_hours": args.pairs / (args.gpus * t["samples_per_s"]) / 3600}
    res["projection"] = {"note": "PROJECTION, not a measurement: measured single-GPU training throughput times the "
                                 "number of GPUs (perfect scaling; data loading, all-gather and gradient all-reduce "
                                 "not included)", "per_setting": proj}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="paper", choices=["paper", "smol", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="training batch for the side-by-side comparison")
    ap.add_argument("--infer-batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--patch-chunk", type=int, default=64)
    ap.add_argument("--length-buckets", type=int, default=4, help="LM sub-batches of similar caption length (optimised variants)")
    ap.add_argument("--variants", default="baseline,fp32_opt,optimised,optimised_ckpt",
                    help="comma list of: baseline, fp32_opt, optimised, optimised_ckpt, optimised_compile")
    ap.add_argument("--max-batch", default="optimised,optimised_ckpt", help="variants to search the largest batch for ('' = none)")
    ap.add_argument("--fractions", default="0.5,1.0", help="memory fractions for the search (0.5 of 80 GB emulates a 40 GB A100)")
    ap.add_argument("--mem-caps", default="", help="memory caps in GiB for the search (e.g. 40,80), instead of --fractions")
    ap.add_argument("--pairs", type=float, default=9.2e6, help="CC-12M pairs per epoch (the paper downloaded 9.2M)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=None, help="seconds; skip remaining variants after this")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 in the optimised variants (default: on for CUDA, off for CPU)")
    ap.add_argument("--lm-layers", type=int, default=None,
                    help="smoke test: keep the config's widths but only this many LM layers (not the paper's cost)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore", category=CaptionTruncatedWarning)   # CC-12M's long tail is cut, as in training

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    big = args.config == "paper"
    batch = args.batch or (32 if big else 8)  # the float32 baseline holds 27 GB of weights + ~0.7 GB/sample
    infer_batch = args.infer_batch or (128 if big else 16)
    steps = args.steps or (5 if big else 3)
    if not cuda: torch.set_num_threads(1)  # small CPU configs: one thread gives steadier timings
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    res: dict = {"args": vars(args), "meta": {}, "equivalence": {}, "train": {}, "infer": {}, "max_batch": {}, "errors": []}
    out = Path(args.out) if args.out else None

    def save():   # after every measurement, with what follows from it so far: a run cut short keeps it all
        derive(res, args, cuda)
        if out: out.parent.mkdir(parents=True, exist_ok=True); out.write_text(json.dumps(res, indent=1))

    def log(*a):
        print(*a, flush=True)

    import peft, transformers
    meta = res["meta"]
    meta.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                python=platform.python_version(), device=str(dev), config=args.config)
    if cuda:
        p = torch.cuda.get_device_properties(0)
        meta.update(gpu=p.name, gpu_mem_gib=p.total_memory / 2**30, cuda=torch.version.cuda)
        meta["peak_name"], meta["peak_bf16_flops"] = peak_for(p.name)
        meta["matmul_bf16_tflops"] = matmul_tflops(dev)
        log(f"{p.name}: {meta['gpu_mem_gib']:.1f} GiB, bf16 8192³ matmul {meta['matmul_bf16_tflops']:.0f} TFLOP/s")

    bench = Bench(args.config, args.device, args.seed, args.lm_layers)
    m = bench.model
    N = m.grid[0] * m.grid[1]
    chunk = args.patch_chunk if big else max(1, N // 4)
    V = len(m.vocab)
    toks, (tmin, tmax) = token_stats(bench, rng)
    meta.update(build_s=bench.build_s, vocab_size=V, patches=N, image_size=m.cfg.vision.image_size, patch_chunk=chunk,
                tokens=dataclasses.asdict(toks), caption_tokens_range=[tmin, tmax],
                trainable_params=sum(p.numel() for p in m.parameters() if p.requires_grad),
                frozen_params=sum(p.numel() for p in m.parameters() if not p.requires_grad))
    if cuda: meta["weights_fp32_gib"] = torch.cuda.memory_allocated() / 2**30
    log(f"built {args.config} in {bench.build_s:.1f} s: V={V}, N={N}, caption tokens mean {toks.caption:.1f} "
        f"[{tmin}, {tmax}], prefix {toks.prefix}, suffix {toks.suffix}")
    res["lm_tokens"] = padding_table(bench, random.Random(args.seed + 7), batches=tuple(sorted({batch, 128})))
    for b, row in res["lm_tokens"].items():
        log(f"LM caption tokens per batch of {b}: {row['real']:.0f} real; padded " +
            ", ".join(f"{row[f'padded_k{k}']:.0f} ({k} bucket{'s' if k > 1 else ''})" for k in (1, 2, 4, 8)) +
            f"; a caption reaches max_caption_tokens in {100 * row['reaches_max_caption_tokens']:.0f}% of batches")
    shapes = dict(lm=m.text.lm.config.to_dict(), vit=m.vision.backbone.config.to_dict())
    fl = {"train": train_flops(m.cfg, V, toks, batch, **shapes), "infer": infer_flops(m.cfg, V, toks, infer_batch, **shapes),
          "train_no_prefix_cache": train_flops(m.cfg, V, toks, batch, prefix_cache=False, **shapes),
          "train_checkpointing": train_flops(m.cfg, V, toks, batch, checkpointing=True, **shapes)}
    res["flops"] = fl
    save()

    vs = variants(chunk, bf16=cuda if args.bf16 is None else args.bf16, buckets=args.length_buckets)
    order = [n for n in vs if n in args.variants.split(",")]
    eq_pix = torch.randn(4 if big else 4, 3, m.cfg.vision.image_size, m.cfg.vision.image_size, device=dev,
                         generator=torch.Generator(dev).manual_seed(1))
    eq_caps = make_captions(4, random.Random(1))
    ref = None
    t_start = time.perf_counter()
    for name in order:
        v = vs[name]
        if args.deadline and time.perf_counter() - t_start > args.deadline:
            log(f"== {name}: skipped (deadline)"); res["errors"].append({"variant": name, "error": "skipped: deadline"}); continue
        log(f"== {name}: {v}")
        try:
            bench.apply(v)
            if cuda: res.setdefault("weights_gib", {})[name] = torch.cuda.memory_allocated() / 2**30
            o = bench.outputs(eq_pix, eq_caps)
            if ref is None: ref = o
            else:
                res["equivalence"][name] = compare(o, ref)
                log("   vs baseline:", {k: f"max|d|={d['max_abs']:.2e} rel={d['rel_l2']:.2e}" if "max_abs" in d
                                        else f"agree={d['agree']:.4f}" for k, d in res["equivalence"][name].items()})
            del o; gc.collect(); bench._empty()
            if name == "fp32_opt": continue  # equivalence only
            b = batch
            while True:  # a variant that runs out of memory at the comparison batch is measured at half of it
                try: tr = bench.measure_train(b, steps, args.warmup, rng); break
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not is_oom(e) or b <= 8: raise
                    bench.opt = None; gc.collect(); bench._empty(); b //= 2
                    log(f"   OOM at B={2 * b}; retrying at B={b}")
            tr["mfu"] = mfu(tr["samples_per_s"], fl["train"]["model_total"], meta.get("peak_bf16_flops"))
            res["train"][name] = tr
            log(f"   train B={b}: {tr['step_s']*1e3:.0f} ms/step, {tr['samples_per_s']:.1f} samples/s, "
                f"peak {tr.get('peak_alloc_gb', float('nan')):.1f} GiB, MFU {tr['mfu'] or float('nan'):.3f}; "
                + ", ".join(f"{k} {1e3*t:.0f}" for k, t in tr["phases_s"].items()))
            save()
            inf = bench.measure_infer(infer_batch, steps, args.warmup, rng)
            for k, r in inf.items(): r["mfu"] = mfu(r["samples_per_s"], fl["infer"][k], meta.get("peak_bf16_flops"))
            res["infer"][name] = inf
            log("   infer:", {k: f"{r['samples_per_s']:.1f}/s" for k, r in inf.items()})
            save()
            if cuda and name in args.max_batch.split(","):
                res["max_batch"][name] = {}
                total = torch.cuda.get_device_properties(0).total_memory / 2**30
                caps = [float(x) / total for x in args.mem_caps.split(",") if x] if args.mem_caps else \
                    [float(x) for x in args.fractions.split(",") if x]
                for f in caps:
                    mb = max_batch(bench, f, start=batch, rng=rng, log=log)
                    if mb["max_batch"]:
                        torch.cuda.set_per_process_memory_fraction(f)
                        try:
                            t = bench.measure_train(mb["max_batch"], 3, 1, rng)
                            mb["train"] = {k: t[k] for k in ("samples_per_s", "step_s", "peak_alloc_gb", "phases_s")}
                            mb["train"]["mfu"] = mfu(t["samples_per_s"], fl["train"]["model_total"], meta.get("peak_bf16_flops"))
                        except (torch.OutOfMemoryError, RuntimeError) as e:
                            if not is_oom(e): raise
                            mb["train"] = None
                        torch.cuda.set_per_process_memory_fraction(1.0)
                        gc.collect(); bench._empty()
                    res["max_batch"][name][str(f)] = mb
                    log(f"   max batch at {mb['cap_gib']:.1f} GiB: {mb['max_batch']}"
                        + (f", {mb['train']['samples_per_s']:.1f} samples/s" if mb.get("train") else ""))
                    save()
        except Exception as e:  # record and go on with the next variant
            res["errors"].append({"variant": name, "error": repr(e), "trace": traceback.format_exc()[-3000:]})
            log(f"   FAILED: {e!r}")
            bench.opt = None; gc.collect(); bench._empty()
            if cuda: torch.cuda.set_per_process_memory_fraction(1.0)
        save()

    save()
    log("\n== summary")
    for n, t in res["train"].items():
        log(f"{n:16s} train {t['samples_per_s']:8.1f}/s  peak {t.get('peak_alloc_gb', float('nan')):5.1f} GiB  "
            f"MFU {t['mfu'] or float('nan'):.3f}  " + "  ".join(f"{k} {r['samples_per_s']:.1f}/s" for k, r in res["infer"].get(n, {}).items()))
    for n, s in res.get("speedup", {}).items(): log(f"speed-up {n}: " + ", ".join(f"{k} {x:.2f}x" for k, x in s.items()))
    for k, p in res["projection"]["per_setting"].items(): log(f"projection {k}: {p['epoch_hours']:.2f} h / epoch on {p['gpus']} GPUs")
    if res["errors"]: log("errors:", [e["variant"] + ": " + e["error"] for e in res["errors"]])
    return res


if __name__ == "__main__":
    main()
