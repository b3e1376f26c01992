"""The dense (CLIP-style) baseline, `LexVLAConfig.head="dense"`: widths and norms, the frozen weights it shares with the
lexical model, what trains, a training run that lowers the contrastive loss, checkpoints, and `evaluate_world`.

Everything runs on the random `tiny` / `tiny_dense` configs on the CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from lexvla.config import get_config
from lexvla.data import DataConfig, write_shards
from lexvla.evaluate import LEXICAL_METRICS, evaluate_world
from lexvla.losses import LossConfig, contrastive, dense_loss
from lexvla.model import LexVLA
from lexvla.patchdis import class_text_vectors, evaluate_patchdis, load_voc, patch_scores, prepare_images
from lexvla.pretrained import create_model, from_pretrained
from lexvla.retrieval import load_karpathy, recall_at_k
from lexvla.train import TrainConfig, train

COLOURS = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40)}
CAPS = ["a red star", "two blue squares", "a green circle on the left", "a yellow heart"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dense() -> LexVLA:
    return create_model("tiny_dense").eval()


@pytest.fixture(scope="module")
def lexical() -> LexVLA:
    return create_model("tiny").eval()


def _images(n: int = 4) -> list[Image.Image]:
    return [Image.new("RGB", (40, 40), c) for c in list(COLOURS.values())[:n]]


@pytest.mark.parametrize("name, d", [("tiny_dense", 512), ("tiny_dense64", 64)])
def test_width_and_unit_norm(name, d):
    cfg = get_config("tiny_dense", dense_dim=64) if name == "tiny_dense64" else get_config(name)
    m = create_model(cfg).eval()
    img, txt, pat = m.encode_image(_images()), m.encode_text(CAPS), m.encode_patches(_images())
    assert img.shape == txt.shape == (4, d) and m.dim == d
    assert pat.shape == (4, m.grid[0] * m.grid[1], d)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    # the image embedding is the normalised mean of the patch embeddings (mean pooling, then a linear map)
    torch.testing.assert_close(F.normalize(pat.mean(1), dim=-1), img, atol=1e-6, rtol=0)


def test_shares_every_frozen_weight(dense, lexical):
    "Every frozen tensor of the dense model is the lexical model's, by name and value; only Z_txt is not kept."
    def frozen(m):
        return {n: p for n, p in m.named_parameters() if not p.requires_grad} | dict(m.named_buffers())
    fd, fl = frozen(dense), frozen(lexical)
    assert set(fl) - set(fd) == {"text.codebook.weight"}   # the lexical head's frozen Z_txt (the LM head's rows)
    assert set(fd) <= set(fl)
    assert any(n.startswith("vision.backbone.") for n in fd) and any(n.startswith("text.lm.") for n in fd)
    different = [n for n in fd if not torch.equal(fd[n], fl[n])]
    assert not different, f"frozen tensors that differ: {different[:5]}"
    # under the same seed the shared trainable parts (LoRA, adapter) also start equal: only the heads differ
    td, tl = dense.trainable_state_dict(), lexical.trainable_state_dict()
    shared = [n for n in td if "lora_" in n or n.startswith("vision.adapter.")]
    assert shared and all(torch.equal(td[n], tl[n]) for n in shared)


def test_only_projections_lora_adapter_train(dense):
    trainable = {n for n, p in dense.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    adapter = {f"vision.adapter.{n}" for n, _ in dense.vision.adapter.named_parameters()}
    assert lora and trainable == lora | adapter | {"vision.proj.weight", "text.proj.weight", "logit_scale"}
    assert not hasattr(dense.vision, "codebook") and dense.text.codebook is None


def test_sparse_options_are_errors(dense):
    for call in (lambda: dense.encode_image(_images(), sparse="threshold"), lambda: dense.encode_text(CAPS, sparse=3),
                 lambda: dense.encode_patches(_images(), sparse=2)):
        with pytest.raises(ValueError, match="this model's head is 'dense'"): call()
    with pytest.raises(ValueError, match="have no words"): dense.top_words(torch.ones(512))


def _sample(i: int):
    rng = np.random.default_rng(i)
    colour = list(COLOURS)[i % 4]
    img = Image.fromarray(rng.integers(0, 60, (40, 40, 3), dtype=np.uint8))
    x, y = rng.integers(4, 16, 2)
    ImageDraw.Draw(img).rectangle((int(x), int(y), int(x) + 20, int(y) + 20), fill=COLOURS[colour])
    return f"s{i:04d}", img, f"a {colour} square on a dark background", {}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    write_shards((_sample(i) for i in range(32)), d, samples_per_shard=16)
    return d


def _batch_loss(model: LexVLA, n: int = 8) -> float:
    "The contrastive loss of the model on a fixed batch of n pairs (eval mode, the model's temperature)."
    s = [_sample(i) for i in range(n)]
    with torch.no_grad():
        img, txt = model.encode_image([x[1] for x in s]), model.encode_text([x[2] for x in s])
        return float(contrastive(img, txt, model.logit_scale.detach()))


def test_training_lowers_the_contrastive_loss_and_checkpoints_load(shards, tmp_path):
    cfg = TrainConfig(data=DataConfig(urls=str(shards), batch_size=8, resampled=False, shuffle_buffer=16, num_workers=0),
                      model="tiny_dense", max_steps=24, warmup_steps=1, lr_lora=1e-3, lr_adapter=3e-3,
                      lr_logit_scale=1e-3, log_every=4, save_every=24, out_dir=str(tmp_path / "run"),
                      mixed_precision="no", tracker="none", progress=False, loss=LossConfig(lambda_flops=0.1))
    before = _batch_loss(create_model("tiny_dense").eval())
    res = train(cfg)
    after = _batch_loss(res.model)
    assert after < before - 0.2, (before, after)   # measured: 2.09 -> 1.64
    logged = [h for h in res.history if "loss" in h]
    assert logged and all(h["loss"] == h["nce"] for h in logged)        # the loss is the InfoNCE alone
    assert not any(k.startswith(("flops", "over", "active_words", "lambda_")) for h in logged for k in h)
    # the final checkpoint holds only the trainable weights and rebuilds the same model
    back = from_pretrained(res.checkpoint).eval()
    assert back.cfg == res.model.cfg and back.head == "dense"
    imgs = _images()
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(imgs), res.model.encode_image(imgs), atol=1e-6, rtol=0)
        torch.testing.assert_close(back.encode_text(CAPS), res.model.encode_text(CAPS), atol=1e-6, rtol=0)


def test_dense_loss_ignores_the_sparsity_weights():
    e = F.normalize(torch.randn(6, 16), dim=-1)
    out = {"image": e, "text": e.roll(1, 0), "logit_scale": torch.tensor(2.0)}
    a, b = dense_loss(out, 0, LossConfig(lambda_flops=5.0, lambda_overuse=50.0)), dense_loss(out, 0, LossConfig())
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["loss"], contrastive(e, e.roll(1, 0), torch.tensor(2.0)))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from lexvla.scenes import build_world
    root = tmp_path_factory.mktemp("w") / "world"
    build_world(root, n_train=4, n_test=8, seed=1, progress=False)
    return root


def test_evaluate_world_on_a_dense_model(dense, world):
    m = evaluate_world(dense, world, progress=False)
    for k in LEXICAL_METRICS: assert m[k] is None and m[f"chance_{k}"] is None
    assert m["dim"] == 512 and m["vocab_size"] is None
    # retrieval: the same numbers from the embeddings scored directly
    w = json.loads((world / "world.json").read_text())
    ds = load_karpathy(world / w["karpathy_json"], split="test")
    with torch.no_grad():
        img = dense.encode_image(torch.stack([dense.preprocess(Image.open(p)) for p in ds.images]))
        txt = dense.encode_text(list(ds.captions))
    for k, v in recall_at_k(img @ txt.T, ds.text_to_image).items(): assert m[k] == pytest.approx(v, abs=1e-9)
    # PatchDis: patch embeddings (through the image projection, normalised) against the class names' embeddings
    seg = load_voc(world / w["voc_dir"], split="test")
    assert m["patchdis_mIoU"] == pytest.approx(evaluate_patchdis(dense, seg, progress=False)["mIoU"])
    cv = class_text_vectors(dense, seg.class_names)
    x = prepare_images(dense, [seg.image(0)])
    with torch.no_grad():
        p = F.normalize(dense.vision.proj(dense.vision.patch_features(x)), dim=-1)     # [1, N, d]
        h, w_ = dense.grid
        torch.testing.assert_close(patch_scores(dense, x, cv), (p @ cv.T).transpose(1, 2).reshape(1, -1, h, w_),
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="a dense model's embeddings have none"):
        evaluate_world(dense, world, progress=False, sparsify=lambda v: v)
