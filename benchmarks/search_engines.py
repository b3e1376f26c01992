"""The engine choice of `nbs/lib/79_search.ipynb`, measured: build and query one embedded engine on a cached corpus.

Uses the corpora and ground truth that `bench_search.py` caches (run it first for the sizes you want). Needs only
numpy and the engine's own package, so each engine can live in its own virtual environment:

    python -m venv /tmp/ml25 && /tmp/ml25/bin/pip install numpy "pymilvus==2.5.18" "milvus-lite==2.5.1" "setuptools<81"
    /tmp/ml25/bin/python benchmarks/search_engines.py milvus-lite --sizes 10000,100000
    .venv/bin/pip install "qdrant-client==1.20.0" && .venv/bin/python benchmarks/search_engines.py qdrant-local --sizes 10000 --queries 20
    .venv/bin/python benchmarks/search_engines.py qdrant-edge --sizes 10000,100000

Results are merged into `benchmarks/results/search_engines.json` under "<engine> <version>".
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np


def load(d: Path):
    ptr = np.load(d / "indptr.npy")
    nnz = int(ptr[-1])
    return ptr, np.memmap(d / "indices.bin", np.int32, "r", shape=(nnz,)), np.memmap(d / "data.bin", np.float32, "r", shape=(nnz,))


def rows(csr, a: int, b: int):
    ptr, ind, dat = csr
    for i in range(a, b):
        yield np.asarray(ind[ptr[i]:ptr[i + 1]]).tolist(), np.asarray(dat[ptr[i]:ptr[i + 1]]).tolist()


def peak_mib(pids=("self",)) -> float:
    out = 0.0
    for p in pids:
        try: out += next(int(l.split()[1]) for l in open(f"/proc/{p}/status") if l.startswith("VmHWM")) / 1024
        except (OSError, StopIteration): pass
    return out


def milvus_lite(path: Path, docs, n: int, queries: list):
    from pymilvus import DataType, MilvusClient
    c = MilvusClient(str(path) + ".db")
    schema = c.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vec", DataType.SPARSE_FLOAT_VECTOR)
    ip = c.prepare_index_params()
    ip.add_index("vec", index_type="SPARSE_INVERTED_INDEX", metric_type="IP", params={"inverted_index_algo": "DAAT_MAXSCORE"})
    c.create_collection("docs", schema=schema, index_params=ip)
    for a in range(0, n, 2000):
        c.insert("docs", [{"id": a + r, "vec": dict(zip(*v))} for r, v in enumerate(rows(docs, a, min(n, a + 2000)))])
    c.flush("docs"); c.load_collection("docs")
    info = c.describe_index("docs", c.list_indexes("docs")[0])
    search = lambda q: [h["id"] for h in c.search("docs", data=[dict(zip(*q))], anns_field="vec", limit=10,
                                                 search_params={"metric_type": "IP", "params": {"drop_ratio_search": 0.0}})[0]]
    server = [p for p in os.listdir("/proc") if p.isdigit() and b"milvus_lite/lib/milvus" in open(f"/proc/{p}/cmdline", "rb").read()]
    return search, {"indexed_rows": info.get("indexed_rows"), "server_pids": server}


def qdrant_local(path: Path, docs, n: int, queries: list):
    from qdrant_client import QdrantClient, models
    c = QdrantClient(path=str(path))
    c.create_collection("docs", vectors_config={}, sparse_vectors_config={"vec": models.SparseVectorParams()})
    for a in range(0, n, 1000):
        c.upsert("docs", [models.PointStruct(id=a + r, vector={"vec": models.SparseVector(indices=i, values=v)})
                          for r, (i, v) in enumerate(rows(docs, a, min(n, a + 1000)))])
    return lambda q: [p.id for p in c.query_points("docs", query=models.SparseVector(indices=q[0], values=q[1]),
                                                  using="vec", limit=10).points], {}


def qdrant_edge(path: Path, docs, n: int, queries: list):
    import qdrant_edge as qe
    s = qe.EdgeShard.create(str(path), qe.EdgeConfig(sparse_vectors={"vec": qe.EdgeSparseVectorParams()}))
    for a in range(0, n, 2000):
        s.update(qe.UpdateOperation.upsert_points([qe.Point(a + r, {"vec": qe.SparseVector(i, v)})
                                                   for r, (i, v) in enumerate(rows(docs, a, min(n, a + 2000)))]))
    s.optimize(); s.flush()
    return lambda q: [p.id for p in s.query(qe.QueryRequest(limit=10, query=qe.Query.Nearest(qe.SparseVector(*q), using="vec")))], {}


ENGINES = {"milvus-lite": (milvus_lite, "milvus-lite"), "qdrant-local": (qdrant_local, "qdrant-client"),
           "qdrant-edge": (qdrant_edge, "qdrant-edge-py")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine", choices=sorted(ENGINES))
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lexvla_bench_search"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_engines.json")
    args = ap.parse_args(argv)
    fn, pkg = ENGINES[args.engine]
    key = f"{args.engine} {md.version(pkg)}"
    qcsr = load(args.cache / "queries")
    queries = list(rows(qcsr, 0, min(args.queries, len(qcsr[0]) - 1)))
    res = json.loads(args.out.read_text()) if args.out.exists() else {}
    for n in map(int, args.sizes.split(",")):
        docs, truth = load(args.cache / f"docs_{n}"), np.load(args.cache / f"truth_{n}.npy")
        path = Path(f"/tmp/lexvla_engine_{args.engine}_{n}")
        for old in (path, Path(str(path) + ".db")):                          # a folder, or Milvus Lite 2's file
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        t = time.perf_counter(); search, info = fn(path, docs, n, queries); build = time.perf_counter() - t
        for q in queries[:3]: search(q)
        lat, rec = [], []
        for q, tr in zip(queries, truth):
            t = time.perf_counter(); got = search(q); lat.append(time.perf_counter() - t)
            rec.append(len(set(got) & set(tr.tolist())) / 10)
        lat = np.array(lat) * 1e3
        r = {"build_s": build, "p50_ms": float(np.median(lat)), "p99_ms": float(np.percentile(lat, 99)),
             "queries": len(lat), "recall_at_10": float(np.mean(rec)),
             "peak_mib": peak_mib(["self", *info.pop("server_pids", [])]), **info}
        res.setdefault(key, {})[str(n)] = r
        print(key, n, json.dumps(r), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True); args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
