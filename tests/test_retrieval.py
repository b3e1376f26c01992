"""lexvla.retrieval: Karpathy reader errors, Recall@K and chance level, evaluator on a fake model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lexvla.retrieval import (OpenClipAdapter, RetrievalSet, chance_recall, encode_images, evaluate_retrieval,
                              load_karpathy, recall_at_k, retrieval_ranks)


def _split(tmp_path: Path, entries: list[dict], name: str = "dataset_test.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"images": entries}))
    return p


def _entry(fn: str, n: int = 5, split: str = "test", folder: str | None = None) -> dict:
    e = {"filename": fn, "split": split, "sentences": [{"raw": f"caption {i} of {fn}"} for i in range(n)]}
    if folder: e["filepath"] = folder
    return e


def _images(root: Path, *names: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for n in names: Image.new("RGB", (4, 4)).save(root / n)


def test_karpathy_reads_coco_layout(tmp_path):
    _images(tmp_path / "val2014", "a.jpg", "b.jpg")
    ds = load_karpathy(_split(tmp_path, [_entry("a.jpg", 5, folder="val2014"), _entry("b.jpg", 7, folder="val2014"),
                                         _entry("z.jpg", 5, split="train")]))
    assert (len(ds.images), len(ds.captions)) == (2, 10)
    assert ds.images[0] == tmp_path / "val2014" / "a.jpg"
    assert ds.image_to_texts[1] == (5, 6, 7, 8, 9)


def test_karpathy_image_root(tmp_path):
    _images(tmp_path / "flickr30k-images", "1.jpg")
    (tmp_path / "ann").mkdir()
    js = _split(tmp_path / "ann", [_entry("1.jpg")])
    assert load_karpathy(js, image_root=tmp_path / "flickr30k-images").images == (tmp_path / "flickr30k-images" / "1.jpg",)


def test_karpathy_missing_image_named(tmp_path):
    _images(tmp_path, "a.jpg")
    with pytest.raises(FileNotFoundError, match="missing_one.jpg"):
        load_karpathy(_split(tmp_path, [_entry("a.jpg"), _entry("missing_one.jpg")]))


def test_karpathy_too_few_captions_named(tmp_path):
    _images(tmp_path, "a.jpg", "short.jpg")
    with pytest.raises(ValueError, match=r"'short.jpg' \(entry 1\) has 3 caption\(s\)"):
        load_karpathy(_split(tmp_path, [_entry("a.jpg"), _entry("short.jpg", 3)]))


def test_karpathy_malformed_json_named(tmp_path):
    (tmp_path / "dataset_bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset_bad.json is not valid JSON"):
        load_karpathy(tmp_path / "dataset_bad.json")
    with pytest.raises(FileNotFoundError, match="nothing_here.json"):
        load_karpathy(tmp_path / "nothing_here.json")


def test_recall_hand_computed():
    s = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.4],
                      [0.5, 0.6, 0.1, 0.2, 0.7, 0.3],
                      [0.2, 0.3, 0.4, 0.5, 0.1, 0.9]])
    t2i = [0, 0, 1, 1, 2, 2]
    i2t_r, t2i_r = retrieval_ranks(s, t2i)
    assert i2t_r.tolist() == [0, 4, 0] and t2i_r.tolist() == [0, 2, 2, 2, 2, 0]
    r = recall_at_k(s, t2i, ks=(1, 3, 5))
    assert r["i2t_R@1"] == pytest.approx(200 / 3) and r["i2t_R@5"] == 100
    assert r["t2i_R@1"] == pytest.approx(100 / 3) and r["t2i_R@3"] == 100


def test_recall_large_blocks_match_topk():
    g = torch.Generator().manual_seed(1)
    s, t2i = torch.randn(1500, 3000, generator=g), torch.arange(3000) // 2   # > one 1024 block each way
    r = recall_at_k(s, t2i, ks=(5,))
    pos = torch.zeros_like(s, dtype=torch.bool); pos[t2i, torch.arange(3000)] = True
    assert r["i2t_R@5"] == pytest.approx(100 * pos.gather(1, s.topk(5, 1).indices).any(1).float().mean().item())
    assert r["t2i_R@5"] == pytest.approx(100 * pos.T.gather(1, s.T.topk(5, 1).indices).any(1).float().mean().item())


def test_recall_rejects_bad_shapes():
    with pytest.raises(ValueError, match="text_to_image has 2 entries but scores has 3"):
        recall_at_k(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match="must index the 2 image rows"):
        recall_at_k(torch.zeros(2, 3), [0, 1, 2])


def test_chance_recall_flickr_sizes():
    c = chance_recall(1000, 5000, torch.arange(5000) // 5, ks=(1, 10))
    assert c["t2i_R@1"] == pytest.approx(0.1) and c["t2i_R@10"] == pytest.approx(1.0)
    assert c["i2t_R@1"] == pytest.approx(0.1)  # 5 right captions of 5000
    assert c["i2t_R@10"] == pytest.approx(100 * (1 - (4995 / 5000) ** 10), rel=1e-3)


class _Vocab:
    words = ("red", "green", "blue")
    def __len__(self): return 3


class _Colour(torch.nn.Module):
    "Image vector = mean colour; text vector = bag of colour words."
    vocab = _Vocab()
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))   # evaluators must move inputs to this device
    def preprocess(self, img): return torch.from_numpy(np.asarray(img.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
    def encode_image(self, x): return F.normalize(x.mean((2, 3)), dim=-1)
    def encode_text(self, texts):
        return F.normalize(torch.tensor([[float(w in t.split()) for w in self.vocab.words] for t in texts]), dim=-1)


def test_evaluate_retrieval_fake_model(tmp_path):
    imgs = [Image.new("RGB", (4, 4), c) for c in ("red", (0, 255, 0), "blue")]
    ds = RetrievalSet.from_lists(imgs, [["red", "a red one"], ["green"], ["blue", "green blue"]])
    model = _Colour().train()
    r = evaluate_retrieval(model, ds, batch_size=2, ks=(1,), progress=False)
    assert model.training                               # mode restored
    # T2I: "green blue" ties green and blue images (both .707): rank 1 -> 4/5; I2T: all rank 0
    assert (r["i2t_R@1"], r["t2i_R@1"]) == (100.0, pytest.approx(80.0))
    assert (r["n_img"], r["n_txt"], r["active_words_img"]) == (3, 5, 1.0)
    assert encode_images(model, [], progress=False).shape == (0, 3)


def test_open_clip_adapter_round_trip():
    model = _Colour()
    ad = OpenClipAdapter(model).eval()
    toks = ad.tokenizer(["red", "blue green"]).to("cpu")
    assert torch.allclose(ad.encode_text(toks), model.encode_text(["red", "blue green"]))
    assert ad.encode_image(torch.stack([ad.transform(Image.new("RGB", (2, 2), "red"))])).tolist() == [[1.0, 0.0, 0.0]]


def test_scene_world_karpathy(tmp_path):
    scenes = pytest.importorskip("lexvla.scenes")
    w = scenes.build_world(tmp_path, n_train=0, n_test=2, n_val=1, progress=False)
    ds = load_karpathy(w.karpathy_json)
    assert (len(ds.images), len(ds.captions)) == (2, 10)
