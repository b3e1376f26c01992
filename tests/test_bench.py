"""The benchmark script's pure parts: the largest-batch search and the synthetic captions (no GPU needed)."""
from __future__ import annotations

import math
import random
import statistics
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


def test_lognormal_params_give_the_mean_and_sd():
    "The log-normal's own moments, E = exp(mu + s^2/2) and Var = (exp(s^2) - 1) exp(2 mu + s^2), give back CC-12M's 20.2 +- 16.3."
    mu, s = bench_paper.lognormal_params(20.2, 16.3)
    assert abs(math.exp(mu + s * s / 2) - 20.2) < 1e-9
    assert abs(math.sqrt((math.exp(s * s) - 1) * math.exp(2 * mu + s * s)) - 16.3) < 1e-9


def test_captions_have_cc12m_length():
    "Word counts follow CC-12M's distribution: mean ~20 words, a long tail, and the dataset's 3-256-word filter."
    caps = bench_paper.make_captions(20000, random.Random(0))
    n = [len(c.split()) for c in caps]
    assert min(n) >= 3 and max(n) <= 256
    assert 19.2 <= statistics.mean(n) <= 21.2 and 13 <= statistics.stdev(n) <= 19
    assert 0.04 <= sum(k > 50 for k in n) / len(n) <= 0.07     # the tail: P(words > 50) = 5.0% for this log-normal
    fixed = bench_paper.make_captions(50, random.Random(0), words=(14, 26))
    assert all(14 <= len(c.split()) <= 26 for c in fixed)
