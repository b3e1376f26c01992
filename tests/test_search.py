"""LexicalIndex behaviour: agreement with brute force, hand-computed scores, each bad input's error, and recovery
from a failed add and from a process killed in the middle of an add. The server backend (`ServerIndex`, through
qdrant-client) runs here against qdrant-client's local mode: no Qdrant server is reachable in CI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qdrant_client import QdrantClient

from lexvla.search import META, META_POINT, SHARD, Hit, LexicalIndex, ServerIndex, brute_force, sparsify, word_query

WORDS = ["red", "star", "blue", "ring", "big", "image"]
DOCS = torch.tensor([[0.8, 0.5, 0.0, 0.0, 0.3, 0.1],    # a big red star
                     [0.0, 0.0, 0.9, 0.4, 0.0, 0.2],    # a blue ring
                     [0.6, 0.0, 0.0, 0.7, 0.0, 0.4]])   # a red ring
IDS = ["star", "blue ring", "red ring"]


def random_vectors(n: int, V: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    skew = torch.linspace(2.0, 0.05, V)[torch.randperm(V, generator=g)]          # frequent and rare words
    mask = torch.rand(n, V, generator=g) < density * skew
    return torch.nn.functional.normalize(torch.rand(n, V, generator=g) * mask, dim=1)


@pytest.mark.parametrize("setting", [{}, {"top_k": 40}])
def test_top10_equals_brute_force(setting):
    V = 800
    docs, queries = random_vectors(1500, V, 0.15, 0), random_vectors(40, V, 0.03, 1)
    queries = queries[(queries > 0).any(1)]
    words = [f"w{j}" for j in range(V)]
    with LexicalIndex(words, **setting) as ix:
        ix.add([f"d{i}" for i in range(len(docs))], docs)
        hits = ix.search(queries, k=10)
        ref_s, ref_i = brute_force(queries, ix.stored(docs), 10)
    assert [[h.id for h in r] for r in hits] == [[f"d{i}" for i in row] for row in ref_i.tolist()]
    torch.testing.assert_close(torch.tensor([[h.score for h in r] for r in hits]), ref_s, rtol=1e-5, atol=1e-6)


def test_scores_and_words_by_hand():
    # τ = 1/√6 = 0.408 stores: star {red .8, star .5}, blue ring {blue .9}, red ring {red .6, ring .7}
    with LexicalIndex(WORDS) as ix:
        ix.add(IDS, DOCS)
        q = word_query(["red", "ring"], WORDS, [2.0, 1.0])
        hits = ix.search(q, k=5)[0]
    assert [h.id for h in hits] == ["red ring", "star"]                  # the blue ring shares no stored word
    assert hits[0].score == pytest.approx(2 * 0.6 + 0.7)
    assert [w for w, _ in hits[0].words] == ["red", "ring"]
    assert [c for _, c in hits[0].words] == pytest.approx([1.2, 0.7])
    assert hits[1].words == [("red", pytest.approx(1.6))]
    assert isinstance(hits[0], Hit) and hits[0].score == pytest.approx(sum(c for _, c in hits[0].words))


def test_in_memory_index_leaves_nothing_behind():
    ix = LexicalIndex(WORDS)
    root = ix.root
    ix.add(IDS, DOCS)
    assert root.is_dir() and ix.path is None
    ix.close()
    assert not root.exists()


BAD_ADDS = [
    (["x"], torch.ones(1, 5), "width 5 but the index has 6 words"),
    (["x"], torch.ones(1, 6, 1), "must be [N, 6]"),
    (["x"], -torch.ones(1, 6), "negative values (row 0)"),
    (["x", "y"], torch.tensor([[1.0] * 6, [float("nan")] * 6]), "NaN or infinite values (row 1)"),
    (["x", "y"], torch.ones(1, 6), "2 ids for 1 vectors"),
    (["x", "x"], torch.ones(2, 6), "duplicated ids in this batch: ['x']"),
    (["star", "new"], torch.ones(2, 6), "ids already in the index: ['star']"),
    ("x", torch.ones(1, 6), "a list of strings, not one string"),
    ([7], torch.ones(1, 6), "non-empty strings"),
    (["x"], torch.zeros(1, 6), "no word left after sparsification"),
]


@pytest.mark.parametrize("ids,vectors,message", BAD_ADDS, ids=[m for *_, m in BAD_ADDS])
def test_bad_add_names_the_problem_and_changes_nothing(ids, vectors, message):
    with LexicalIndex(WORDS) as ix:
        ix.add(IDS, DOCS)
        with pytest.raises((ValueError, TypeError), match=None) as e:
            ix.add(ids, vectors)
        assert message in str(e.value)
        assert len(ix) == 3 and ix.meta["size"] == 3
        ix.add(["after"], torch.ones(1, 6))                           # adding after a refused add works
        assert len(ix) == 4


@pytest.mark.parametrize("query,k,message", [
    (torch.zeros(6), 10, "query 0 has no active word"),
    (torch.tensor([[1.0, 0, 0, 0, 0, 0], [0.0] * 6]), 10, "query 1 has no active word"),
    (torch.ones(1, 7), 10, "queries have width 7"),
    (-torch.ones(6), 10, "queries hold negative values"),
    (torch.full((6,), float("inf")), 10, "queries hold NaN or infinite values"),
    (torch.ones(6), 0, "k must be a positive integer"),
])
def test_bad_query_names_the_problem(query, k, message):
    with LexicalIndex(WORDS) as ix:
        ix.add(IDS, DOCS)
        with pytest.raises(ValueError) as e:
            ix.search(query, k=k)
        assert message in str(e.value)


def test_bad_construction():
    with pytest.raises(ValueError, match="not both"): LexicalIndex(WORDS, tau=0.1, top_k=3)
    with pytest.raises(ValueError, match="unique"): LexicalIndex(["a", "a"])
    with pytest.raises(ValueError, match="not in the vocabulary: \\['dragon'\\]"): word_query(["dragon"], WORDS)


def test_paths_without_an_index_or_with_a_damaged_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder does not exist"): LexicalIndex.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{META} is missing"): LexicalIndex.open(tmp_path / "empty")
    good = tmp_path / "good"
    with LexicalIndex(WORDS, good) as ix: ix.add(IDS, DOCS)
    with pytest.raises(FileExistsError, match="already holds a lexical index"): LexicalIndex(WORDS, good)

    def damaged(name, spoil):
        p = tmp_path / name
        shutil.copytree(good, p)
        spoil(p)
        return p
    p = damaged("json", lambda p: (p / META).write_text("{not json"))
    with pytest.raises(ValueError, match="is not valid JSON"): LexicalIndex.open(p)
    p = damaged("foreign", lambda p: (p / META).write_text(json.dumps({"format": "other"})))
    with pytest.raises(ValueError, match="not a lexvla index description"): LexicalIndex.open(p)
    p = damaged("noshard", lambda p: shutil.rmtree(p / SHARD))
    with pytest.raises(ValueError, match=f"the engine folder {SHARD}/ is missing"): LexicalIndex.open(p)
    def wipe_shard(p):
        shutil.rmtree(p / SHARD); (p / SHARD).mkdir(); (p / SHARD / "edge_config.json").write_text("garbage")
    p = damaged("garbage", wipe_shard)
    with pytest.raises(ValueError, match="damaged lexical index"): LexicalIndex.open(p)
    def lose_count(p):
        m = json.loads((p / META).read_text()); m["size"] = 5; (p / META).write_text(json.dumps(m))
    p = damaged("count", lose_count)
    with pytest.raises(ValueError, match="records 5 vectors, the engine holds 3"): LexicalIndex.open(p)
    with LexicalIndex.open(good) as ix:                                  # the original is untouched
        assert len(ix) == 3 and ix.words == WORDS


class _Flaky:
    "The engine shard, except that its n-th update raises."
    def __init__(self, shard, n: int): self.shard, self.n = shard, n
    def update(self, op):
        self.n -= 1
        if self.n == 0: raise OSError("no space left on device")
        return self.shard.update(op)
    def __getattr__(self, name): return getattr(self.shard, name)


def test_add_after_a_failed_add(tmp_path):
    with LexicalIndex(WORDS, tmp_path / "ix") as ix:
        ix.add(IDS[:1], DOCS[:1])
        ix.batch_rows, ix._shard = 1, _Flaky(ix._shard, 2)                # the second point's update fails
        with pytest.raises(OSError, match="no space left"): ix.add(IDS[1:], DOCS[1:])
        assert len(ix) == 1 and ix.meta["size"] == 1
        ix.add(IDS[1:], DOCS[1:])
        assert len(ix) == 3
    with LexicalIndex.open(tmp_path / "ix") as ix:
        assert len(ix) == 3
        assert [h.id for h in ix.search(word_query(["red", "blue"], WORDS))[0]] == ["blue ring", "star", "red ring"]


CHILD = textwrap.dedent("""
    import sys, time, torch
    from lexvla.search import LexicalIndex
    ix = LexicalIndex.open(sys.argv[1])
    ix.batch_rows = 1

    class Stall:
        "Flush after the third point, say so, then hang: the parent kills us here."
        def __init__(self, shard): self.shard, self.n = shard, 0
        def update(self, op):
            r = self.shard.update(op); self.n += 1
            if self.n == 3:
                self.shard.flush(); print("mid-add", flush=True); time.sleep(120)
            return r
        def __getattr__(self, name): return getattr(self.shard, name)

    ix._shard = Stall(ix._shard)
    ix.add([f"b{i}" for i in range(8)], torch.rand(8, 6) + 0.5)
""")


def test_reopen_after_a_process_killed_mid_add(tmp_path):
    path = tmp_path / "ix"
    with LexicalIndex(WORDS, path) as ix: ix.add(IDS, DOCS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "mid-add"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    with LexicalIndex.open(path) as ix:                                  # the three points of the killed add are undone
        assert len(ix) == 3 and ix.meta["size"] == 3
        hits = ix.search(torch.ones(6), k=10)[0]
        assert sorted(h.id for h in hits) == sorted(IDS)
        ix.add([f"b{i}" for i in range(8)], torch.rand(8, 6) + 0.5)      # the same add, run again, works
        assert len(ix) == 11
    with LexicalIndex.open(path) as ix: assert len(ix) == 11


def test_sparsified_storage_matches_the_library():
    with LexicalIndex(WORDS, top_k=1) as ix:
        assert torch.equal(ix.stored(DOCS), sparsify(DOCS, top_k=1))
        ix.add(IDS, DOCS)
        hits = ix.search(word_query(["red", "star", "blue", "ring"], WORDS), k=3)[0]
    assert {h.id: h.words[0][0] for h in hits} == {"star": "red", "blue ring": "blue", "red ring": "ring"}


# The server backend, on qdrant-client's local mode (the same client API, in the process)

def server_index(words=WORDS, collection: str = "ix", client: QdrantClient | None = None, **setting) -> ServerIndex:
    return LexicalIndex(words, client=client or QdrantClient(location=":memory:"), collection=collection, **setting)


@pytest.mark.parametrize("setting", [{}, {"top_k": 40}])
def test_server_top10_equals_edge_and_brute_force(setting):
    V = 800
    docs, queries = random_vectors(1500, V, 0.15, 0), random_vectors(12, V, 0.03, 1)
    queries = queries[(queries > 0).any(1)]
    words, ids = [f"w{j}" for j in range(V)], [f"d{i}" for i in range(len(docs))]
    with LexicalIndex(words, **setting) as edge:
        edge.add(ids, docs)
        want = edge.search(queries, k=10)
        ref_s, ref_i = brute_force(queries, edge.stored(docs), 10)
    with server_index(words, **setting) as server:
        assert isinstance(server, ServerIndex)
        server.add(ids, docs)
        got = server.search(queries, k=10)
    assert [[h.id for h in r] for r in got] == [[h.id for h in r] for r in want]
    assert [[h.id for h in r] for r in got] == [[f"d{i}" for i in row] for row in ref_i.tolist()]
    scores = torch.tensor([[h.score for h in r] for r in got])
    torch.testing.assert_close(scores, torch.tensor([[h.score for h in r] for r in want]), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, ref_s, rtol=0, atol=1e-5)
    for r, w in zip(got, want):
        for a, b in zip(r, w):
            assert [x for x, _ in a.words] == [x for x, _ in b.words]
            assert sum(c for _, c in a.words) == pytest.approx(a.score, abs=1e-5)


def test_server_scores_words_and_reopen():
    client = QdrantClient(location=":memory:")
    with server_index(client=client, collection="toy", top_k=2) as ix:
        ix.add(IDS, DOCS)
    ix = LexicalIndex.connect(client=client, collection="toy")
    assert (len(ix), ix.words, ix.meta["top_k"], ix.meta["tau"], ix.meta["batches"]) == (3, WORDS, 2, None, 1)
    hits = ix.search(word_query(["red", "ring"], WORDS, [2.0, 1.0]), k=5)[0]
    assert [h.id for h in hits] == ["red ring", "star", "blue ring"]     # top 2 keeps blue .9 and ring .4 of the blue ring
    assert [h.score for h in hits] == pytest.approx([2 * 0.6 + 0.7, 2 * 0.8, 0.4])
    assert hits[0].words == [("red", pytest.approx(1.2)), ("ring", pytest.approx(0.7))]
    assert ix.search(torch.ones(6), k=10)[0] and META_POINT not in {h.id for h in ix.search(torch.ones(6), k=10)[0]}
    ix.add(["after"], torch.ones(1, 6))
    assert len(LexicalIndex.connect(client=client, collection="toy")) == 4


@pytest.mark.parametrize("ids,vectors,message", BAD_ADDS, ids=[m for *_, m in BAD_ADDS])
def test_server_bad_add_names_the_problem_and_changes_nothing(ids, vectors, message):
    with server_index() as ix:
        ix.add(IDS, DOCS)
        with pytest.raises((ValueError, TypeError)) as e:
            ix.add(ids, vectors)
        assert message in str(e.value)
        assert len(ix) == 3 and ix.meta["size"] == 3
        ix.add(["after"], torch.ones(1, 6))
        assert len(ix) == 4


@pytest.mark.parametrize("query,k,message", [
    (torch.zeros(6), 10, "query 0 has no active word"),
    (torch.ones(1, 7), 10, "queries have width 7"),
    (-torch.ones(6), 10, "queries hold negative values"),
    (torch.full((6,), float("nan")), 10, "queries hold NaN or infinite values"),
    (torch.ones(6), 0, "k must be a positive integer"),
])
def test_server_bad_query_names_the_problem(query, k, message):
    with server_index() as ix:
        ix.add(IDS, DOCS)
        with pytest.raises(ValueError, match=None) as e:
            ix.search(query, k=k)
        assert message in str(e.value)


def test_server_collections_that_are_missing_taken_or_foreign():
    client = QdrantClient(location=":memory:")
    with pytest.raises(FileNotFoundError, match="no lexical index at collection 'nothing' of the given client"):
        LexicalIndex.connect(client=client, collection="nothing")
    server_index(client=client, collection="taken").close()
    with pytest.raises(FileExistsError, match="'taken' .* already exists"): server_index(client=client, collection="taken")
    client.create_collection("foreign", vectors_config={})
    with pytest.raises(ValueError, match="not a lexvla index"): LexicalIndex.connect(client=client, collection="foreign")
    with pytest.raises(ValueError, match="path .* or url/client"): LexicalIndex(WORDS, "somewhere", client=client)
    with pytest.raises(ValueError, match="need url= or client="): LexicalIndex(WORDS, collection="images")
    with pytest.raises(ValueError, match="not both"): server_index(client=client, collection="x", tau=0.1, top_k=3)
    with server_index(client=client, collection="dropped") as ix: ix.drop()
    assert not client.collection_exists("dropped")


class _FlakyClient:
    "The client, except that its n-th upsert raises."
    def __init__(self, client, n: int): self.client, self.n = client, n
    def upsert(self, *a, **kw):
        self.n -= 1
        if self.n == 0: raise ConnectionError("server unreachable")
        return self.client.upsert(*a, **kw)
    def __getattr__(self, name): return getattr(self.client, name)


def test_server_add_after_a_failed_add():
    client = QdrantClient(location=":memory:")
    with server_index(client=client) as ix:
        ix.add(IDS[:1], DOCS[:1])
        ix.batch_rows, ix._client = 1, _FlakyClient(client, 2)            # the second point's upsert fails
        with pytest.raises(ConnectionError, match="server unreachable"): ix.add(IDS[1:], DOCS[1:])
        assert len(ix) == 1 and ix.meta["size"] == 1
        ix.add(IDS[1:], DOCS[1:])
        assert len(ix) == 3
    ix = LexicalIndex.connect(client=client, collection="ix")
    assert len(ix) == 3 and ix.meta["batches"] == 2
    assert [h.id for h in ix.search(word_query(["red", "blue"], WORDS))[0]] == ["blue ring", "star", "red ring"]


def test_server_connect_undoes_an_add_whose_process_died():
    client = QdrantClient(location=":memory:")
    with server_index(client=client) as ix:
        ix.add(IDS, DOCS)
        ix._write(2, ["half", "done"], ix.stored(torch.ones(2, 6)))     # points of batch 2, never committed
        assert len(ix) == 5
    ix = LexicalIndex.connect(client=client, collection="ix")
    assert len(ix) == 3 and sorted(h.id for h in ix.search(torch.ones(6))[0]) == sorted(IDS)
    ix.add(["half", "done"], torch.ones(2, 6))
    assert len(ix) == 5
