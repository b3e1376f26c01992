"""lexvla.patchdis: mIoU by hand, readers' errors, class vectors, PatchDis on a fake model with known answers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lexvla.patchdis import (ADE20K_CLASSES, VOC_CLASSES, ConfusionMatrix, SegmentationSet, class_text_vectors,
                             evaluate_patchdis, load_ade20k, load_voc, miou, overlay_figure, upsample_predictions)


def test_miou_hand_computed():
    r = miou(np.array([[0, 0, 1], [1, 2, 2]]), np.array([[0, 1, 1], [1, 2, 255]]), num_classes=4)
    assert r["iou"][:3] == pytest.approx([50.0, 200 / 3, 100.0]) and np.isnan(r["iou"][3])
    assert r["mIoU"] == pytest.approx((0.5 + 2 / 3 + 1) / 3 * 100)
    assert r["pixel_acc"] == pytest.approx(80.0)


def test_ignore_index_excluded_everywhere():
    # every target pixel but one ignored: only that pixel counts, whatever is predicted elsewhere
    t = np.full((3, 3), 255); t[1, 1] = 2
    p = np.zeros((3, 3), int); p[1, 1] = 2
    r = miou(p, t, num_classes=3)
    assert (r["mIoU"], r["n_pixels"], r["present"]) == (100.0, 1, [False, False, True])
    assert miou(p, np.where(t == 255, 0, t), num_classes=3, ignore_index=-1)["n_pixels"] == 9


def test_confusion_matrix_accumulates():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1])).update(np.array([2]), np.array([2]))
    assert cm.mat.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert cm.compute()["iou"] == pytest.approx([100.0, 50.0, 50.0])


def test_class_lists():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[20] == "tv monitor"
    assert len(ADE20K_CLASSES) == 150 == len(set(ADE20K_CLASSES))


def _voc(root: Path, ids=("x1", "x2"), classes_json=None) -> Path:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"): (root / sub).mkdir(parents=True)
    for i in ids:
        Image.new("RGB", (5, 4)).save(root / "JPEGImages" / f"{i}.jpg")
        m = Image.fromarray(np.ones((4, 5), np.uint8), mode="P"); m.putpalette([0] * 768); m.save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    if classes_json is not None: (root / "classes.json").write_text(json.dumps(classes_json))
    return root


def test_voc_reader_and_classes_json(tmp_path):
    ds = load_voc(_voc(tmp_path / "v", classes_json={"classes": ["bg", "thing"]}))
    assert ds.class_names == ("bg", "thing") and len(ds) == 2
    img, m = ds[0]
    assert img.size == (5, 4) and m.shape == (4, 5) and m.max() == 1


def test_voc_missing_files_named(tmp_path):
    root = _voc(tmp_path / "v")
    (root / "JPEGImages" / "x2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="JPEGImages/x2.jpg"):
        load_voc(root)
    with pytest.raises(FileNotFoundError, match="Segmentation/test.txt"):
        load_voc(root, split="test")
    (root / "classes.json").write_text("[oops")
    (root / "JPEGImages" / "x2.jpg").write_bytes((root / "JPEGImages" / "x1.jpg").read_bytes())
    with pytest.raises(ValueError, match="classes.json is not valid JSON"):
        load_voc(root)


def test_ade20k_reduce_zero_label(tmp_path):
    for sub in ("images/validation", "annotations/validation"): (tmp_path / sub).mkdir(parents=True)
    Image.new("RGB", (2, 1)).save(tmp_path / "images/validation/a.jpg")
    Image.fromarray(np.array([[0, 150]], np.uint8), mode="L").save(tmp_path / "annotations/validation/a.png")
    assert load_ade20k(tmp_path)[0][1].tolist() == [[255, 149]]
    with pytest.raises(FileNotFoundError, match="images/training"):
        load_ade20k(tmp_path, split="training")


class _Vocab:
    words = ("background", "red", "green", "blue")
    def __len__(self): return 4


class _Patches:
    "4x4 grid of 8x8 patches on a 32x32 input; patch vector = (darkness, r, g, b)."
    vocab, grid = _Vocab(), (4, 4)
    def preprocess(self, img):
        return torch.from_numpy(np.asarray(img.convert("RGB").resize((32, 32)), np.float32) / 255).permute(2, 0, 1)
    def encode_patches(self, x):
        c = F.avg_pool2d(x, 8).flatten(2).transpose(1, 2)
        return torch.cat([1 - c.amax(-1, keepdim=True), c], -1)
    def encode_text(self, texts):
        return F.normalize(torch.tensor([[float(w in t.split()) for w in self.vocab.words] for t in texts]), dim=-1)


def _scene(W=40, H=24):
    a = np.zeros((H, W, 3), np.uint8); m = np.zeros((H, W), np.int64)
    a[:, : W // 4] = (255, 0, 0); m[:, : W // 4] = 1
    a[:, W // 4:] = (0, 0, 255); m[:, W // 4:] = 3
    a[H // 2:, : W // 4] = 0; m[H // 2:, : W // 4] = 0          # bottom-left dark = background
    return Image.fromarray(a), m


def test_patchdis_perfect_and_permuted():
    img, m = _scene()
    ds = SegmentationSet((img,), (m,), ("background", "red", "green", "blue"))
    r = evaluate_patchdis(_Patches(), ds, upsample="nearest", progress=False)
    assert r["mIoU"] == 100.0 and np.isnan(r["iou"][2])          # green absent
    # red <-> blue names swapped: background right (100), red and blue 0 -> mIoU 100/3
    r = evaluate_patchdis(_Patches(), ds, class_names=("background", "blue", "green", "red"), upsample="nearest", progress=False)
    assert r["mIoU"] == pytest.approx(100 / 3)
    assert r["pixel_acc"] == pytest.approx(100 * (m == 0).mean())
    assert list(r["per_class"].columns[:2]) == ["class", "iou"]


def test_class_text_vectors_rejects_empty_and_unknown():
    with pytest.raises(ValueError, match=r"class name 0 \(''\) is empty"):
        class_text_vectors(_Patches(), ["", "red"])
    with pytest.raises(ValueError, match="'teal' map to an all-zero"):
        class_text_vectors(_Patches(), ["red", "teal"])


def test_upsample_modes():
    labels = torch.tensor([[[0, 1], [1, 0]]])
    assert upsample_predictions(labels, (4, 4), "nearest")[0, :, 0].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="needs score maps"):
        upsample_predictions(labels, (4, 4), "bilinear")
    with pytest.raises(ValueError, match="mode must be"):
        upsample_predictions(labels, (4, 4), "bicubic")


def test_overlay_figure_legend():
    img, m = _scene()
    fig = overlay_figure(img, m, m, ("background", "red", "green", "blue"))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["background", "red", "blue"]
    with pytest.raises(ValueError, match="same height and width"):
        overlay_figure(img, m[:5], m, ("a", "b", "c", "d"))


def test_scene_world_voc(tmp_path):
    scenes = pytest.importorskip("lexvla.scenes")
    w = scenes.build_world(tmp_path, n_train=0, n_test=2, n_val=1, progress=False)
    ds = load_voc(w.voc_dir, split="test")
    assert ds.class_names == tuple(w.classes) and len(ds) == 2
    img, m = ds[0]
    assert m.shape == (img.height, img.width) and 0 <= m.min() and m.max() < len(ds.class_names)
