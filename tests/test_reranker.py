"""The rerank stage: batching and truncation, micro-batching across requests, timeouts, and the API."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from app.retrieval.reranker import MicroBatcher, Reranker
from app.services import derive_pipeline
from tests.servers import app_client


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory):
    """A CrossEncoder from the offline MiniLM weights with a seeded, untrained head (any CrossEncoder works)."""
    import torch
    from sentence_transformers import CrossEncoder

    from indexer.encoders import resolve_model_path

    torch.manual_seed(0)
    model = CrossEncoder(resolve_model_path("default"), num_labels=1, max_length=128, device="cpu")
    path = tmp_path_factory.mktemp("cross-encoder")
    model.save(str(path))
    return path


@pytest.fixture(scope="session")
def reranker(cross_encoder_dir):
    return Reranker.load(str(cross_encoder_dir), max_length=128, device="cpu", batch_size=4)


def test_batched_sorted_scores_equal_one_by_one_and_long_passages_truncate(reranker):
    long_passage = "the history of bread " * 2000  # ~8000 tokens, far beyond max_length
    pairs = [
        ("bread", "Yeast makes dough rise."),
        ("bread", long_passage),
        ("stars", "Stars fuse hydrogen."),
        ("music", "A piano has 88 keys."),
        ("x", "short"),
        ("bread", "Sourdough uses a starter culture."),
    ]
    import torch

    batched = reranker.score(pairs)
    logits = [
        reranker.model.predict([list(p)], activation_fn=torch.nn.Identity(), show_progress_bar=False) for p in pairs
    ]
    assert batched.shape == (6,) and np.isfinite(batched).all()
    assert batched == pytest.approx(np.array(logits).reshape(-1), abs=1e-4)
    # scores are logits (what `min_rerank_score` and the z-interpolation expect), not the default sigmoid
    probabilities = reranker.model.predict([list(p) for p in pairs], show_progress_bar=False)
    assert 1 / (1 + np.exp(-batched)) == pytest.approx(probabilities, abs=1e-4)


def test_direct_scoring_gives_the_wrappers_scores_and_steps_aside_when_it_would_not(reranker):
    from app.retrieval.reranker import DirectPairScorer

    assert reranker.direct  # a torch CrossEncoder scores through the direct path
    unknown_words = ("x" * 150 + " ") * 20  # each word one [UNK]: its cut prefix keeps only 6 of its 20 tokens
    pairs = [
        ("bread", "the history of bread " * 400),  # cut, and the cut still overflows: the full text's truncation
        ("bread", unknown_words),  # cut without overflowing: tokenized again whole
        ("a question far longer than its passage " * 10, "Short."),  # longest_first trims the query
        ("café naïve", "Ünïcödé, (brackets) [more]; dashes — here."),
        ("x", "y"),
    ]
    direct = reranker._direct(pairs)
    assert direct == pytest.approx(reranker._predict(pairs), abs=1e-5)
    cut = reranker._direct._cut(unknown_words)
    assert len(cut) < len(unknown_words)
    assert abs(float(reranker._predict([("bread", cut)])[0]) - float(direct[1])) > 1e-4  # the redo mattered
    # a direct path that would not give the wrapper's scores is refused at load
    assert DirectPairScorer.of(reranker.model, lambda batch: reranker._predict(batch) + 0.01) is None
    assert DirectPairScorer.of(reranker.model, reranker._predict) is not None


def test_micro_batcher_pools_concurrent_requests(reranker):
    batcher = MicroBatcher(reranker, max_batch_size=64, max_wait_ms=50)
    requests = [[(f"query {r}", f"passage {r}-{i} about topic {i}") for i in range(5)] for r in range(8)]

    async def run():
        return await asyncio.gather(*(batcher.score(pairs) for pairs in requests))

    results = asyncio.run(run())
    assert batcher.pairs_scored == 40 and batcher.batches < 8  # pooled across requests
    for pairs, scores in zip(requests, results):
        assert scores == pytest.approx(reranker.score(pairs), abs=1e-4)


def test_micro_batcher_waits_for_company_only_when_some_may_come(reranker):
    """A batch started by a request that expects company waits `max_wait` for others; one started by a lone
    request (`company=False`, what a lone reranked search passes) is scored at once. Observed through the
    batcher's own count of batches that waited (`waits`), not through timings that depend on the CPU."""
    import time

    batcher = MicroBatcher(reranker, max_batch_size=64, max_wait_ms=400)
    pairs = [("query", f"passage {i} about a topic") for i in range(3)]

    async def timed(company: bool) -> float:
        started = time.perf_counter()
        await batcher.score(pairs, company=company)
        return time.perf_counter() - started

    asyncio.run(timed(False))
    assert (batcher.batches, batcher.waits) == (1, 0)  # a lone request's batch did not wait
    assert asyncio.run(timed(True)) >= 0.4  # a lower bound (the wait itself), whatever the CPU's speed
    assert (batcher.batches, batcher.waits) == (2, 1)  # this batch waited, once
    asyncio.run(timed(False))
    assert (batcher.batches, batcher.waits) == (3, 1)


def test_lone_reranked_search_does_not_wait_but_concurrent_ones_pool(example_pipeline, reranker):
    """Through the pipeline: one reranked search at a time never pays `max_wait_ms`; 6 at once still share
    cross-encoder batches. Observed through the batcher's count of batches that waited (`waits`), so that
    neither depends on the CPU's speed (the wait is long, so that concurrent searches surely pool)."""
    settings = example_pipeline.settings.model_copy(deep=True)
    settings.reranker.model = "test-cross-encoder"
    settings.reranker.maxsim, settings.reranker.weights, settings.reranker.interpolation = False, None, 1.0
    settings.reranker.max_wait_ms = 1000
    pipeline = derive_pipeline(example_pipeline, settings, reranker)
    options = pipeline.options(k=5, rerank_depth=8)

    async def lone() -> None:
        for query in ("how do stars form", "volcano eruptions", "ocean tides"):
            result = await pipeline.search(query, options)
            assert result.hits[0].stages["rerank"].score is not None

    asyncio.run(lone())
    assert pipeline.batcher.batches == 3 and pipeline.batcher.waits == 0  # each scored at once, none waited
    batches = pipeline.batcher.batches

    async def together() -> None:
        await asyncio.gather(*(pipeline.search(f"query number {i} about stars", options) for i in range(6)))

    asyncio.run(together())
    assert pipeline.batcher.batches - batches < 6  # pooled across the concurrent searches
    assert pipeline.batcher.waits >= 1  # their batch waited for company
    assert pipeline.batcher.searching == 0


@pytest.fixture(scope="module")
def reranking_pipeline(example_pipeline, reranker):
    settings = example_pipeline.settings.model_copy(deep=True)
    settings.reranker.model = "test-cross-encoder"
    settings.reranker.maxsim, settings.reranker.weights, settings.reranker.interpolation = False, None, 1.0
    return derive_pipeline(example_pipeline, settings, reranker)


def test_rerank_orders_by_cross_encoder_score_and_explains(reranking_pipeline):
    options = reranking_pipeline.options(k=10, rerank_depth=20)
    assert options.rerank is True
    result = asyncio.run(reranking_pipeline.search("how do stars form", options))
    stages = [h.stages["rerank"] for h in result.hits]
    assert [s.rank for s in stages] == list(range(1, 11))
    assert [h.score for h in result.hits] == sorted((s.score for s in stages), reverse=True)
    assert "rerank" in result.timings_ms


def test_rerank_timeout_returns_fused_order_marked_skipped(reranking_pipeline):
    slow = reranking_pipeline.settings.model_copy(deep=True)
    slow.reranker.timeout_ms = 0.001
    pipeline = derive_pipeline(reranking_pipeline, slow)
    query = "volcano eruptions and magma"
    timed_out = asyncio.run(pipeline.search(query, pipeline.options(k=8)))
    fused = asyncio.run(pipeline.search(query, replace(pipeline.options(k=8), rerank=False)))
    assert [h.passage_id for h in timed_out.hits] == [h.passage_id for h in fused.hits]
    assert {h.stages["rerank"].note for h in timed_out.hits} == {"skipped (timeout)"}


def test_api_reranks_by_default_when_configured(example_index, cross_encoder_dir):
    from app.settings import load_settings

    settings = load_settings(  # reranking_pipeline's second stage: the cross-encoder alone, interpolated fully
        bundle=example_index,
        reranker={"model": str(cross_encoder_dir), "maxsim": False, "weights": None, "interpolation": 1.0},
        runtime={"reranker": "torch"},  # as the `reranker` fixture runs it
        generator={"backend": "none"},
        answer={"mode": "generative"},
    )
    with app_client(settings) as client:
        data = client.post("/v1/search", json={"query": "coral reef bleaching", "k": 5, "rerank_depth": 10}).json()
        assert set(data["hits"][0]["explain"]) == {"bm25", "dense", "fused", "rerank"}
        assert [h["explain"]["rerank"]["rank"] for h in data["hits"]] == [1, 2, 3, 4, 5]
        off = client.post("/v1/search", json={"query": "coral reef bleaching", "k": 5, "rerank": False}).json()
        assert "rerank" not in off["hits"][0]["explain"]
        # the 10 candidates scored (rerank_depth), not the 5 returned; the rerank=false request adds none
        assert 'sift_reranked_candidates_total{collection="default"} 10.0' in client.get("/metrics").text
        client.post("/v1/search/batch", json={"queries": ["coral reef", "bread"], "k": 3, "rerank_depth": 4})
        assert 'sift_reranked_candidates_total{collection="default"} 18.0' in client.get("/metrics").text


def test_maxsim_reranker_scores_late_interaction_and_plugs_into_the_pipeline(example_pipeline):
    from app.retrieval.maxsim import MaxSimReranker, is_maxsim

    assert is_maxsim("maxsim") and is_maxsim("maxsim:/models/x") and not is_maxsim("cross-encoder/x")
    maxsim = MaxSimReranker.load("maxsim", max_length=128, device="cpu")
    pairs = [
        ("why does bread rise", "Yeast ferments sugars in the dough and releases carbon dioxide."),
        ("why does bread rise", "Saturn's rings are made of countless pieces of water ice."),
        ("why does bread rise", "why does bread rise"),
    ]
    scores = maxsim.score(pairs)
    assert scores[0] > scores[1] and scores[2] == pytest.approx(1.0, abs=1e-4)
    settings = example_pipeline.settings.model_copy(deep=True)
    settings.reranker.model, settings.reranker.interpolation = "maxsim", 0.5
    settings.reranker.maxsim, settings.reranker.weights = False, None  # MaxSimReranker, interpolated
    pipeline = derive_pipeline(example_pipeline, settings, maxsim)
    result = asyncio.run(pipeline.search("how do honeybees communicate", pipeline.options(k=5, rerank_depth=10)))
    assert result.hits[0].doc_id == "bio-012"
    assert [h.stages["rerank"].rank for h in result.hits] == [1, 2, 3, 4, 5]


def test_reranker_setting_accepts_none_and_resolves_the_shipped_folder_from_anywhere(tmp_path, monkeypatch):
    from app.settings import PROJECT_ROOT, load_settings

    assert load_settings(reranker={"model": "none"}).reranker.model is None
    assert load_settings(reranker={"model": ""}).reranker.model is None
    monkeypatch.chdir(tmp_path)
    resolved = load_settings(reranker={"model": "models/sift-reranker-minilm-l6"}).reranker.model
    assert resolved == str(PROJECT_ROOT / "models" / "sift-reranker-minilm-l6")
    assert load_settings(reranker={"model": "cross-encoder/ms-marco-MiniLM-L-6-v2"}).reranker.model == (
        "cross-encoder/ms-marco-MiniLM-L-6-v2"
    )


def test_a_real_server_reranks_with_the_shipped_cross_encoder(example_index):
    """The opt-in documented in configs/default.yaml: SIFT_RERANKER__MODEL=models/sift-reranker-minilm-l6."""
    import httpx

    from tests.servers import sift_server

    env = {
        "SIFT_BUNDLE": str(example_index),
        "SIFT_GENERATOR__BACKEND": "none",
        "SIFT_RERANKER__MODEL": "models/sift-reranker-minilm-l6",
        "SIFT_RERANKER__MAX_LENGTH": "128",
        "SIFT_RERANKER__INTERPOLATION": "0.5",
    }
    with sift_server(env) as (base, _):
        info = httpx.get(f"{base}/v1/info", timeout=10).json()
        assert "sift-reranker-minilm-l6" in str(info)
        for query, expected in [("how do stars form?", "astro-001"), ("how do honeybees communicate", "bio-012")]:
            response = httpx.post(f"{base}/v1/search", json={"query": query, "k": 5, "rerank_depth": 20}, timeout=60)
            assert response.status_code == 200, response.text
            hits = response.json()["hits"]
            assert hits[0]["doc_id"] == expected, [h["doc_id"] for h in hits]
            assert [h["explain"]["rerank"]["rank"] for h in hits] == [1, 2, 3, 4, 5]
            assert hits[0]["explain"]["rerank"]["score"] > 0  # a relevance logit: the model calls it relevant
