"""Sharded bundles: corpus-wide BM25 statistics, the shard plan, the fan-out merge, and a sharded SciFact
served over HTTP giving the unsharded results (the acceptance check of sharding)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from indexer.bm25 import index_bm25, tokenize
from indexer.build import build_bundle, reshard_bundle
from indexer.bundle import BundleError, open_bundle
from indexer.config import BM25Settings
from indexer.shards import BM25Stats, CorpusBM25, plan_shards
from indexer.tokens import TokenStore
from tests.conftest import EXAMPLES, SCIFACT, SHARED_DATA_WORKER, needs_scifact
from tests.servers import sift_server

QUERIES = ["how do stars form", "neural network training", "tea and coffee", "database index structures", "zzzz"]


def test_plan_shards_is_contiguous_balanced_and_keeps_documents_whole() -> None:
    sizes = [3, 1, 1, 1, 5, 1, 1, 2, 1, 4]
    plan = plan_shards(sizes, 3)
    assert plan[0][0] == 0 and plan[-1][1] == len(sizes)
    assert all(a < b for a, b in plan) and all(plan[i][1] == plan[i + 1][0] for i in range(2))
    loads = [sum(sizes[a:b]) for a, b in plan]
    assert sum(loads) == sum(sizes) and max(loads) - min(loads) <= 5  # balanced up to a document's size
    assert plan_shards([1, 1, 1], 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="more than the 2 documents"):
        plan_shards([4, 4], 3)
    with pytest.raises(ValueError, match="between 1 and"):
        plan_shards([1], 0)


def test_corpus_wide_bm25_scores_equal_the_unsharded_index() -> None:
    texts = [json.loads(line)["text"] for line in EXAMPLES.read_text().splitlines()]
    settings = BM25Settings()
    whole = index_bm25(texts, settings)
    tokens = tokenize(texts, settings)
    cuts = [0, 40, 41, 100, len(texts)]  # uneven shards, one of a single passage
    parts = [BM25Stats.of(tokens[a:b]) for a, b in zip(cuts, cuts[1:])]
    stats = BM25Stats.merge(reversed(parts))  # a reduce: order does not matter
    assert stats.documents == len(texts) and stats.tokens == sum(len(t) for t in tokens)
    corpus = CorpusBM25(stats, settings)
    shards = [corpus.shard_model(tokens[a:b]) for a, b in zip(cuts, cuts[1:])]
    for query in QUERIES[:4]:
        q = tokenize([query], settings)[0]
        expected = np.asarray(whole.get_scores([t for t in q if t in whole.vocab_dict] or [""]), dtype=np.float32)
        got = np.concatenate(
            [np.asarray(s.get_scores([t for t in q if t in s.vocab_dict]), dtype=np.float32) for s in shards]
        )
        assert expected.max() > 0
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # a shard scored with its own statistics would differ: the test can fail
    local = index_bm25(texts[:40], settings)
    q = [t for t in tokenize([QUERIES[0]], settings)[0] if t in local.vocab_dict]
    assert not np.allclose(local.get_scores(q), shards[0].get_scores(q), atol=1e-5)


@pytest.fixture(scope="module")
def sharded_examples(example_index, tmp_path_factory) -> Path:
    """examples/corpus.jsonl in 3 shards with int8 token vectors: compared with the int8 example build, stage by
    stage (pq codebooks of two separate builds agree only when their encoders' outputs agree to the bit)."""
    from indexer.config import DenseSettings, IndexConfig

    out = tmp_path_factory.mktemp("sharded")
    build_bundle(EXAMPLES, out, IndexConfig(dense=DenseSettings(token_vectors="int8")), show_progress=False, shards=3)
    return out


def test_a_fresh_sharded_pq_build_has_one_codebook(tmp_path) -> None:
    """A sharded build with the shipped config (pq) trains one codebook over all its shards' tokens: every shard
    stores the same one (tests/test_token_pq.py: it is the codebook of the shards' tokens taken together)."""
    from indexer.config import load_index_config
    from tests.conftest import ROOT, write_jsonl

    docs = [json.loads(line) for line in EXAMPLES.read_text().splitlines()][:60]
    build_bundle(
        write_jsonl(tmp_path / "docs.jsonl", docs),
        tmp_path / "sharded",
        load_index_config(ROOT / "configs" / "default.yaml"),
        show_progress=False,
        shards=3,
    )
    info = open_bundle(tmp_path / "sharded", verify=True)
    stores = [TokenStore.of_bundle(open_bundle(info.root / e["name"])) for e in info.manifest["shards"]["map"]]
    assert len(stores) == 3 and all(s.dtype == "pq" and s.pq is not None for s in stores)
    assert all(s.pq.same(stores[0].pq) for s in stores[1:])
    assert stores[0].pq.rotation is not None  # OPQ, as configured


def test_sharded_build_layout_and_manifest(sharded_examples, example_index) -> None:
    info = open_bundle(sharded_examples, verify=True)
    entries = info.manifest["shards"]["map"]
    assert [e["name"] for e in entries] == ["shard-000", "shard-001", "shard-002"]
    whole = open_bundle(example_index, verify=False).manifest
    assert sum(e["passages"] for e in entries) == whole["counts"]["passages"] == info.manifest["counts"]["passages"]
    assert [e["offset"] for e in entries] == list(np.cumsum([0] + [e["passages"] for e in entries[:-1]]))
    assert info.manifest["shards"]["bm25"]["documents"] == whole["counts"]["passages"]
    for i, entry in enumerate(entries):
        shard = open_bundle(info.root / entry["name"], verify=True)  # each shard is a bundle of its own
        assert shard.manifest["shard"] == {"index": i, "count": 3, "offset": entry["offset"], "parent": info.build_id}
        assert shard.manifest["dense"]["token_vectors"]["passages"] == entry["passages"]
    assert info.manifest["engine"]["name"] == "local"


def test_sharded_pipeline_ranks_exactly_as_the_unsharded_one(sharded_examples, example_index) -> None:
    from app.services import load_pipeline
    from app.settings import load_settings

    one = load_pipeline(load_settings(bundle=example_index, reranker={"model": None}))
    three = load_pipeline(load_settings(bundle=sharded_examples, reranker={"model": None}))
    assert three.docstore.num_passages == one.docstore.num_passages
    assert [r[0] for r in three.docstore.passage_rows()] == [r[0] for r in one.docstore.passage_rows()]
    for name in ("bm25", "dense"):
        for a, b in zip(one.searchers[name].search_many(QUERIES, 50), three.searchers[name].search_many(QUERIES, 50)):
            assert [h.idx for h in a] == [h.idx for h in b] and [h.passage_id for h in a] == [h.passage_id for h in b]
            assert max([abs(x.score - y.score) for x, y in zip(a, b)] or [0]) <= 1e-4
            assert [h.stages[name].rank for h in b] == list(range(1, len(b) + 1))
    # rows fetched through the sharded docstore are the same passages; filters are concatenated per shard
    rows = [0, 57, one.docstore.num_passages - 1]
    assert {i: p["id"] for i, p in three.docstore.passages(rows).items()} == {
        i: p["id"] for i, p in one.docstore.passages(rows).items()
    }
    doc = one.docstore.passage_rows()[-1][1]
    assert three.docstore.document(doc)["id"] == doc
    metadata_key = next(iter(one.docstore.passages([0])[0]["metadata"]), None)
    if metadata_key is not None:
        value = one.docstore.passages([0])[0]["metadata"][metadata_key]
        filters = {metadata_key: value if not isinstance(value, (dict, list)) else json.dumps(value)}
        np.testing.assert_array_equal(three.docstore.filter_mask(filters), one.docstore.filter_mask(filters))


def test_reshard_equals_a_sharded_build_and_refusals(sharded_examples, example_index, tmp_path) -> None:
    result = reshard_bundle(example_index, tmp_path / "re", 3, show_progress=False)
    built = open_bundle(sharded_examples, verify=False).manifest["shards"]["map"]
    resharded = open_bundle(result.path, verify=True).manifest
    assert resharded["shards"]["map"] == built and resharded["parent"] == open_bundle(example_index).build_id
    with pytest.raises(BundleError, match="already sharded"):
        reshard_bundle(sharded_examples, tmp_path / "again", 2, show_progress=False)
    from indexer.update import update_bundle

    ids = tmp_path / "delete.txt"
    ids.write_text("nope\n")
    with pytest.raises(BundleError, match="sharded build"):
        update_bundle(sharded_examples, delete=ids)
    # a shard's file damaged: the sharded build is refused by the parent's checksums
    damaged = tmp_path / "damaged"
    shutil.copytree(result.path, damaged)
    with open(damaged / "shard-001" / "docstore.sqlite", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\xff\xff")
    with pytest.raises(BundleError, match="shard-001/docstore.sqlite"):
        open_bundle(damaged, verify=True)
    shutil.rmtree(damaged / "shard-002")
    with pytest.raises(BundleError, match="shard-002"):
        open_bundle(damaged, verify=False)


# -- SciFact, served over HTTP: sharded (S = 3) vs unsharded ------------------------------------------------


@needs_scifact
@SHARED_DATA_WORKER
@pytest.mark.slow
@pytest.mark.heavy  # over the SciFact bundle (see tests/test_regression_scifact.py)
def test_sharded_scifact_over_http_matches_the_unsharded_bundle(scifact_index, tmp_path) -> None:
    from app.eval.retrieval import evaluate, load_beir

    sharded = reshard_bundle(scifact_index, tmp_path / "sharded", 3, show_progress=False).path
    dataset = load_beir(SCIFACT, "test")

    def run(bundle: Path) -> dict[str, dict[str, list[dict]]]:
        out: dict[str, dict[str, list[dict]]] = {}
        with sift_server({"SIFT_BUNDLE": str(bundle)}) as (base, _), httpx.Client(timeout=60) as client:
            for mode in ("bm25", "dense", "hybrid"):
                for qid, query in dataset.queries.items():
                    body = {"query": query, "mode": mode, "k": 100, "candidates": 100, "rerank": False}
                    response = client.post(f"{base}/v1/search", json={**body, "return_text": False})
                    assert response.status_code == 200, response.text
                    out.setdefault(mode, {})[qid] = response.json()["hits"]
        return out

    one, three = run(scifact_index), run(sharded)
    reordered = 0
    for mode in ("bm25", "dense"):
        for qid in dataset.queries:
            a = {h["passage_id"]: h["score"] for h in one[mode][qid]}
            b = {h["passage_id"]: h["score"] for h in three[mode][qid]}
            assert len(a) == len(b) and (len(a) == 100 or mode == "bm25"), (mode, qid)
            assert all(abs(a[p] - b[p]) <= 1e-4 for p in a.keys() & b.keys()), (mode, qid)
            # the same passages; FAISS sums a shard's inner products in other blocks than the whole index's,
            # so two scores within float rounding may swap, and only such a near-tie may cross the 100th place
            cut = min(min(a.values(), default=0), min(b.values(), default=0))
            assert all(abs({**a, **b}[p] - cut) <= 1e-4 for p in a.keys() ^ b.keys()), (mode, qid)
            reordered += list(a) != list(b)
    assert reordered <= 30  # near-ties reordered in at most a few rankings (of 600)
    scores = {}
    for name, runs in (("one", one), ("three", three)):
        docs: dict[str, dict[str, float]] = {}
        for qid, ranked in runs["hybrid"].items():
            for rank, hit in enumerate(ranked):
                docs.setdefault(qid, {}).setdefault(hit["doc_id"], float(len(ranked) - rank))
        scores[name] = evaluate(dataset.qrels, docs)["ndcg@10"]
    assert scores["one"] > 0.65
    print(f"sharded SciFact over HTTP: hybrid nDCG@10 {scores}, rankings with near-ties reordered: {reordered}")
    assert abs(scores["one"] - scores["three"]) <= 0.001, scores


def test_sharded_default_second_stage_reranks_as_the_unsharded_one(sharded_examples, int8_example_index) -> None:
    """The default second stage (cross-encoder + MaxSim over each shard's stored token vectors) gives the
    unsharded ranking, scores and per-stage explain on a sharded build (both int8: see `sharded_examples`)."""
    import asyncio

    from app.services import Models, load_pipeline
    from app.settings import load_settings

    settings = load_settings()
    models = Models.load(settings, generator=False, reader=False)
    one = load_pipeline(settings, int8_example_index, models)
    three = load_pipeline(settings, sharded_examples, models)
    assert three.late is not None and three.late.stored and three.second_stage
    for query in QUERIES[:3]:
        a = asyncio.run(one.search(query, one.options(k=10, rerank=True)))
        b = asyncio.run(three.search(query, three.options(k=10, rerank=True)))
        assert [h.passage_id for h in a.hits] == [h.passage_id for h in b.hits]
        assert all(abs(x.score - y.score) <= 1e-4 for x, y in zip(a.hits, b.hits))
        assert all(abs(x.stages["maxsim"].score - y.stages["maxsim"].score) <= 1e-5 for x, y in zip(a.hits, b.hits))
