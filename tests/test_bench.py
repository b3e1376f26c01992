"""The benchmark script's pure parts: the largest-batch search and the synthetic captions (no GPU needed)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_paper  # noqa: E402


def test_search_max_batch_brackets_the_limit():
    for limit in (8, 37, 100, 413, 1000, 5000):
        lo, hi, probes = bench_paper.search_max_batch(lambda b: b <= limit, start=64, log=lambda *a: None)
        assert lo <= limit and (hi is None or hi > limit)
        assert lo % 8 == 0 or lo == 0
        assert hi is None or hi - lo <= max(16, 0.08 * lo)  # the bracket is tight
        assert all(ok == (b <= limit) for b, ok in probes)


def test_search_max_batch_when_nothing_fits():
    lo, hi, probes = bench_paper.search_max_batch(lambda b: False, start=64, log=lambda *a: None)
    assert lo == 0 and hi == 8 and not any(ok for _, ok in probes)  # bisects down to the smallest multiple of 8


def test_captions_have_cc12m_length():
    caps = bench_paper.make_captions(500, random.Random(0))
    n = [len(c.split()) for c in caps]
    assert min(n) >= 14 and max(n) <= 26 and 18 <= sum(n) / len(n) <= 22
