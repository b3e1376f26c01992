"""lexvla.data with DataLoader worker processes: skipped samples are counted in the main process, whatever the
number of workers (the notebook tests run with num_workers=0)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lexvla.data import CorruptDataError, DataConfig, PairLoader, default_transform, resolve_rank


def _jpg(i: int) -> bytes:
    px = np.random.default_rng(i).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(px).save(b, format="JPEG", quality=90)
    return b.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Two shards, each with 5 good samples and 3 damaged ones (truncated jpg, no caption, bad UTF-8)."""
    d = tmp_path_factory.mktemp("shards")
    good = {}
    for s in range(2):
        m = []
        for i in range(5):
            k = f"{s}{i:04d}"
            good[k] = f"shard {s} sample {i}"
            m += [(f"{k}.jpg", _jpg(10 * s + i)), (f"{k}.txt", good[k].encode()), (f"{k}.json", b"{}")]
        m += [(f"t{s}.jpg", _jpg(99)[:300]), (f"t{s}.txt", b"truncated"),
              (f"n{s}.jpg", _jpg(98)),
              (f"u{s}.jpg", _jpg(97)), (f"u{s}.txt", b"\xff\xfe\xfa")]
        _tar(d / f"{s:05d}.tar", m)
    return d, good


def _read(d: Path, num_workers: int, **kw) -> tuple[dict[str, str], PairLoader]:
    cfg = DataConfig(urls=str(d), batch_size=2, resampled=False, shuffle_buffer=3, num_workers=num_workers,
                     drop_last=False, **kw)
    loader = PairLoader(cfg, default_transform(16))
    got = {}
    for b in loader:
        assert b["image"].shape[1:] == (3, 16, 16)
        got.update(zip(b["key"], b["text"]))
    return got, loader


@pytest.mark.parametrize("num_workers", [0, 2])
def test_counts_reach_main_process(shards, num_workers: int) -> None:
    d, good = shards
    got, loader = _read(d, num_workers, max_corrupt_fraction=1.0)
    assert got == good
    assert loader.counter.counts == {"bad_image": 2, "missing_caption": 2, "bad_utf8": 2}
    assert (loader.counter.good, loader.counter.seen) == (10, 16)


def test_fraction_limit_with_workers(shards) -> None:
    d, _ = shards
    with pytest.raises(CorruptDataError, match=r"6 of 16 samples skipped, fraction 0\.375 > max_corrupt_fraction=0\.300"):
        _read(d, 2, max_corrupt_fraction=0.3, min_samples=16)


def test_rank_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (3, 4)
    assert resolve_rank(0, 2) == (0, 2)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert resolve_rank() == (0, 1)
