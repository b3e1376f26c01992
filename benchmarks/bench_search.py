"""Lexical search benchmark: `lexvla.search.LexicalIndex` (Qdrant Edge) against brute force and Seismic.

Synthetic corpora of the paper's shape: V = 17,109 words, 300–1,100 active words per vector (uniform), words drawn
without replacement with probability ∝ 1/rank (Zipf), log-normal weights, unit L2 norm, then the 1/√V threshold
(it removes a few percent). Queries: the same law with 16–256 active words. Each method runs in its own process,
so its peak memory (VmHWM) is its own:

    PYTHONPATH=. python benchmarks/bench_search.py --sizes 10000,100000,1000000 --out benchmarks/results/search_cpu.json

- brute force: one CSR matrix (int32 indices) in torch; per-query latency of `X @ q` + top-10, and queries/s of
  one product with all queries at once. Its top 10 is the ground truth of the others.
- lexvla: `LexicalIndex.add` in chunks, then `optimize`; a second process reopens the index and measures per-query
  latency of `search(q, k=10)` (hits with their words), queries/s of one `search` with all queries, recall@10 and
  exact agreement of the top-10 list with brute force.
- seismic (`pip install pyseismic-lsr`, optional): approximate; its recall@10 is reported.

Corpora are cached under `--cache` (1M vectors: ~5.6 GB). Timings on a shared machine vary: re-run what looks noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

V = 17_109


def vm(key: str = "VmHWM") -> float:
    "A /proc/self/status memory figure in MiB (VmHWM: peak resident set)."
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"): return int(line.split()[1]) / 1024
    return float("nan")


def du(path: Path) -> int:
    "Bytes allocated on disk under `path` (preallocated but unwritten file space is not counted)."
    return sum(f.stat().st_blocks * 512 for f in Path(path).rglob("*") if f.is_file())


def zipf_logp(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lp = torch.empty(V)
    lp[torch.randperm(V, generator=g)] = -torch.log(torch.arange(1, V + 1, dtype=torch.float64)).float()
    return lp


def generate(out: Path, n: int, lo: int, hi: int, seed: int, chunk: int = 2000, sigma: float = 0.5) -> None:
    "Write n vectors as CSR files (indptr.npy int64, indices.bin int32, data.bin float32), chunk by chunk."
    out.mkdir(parents=True, exist_ok=True)
    g, lp = torch.Generator().manual_seed(seed), zipf_logp()
    ptr, tot = [np.zeros(1, np.int64)], 0
    with open(out / "indices.bin", "wb") as fi, open(out / "data.bin", "wb") as fd:
        for a in range(0, n, chunk):
            b = min(n, a + chunk) - a
            k = torch.randint(lo, hi + 1, (b,), generator=g)
            u = torch.rand(b, V, generator=g).clamp_(1e-30)
            idx = (lp - torch.log(-torch.log(u))).topk(hi, dim=1).indices           # Gumbel top-k: Zipf without replacement
            val = torch.exp(sigma * torch.randn(b, hi, generator=g)) * (torch.arange(hi)[None] < k[:, None])
            val = val / val.norm(dim=1, keepdim=True)
            val = torch.where(val >= V ** -0.5, val, 0)                             # the 1/√V threshold
            key, order = torch.where(val > 0, idx, V + 1).sort(dim=1)
            val = val.gather(1, order)
            m = val > 0
            fi.write(key[m].int().numpy().tobytes()); fd.write(val[m].numpy().tobytes())
            cnt = m.sum(1).numpy()
            ptr.append(tot + np.cumsum(cnt)); tot += int(cnt.sum())
    np.save(out / "indptr.npy", np.concatenate(ptr))
    (out / "done").write_text(str(n))


def load(d: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ptr = np.load(d / "indptr.npy")
    return (ptr, np.memmap(d / "indices.bin", np.int32, "r", shape=(int(ptr[-1]),)),
            np.memmap(d / "data.bin", np.float32, "r", shape=(int(ptr[-1]),)))


def dense_rows(ptr, ind, dat, a: int, b: int) -> torch.Tensor:
    "Rows a..b as a dense [b-a, V] tensor."
    out = torch.zeros(b - a, V)
    s, e = int(ptr[a]), int(ptr[b])
    rows = np.repeat(np.arange(b - a), np.diff(ptr[a:b + 1]))
    out[torch.from_numpy(rows), torch.from_numpy(np.asarray(ind[s:e], np.int64))] = torch.from_numpy(np.asarray(dat[s:e]))
    return out


def queries(cache: Path) -> torch.Tensor:
    return dense_rows(*load(cache / "queries"), 0, len(np.load(cache / "queries" / "indptr.npy")) - 1)


def lat_stats(lat: list[float]) -> dict:
    a = np.array(lat) * 1e3
    return {"p50_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "n": len(a)}


# ---------------------------------------------------------------- workers (each in its own process)
def work_brute(cache: Path, n: int, args) -> dict:
    t = time.perf_counter()
    ptr, ind, dat = load(cache / f"docs_{n}")
    X = torch.sparse_csr_tensor(torch.from_numpy(ptr.astype(np.int32)), torch.from_numpy(np.array(ind)),
                                torch.from_numpy(np.array(dat)), (n, V))
    build = time.perf_counter() - t
    Q = queries(cache)
    lat = []
    for q in Q[:args.bf_latency_queries]:
        t = time.perf_counter(); X.matmul(q[:, None])[:, 0].topk(10); lat.append(time.perf_counter() - t)
    t = time.perf_counter(); S = X.matmul(Q.T.contiguous()); top = S.topk(10, dim=0); tb = time.perf_counter() - t
    np.save(cache / f"truth_{n}.npy", top.indices.T.numpy()); np.save(cache / f"truth_scores_{n}.npy", top.values.T.numpy())
    return {"build_s": build, "memory_mib": vm(), "index_bytes": int(ptr[-1]) * 8 + (n + 1) * 4,
            "latency": lat_stats(lat), "qps_batch": len(Q) / tb, "qps_single": 1 / np.mean(lat)}


def work_lexvla_build(cache: Path, n: int, args) -> dict:
    from lexvla.search import LexicalIndex
    path = cache / f"lexvla_{n}"
    shutil.rmtree(path, ignore_errors=True)
    ptr, ind, dat = load(cache / f"docs_{n}")
    t = time.perf_counter()
    ix = LexicalIndex([f"w{j}" for j in range(V)], path)
    for a in range(0, n, args.chunk):
        b = min(n, a + args.chunk)
        ix.add([f"d{i}" for i in range(a, b)], dense_rows(ptr, ind, dat, a, b))
    ix.optimize(); ix.close()
    return {"build_s": time.perf_counter() - t, "build_peak_mib": vm(), "disk_bytes": du(path)}


def work_lexvla_serve(cache: Path, n: int, args) -> dict:
    from lexvla.search import LexicalIndex
    Q = queries(cache)
    truth = np.load(cache / f"truth_{n}.npy")
    t = time.perf_counter(); ix = LexicalIndex.open(cache / f"lexvla_{n}"); open_s = time.perf_counter() - t
    for q in Q[:10]: ix.search(q, k=10)                                                # warm the page cache
    lat, got = [], []
    for q in Q:
        t = time.perf_counter(); h = ix.search(q, k=10)[0]; lat.append(time.perf_counter() - t)
        got.append([int(x.id[1:]) for x in h])
    t = time.perf_counter(); ix.search(Q, k=10); tb = time.perf_counter() - t
    res = {"open_s": open_s, "latency": lat_stats(lat), "qps_batch": len(Q) / tb, "qps_single": 1 / np.mean(lat),
           "memory_mib": vm(), "rss_anon_mib": vm("RssAnon"), "segments": ix._shard.info().segments_count}
    ix.close()
    return res | score(got, truth)


def score(got: list[list[int]], truth: np.ndarray) -> dict:
    rec = np.mean([len(set(g) & set(t.tolist())) / 10 for g, t in zip(got, truth)])
    same = np.mean([g == t.tolist() for g, t in zip(got, truth)])
    return {"recall_at_10": float(rec), "same_top10_list": float(same)}


def work_seismic(cache: Path, n: int, args) -> dict:
    import seismic
    ptr, ind, dat = load(cache / f"docs_{n}")
    t = time.perf_counter()
    ds = seismic.SeismicDataset()
    for a in range(0, n, 50_000):
        b = min(n, a + 50_000); s, e = int(ptr[a]), int(ptr[b])
        ds.add_documents_by_id([str(i) for i in range(a, b)], np.asarray(ind[s:e], np.int64), np.asarray(dat[s:e]),
                               (ptr[a:b + 1] - ptr[a]).astype(np.int64))
    ix = seismic.SeismicIndex.build_from_dataset(ds, n_postings=args.seismic_postings, centroid_fraction=0.1,
                                                 summary_energy=0.4, num_threads=2)
    build = time.perf_counter() - t
    del ds
    zq = load(cache / "queries"); truth = np.load(cache / f"truth_{n}.npy")
    qs = [(np.array([str(j) for j in zq[1][zq[0][i]:zq[0][i + 1]]], dtype=seismic.get_seismic_string()),
           np.asarray(zq[2][zq[0][i]:zq[0][i + 1]], np.float32)) for i in range(len(zq[0]) - 1)]
    out = {"build_s": build, "build_peak_mib": vm(), "params": {"n_postings": args.seismic_postings}}
    for qc, hf in [(int(x.split(":")[0]), float(x.split(":")[1])) for x in args.seismic_search.split(",")]:
        lat, got = [], []
        for i, (c, v) in enumerate(qs):
            t = time.perf_counter(); r = ix.search(str(i), c, v, 10, qc, hf); lat.append(time.perf_counter() - t)
            got.append([int(x[2]) for x in r])
        out[f"query_cut={qc},heap_factor={hf}"] = {"latency": lat_stats(lat), "qps_single": 1 / np.mean(lat)} | score(got, truth)
    return out


WORKERS = {"brute": work_brute, "lexvla_build": work_lexvla_build, "lexvla_serve": work_lexvla_serve,
           "seismic": work_seismic}


def run_worker(name: str, n: int, args) -> dict:
    "Run one worker in a fresh process; its result, or the error it died with."
    cmd = [sys.executable, __file__, "--worker", name, "--sizes", str(n), "--cache", str(args.cache),
           "--chunk", str(args.chunk), "--bf-latency-queries", str(args.bf_latency_queries),
           "--seismic-postings", str(args.seismic_postings), "--seismic-search", args.seismic_search]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    print(f"  {name} n={n}: {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines: return {"error": (p.stderr or p.stdout)[-2000:], "returncode": p.returncode}
    return json.loads(lines[-1][7:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--methods", default="brute,lexvla,seismic", help="any of brute, lexvla, lexvla_serve (queries "
                    "on the index already built), seismic")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lexvla_bench_search"))
    ap.add_argument("--chunk", type=int, default=5000, help="vectors per LexicalIndex.add")
    ap.add_argument("--bf-latency-queries", type=int, default=50, help="queries timed one by one for brute force")
    ap.add_argument("--seismic-postings", type=int, default=3500)
    ap.add_argument("--seismic-search", default="20:0.7,1000:0.9", help="query_cut:heap_factor settings")
    ap.add_argument("--seismic-max-n", type=int, default=100_000, help="larger corpora skip Seismic (build time)")
    ap.add_argument("--timeout", type=int, default=5400)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(2)
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args.cache, sizes[0], args)), flush=True)
        return {}
    if not (args.cache / "queries" / "done").exists(): generate(args.cache / "queries", args.queries, 16, 256, seed=2)
    import importlib.metadata as md
    def ver(p):
        try: return md.version(p)
        except md.PackageNotFoundError: return None
    res = {"meta": {"V": V, "doc_words": [300, 1100], "query_words": [16, 256], "zipf_s": 1.0, "queries": args.queries,
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "qdrant_edge_py": ver("qdrant-edge-py"), "pyseismic_lsr": ver("pyseismic-lsr"),
                    "machine": platform.processor() or platform.machine(),
                    "load_note": "2-core machine shared with other jobs; timings include their load"},
           "sizes": {}}
    if args.out and args.out.exists(): res["sizes"] = json.loads(args.out.read_text()).get("sizes", {})  # keep other runs
    methods = args.methods.split(",")
    for n in sizes:
        d = args.cache / f"docs_{n}"
        if not (d / "done").exists():
            t = time.time(); generate(d, n, 300, 1100, seed=1); print(f"generated {n}: {time.time() - t:.0f} s", file=sys.stderr)
        ptr = np.load(d / "indptr.npy")
        r = res["sizes"].get(str(n), {}) | {"nnz_per_vector": float(ptr[-1] / n)}
        if "brute" in methods or not (args.cache / f"truth_{n}.npy").exists(): r["brute_force"] = run_worker("brute", n, args)
        if "lexvla" in methods:
            r["lexvla"] = run_worker("lexvla_build", n, args)
            if "error" not in r["lexvla"]: r["lexvla"] |= run_worker("lexvla_serve", n, args)
        elif "lexvla_serve" in methods: r["lexvla"] = r.get("lexvla", {}) | run_worker("lexvla_serve", n, args)  # re-measure queries only
        if "seismic" in methods and n <= args.seismic_max_n:
            try:
                import seismic  # noqa: F401
                r["seismic"] = run_worker("seismic", n, args)
            except ImportError: r["seismic"] = {"error": "pyseismic-lsr is not installed"}
        res["sizes"][str(n)] = r
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True); args.out.write_text(json.dumps(res, indent=1))
        print(json.dumps({n: r}, indent=1), file=sys.stderr, flush=True)
    return res


if __name__ == "__main__":
    main()
