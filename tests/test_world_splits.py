"""The validation split of the scene world: its own held-out pairs, its own seed, no scene shared with train or test.

Brute force over thousands of scene specs (cheap: no rendering), and two small built worlds that differ only in
their validation seed."""
from __future__ import annotations

import hashlib
import json

import pytest

from lexvla import scenes
from lexvla.scenes import SceneConfig, build_world, heldout_pairs, load_world, make_scene, val_heldout_pairs

N_TRAIN, N_EVAL = 3000, 300


def _pairs(spec) -> set[tuple[str, str]]: return {o.pair for o in spec.objects}


def test_heldout_sets_are_disjoint_and_never_trained():
    test, val = set(heldout_pairs()), set(val_heldout_pairs())
    assert len(test) == len(val) == 15 and not test & val
    seen = set().union(*(_pairs(make_scene(0, "train", i).spec) for i in range(N_TRAIN)))
    assert not seen & (test | val)
    assert len(seen) == 100 - 30   # every other pair is trained on


def test_each_eval_image_holds_a_pair_of_its_own_split():
    test, val = set(heldout_pairs()), set(val_heldout_pairs())
    for i in range(N_EVAL):
        v = _pairs(make_scene(1000, "val", i).spec)
        assert v & val and not v & test, (i, v)
        assert _pairs(make_scene(0, "test", i).spec) & test


def test_no_scene_shared_between_splits():
    specs = {"train": [make_scene(0, "train", i).spec for i in range(N_TRAIN)],
             "val": [make_scene(1000, "val", i).spec for i in range(N_EVAL)],
             "test": [make_scene(0, "test", i).spec for i in range(N_EVAL)]}
    for name, s in specs.items(): assert len(set(s)) == len(s), name
    assert not set(specs["train"]) & set(specs["val"])
    assert not set(specs["train"]) & set(specs["test"])
    assert not set(specs["val"]) & set(specs["test"])


def test_test_pairs_unchanged_by_the_validation_pairs():
    # the test split's held-out pairs depend on heldout_seed only, not on the validation settings
    assert heldout_pairs(SceneConfig(val_heldout_seed=7)) == heldout_pairs()
    assert val_heldout_pairs(SceneConfig(val_heldout_seed=7)) != val_heldout_pairs()
    with pytest.raises(ValueError, match="val_heldout_frac"): SceneConfig(heldout_frac=0.3, val_heldout_frac=0.25)


def _digests(root, split: str) -> dict[str, str]:
    k = json.loads((root / "karpathy" / "dataset_scenes.json").read_text())
    return {e["filename"]: hashlib.md5((root / "karpathy" / "images" / e["filename"]).read_bytes()).hexdigest()
            for e in k["images"] if e["split"] == split}


def test_validation_seed_draws_a_new_validation_set_only(tmp_path):
    a = build_world(tmp_path / "a", n_train=20, n_test=6, n_val=6, seed=0, progress=False)
    b = build_world(tmp_path / "b", n_train=20, n_test=6, n_val=6, seed=0, val_seed=77, progress=False)
    assert (a.val_seed, b.val_seed) == (1000, 77) and a.val_heldout == b.val_heldout == val_heldout_pairs()
    assert _digests(a.root, "test") == _digests(b.root, "test")
    assert [p.read_bytes() for p in a.shards] == [p.read_bytes() for p in b.shards]
    assert not set(_digests(a.root, "val").values()) & set(_digests(b.root, "val").values())
    assert load_world(a.root).val_heldout == a.val_heldout


def test_a_world_of_the_old_version_is_refused(tmp_path):
    w = build_world(tmp_path / "w", n_train=4, n_test=2, n_val=2, progress=False)
    d = json.loads((w.root / "world.json").read_text())
    d["version"] = 1
    (w.root / "world.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"version 1, this lexvla writes version {scenes.WORLD_VERSION}"):
        load_world(w.root)
