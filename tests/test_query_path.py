"""The query path of a reranked search (issue 28): the query is encoded by one bi-encoder forward pass that
gives both its pooled vector (dense retrieval) and its token vectors (MaxSim), and the search makes two
event-loop → thread hand-offs (first-stage-only: one). Counted on the shipped default second stage over the
examples bundle (cross-encoder + MaxSim over the stored pq token codes)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app.retrieval.cache import QueryCache
from app.retrieval.queries import QueryEncoder


@pytest.fixture(scope="module")
def default_pipeline(example_index):
    from app.services import load_pipeline
    from app.settings import load_settings

    pipeline = load_pipeline(load_settings(bundle=example_index))
    assert pipeline.late is not None and pipeline.late.stored and pipeline.reranker is not None
    yield pipeline
    asyncio.run(pipeline.close())


def count_forward_passes(encoder) -> list[int]:  # noqa: ANN001 - a SentenceTransformer
    """Patch the bi-encoder's transformer so each forward pass appends its batch size to the returned list
    (ONNX runtimes: the session's `run`; torch: the module's `forward`)."""
    model = encoder[0].model
    calls: list[int] = []
    if hasattr(model, "run"):
        original = model.run

        def run(inputs, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            calls.append(len(inputs["input_ids"]))
            return original(inputs, *args, **kwargs)

        model.run = run
    else:
        original = model.forward

        def forward(input_ids=None, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            calls.append(len(input_ids))
            return original(input_ids, *args, **kwargs)

        model.forward = forward
    return calls


def search_counting_hand_offs(pipeline, query: str, **options) -> tuple[list, list[str]]:  # noqa: ANN001, ANN003
    """Run one search on a fresh event loop, recording every hand-off from the loop to a thread (both
    `asyncio.to_thread` and an executor go through `loop.run_in_executor`)."""
    hand_offs: list[str] = []

    async def run():  # noqa: ANN202
        loop = asyncio.get_running_loop()
        original = loop.run_in_executor

        def counting(executor, func, *args):  # noqa: ANN001, ANN002, ANN202
            hand_offs.append(getattr(func, "__name__", type(func).__name__))
            return original(executor, func, *args)

        loop.run_in_executor = counting
        return await pipeline.search(query, pipeline.options(**options))

    return asyncio.run(run()), hand_offs


def test_a_reranked_search_encodes_its_query_once(default_pipeline):
    """Before: one pass for the pooled vector, a second for MaxSim's token vectors."""
    encoder = default_pipeline.searchers["dense"].encoder
    calls = count_forward_passes(encoder)
    try:
        result, _ = search_counting_hand_offs(default_pipeline, "how do stars form in molecular clouds", rerank_depth=8)
        assert result.reranked == 8 and all("maxsim" in h.stages for h in result.hits[:8])
        assert calls == [1], f"the query took {len(calls)} bi-encoder passes"
        # the same query again: both outputs come from the cache, no pass at all
        again, _ = search_counting_hand_offs(default_pipeline, "how do stars form  in molecular clouds", rerank_depth=8)
        assert calls == [1]
        assert [h.passage_id for h in again.hits] == [h.passage_id for h in result.hits]
        assert [h.score for h in again.hits] == [h.score for h in result.hits]
    finally:
        del encoder[0].model.__dict__["run" if "run" in encoder[0].model.__dict__ else "forward"]


def test_hand_offs_per_search(default_pipeline):
    """Before: a reranked search made five (first stage, pair reading, cross-encoder, MaxSim, page)."""
    _, reranked = search_counting_hand_offs(default_pipeline, "what causes tides", k=5, rerank_depth=12)
    assert len(reranked) == 2, reranked
    # a page below the reranked depth: its passages were read with the second stage's, still two
    _, deeper = search_counting_hand_offs(default_pipeline, "what causes tides", k=5, offset=10, rerank_depth=4)
    assert len(deeper) == 2, deeper
    _, first_stage = search_counting_hand_offs(default_pipeline, "what causes tides", k=5, rerank=False)
    assert len(first_stage) == 1, first_stage


def test_one_pass_gives_what_two_passes_give(default_pipeline):
    """The pooled and token vectors of the one-pass path equal the separate passes', for one query and for
    a batch longer than an encoding batch (sorted by length): rankings cannot depend on the path."""
    dense = default_pipeline.searchers["dense"]
    settings = dense.settings
    queries = [f"query {i} " + "about stars and galaxies " * (i % 7) for i in range(40)]
    one = QueryEncoder(dense.encoder, settings.model, settings.normalize, QueryCache(64), tokens=True)
    two = QueryEncoder(dense.encoder, settings.model, settings.normalize)
    for batch in (queries[:1], queries):
        vectors, tokens = one.encode(batch), one.query_tokens(batch)
        expected_vectors, expected_tokens = two.encode(batch), two.passage_tokens(batch)
        np.testing.assert_allclose(vectors, expected_vectors, atol=1e-5)
        assert [t.shape for t in tokens] == [t.shape for t in expected_tokens]
        for got, want in zip(tokens, expected_tokens):
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert not one.query_tokens(queries[:1])[0].flags.writeable  # the cache's arrays cannot be altered


def test_token_lru_is_bounded_and_lookups_count_once():
    cache = QueryCache(size=8, token_size=2)
    passes: list[list[str]] = []

    def both(texts):  # noqa: ANN001, ANN202
        passes.append(list(texts))
        return np.ones((len(texts), 3), dtype=np.float32), [np.ones((2, 3), dtype=np.float32) for _ in texts]

    cache.encode_both(("m",), ["a", "b", "c"], both)
    assert len(cache._tokens) == 2 and len(cache) == 3 and (cache.hits, cache.misses) == (0, 3)
    cache.encode_both(("m",), ["c"], both, vectors=False)  # the second stage reading the first stage's entry
    assert passes == [["a", "b", "c"]] and (cache.hits, cache.misses) == (0, 3)
    cache.encode_both(("m",), ["a"], both)  # its tokens were evicted: one pass, for it alone
    assert passes[-1] == ["a"] and (cache.hits, cache.misses) == (0, 4)
    # the vector cache off: tokens still pass from the first stage to the second, vectors are not kept
    off = QueryCache(size=0)
    off.encode_both(("m",), ["q"], both)
    vectors, tokens = off.encode_both(("m",), ["q"], both, vectors=False)
    assert passes[-1] == ["q"] and len(passes) == 3  # one pass for "q": its tokens were read back
    assert len(off) == 0 and len(tokens) == 1 and vectors.size == 0
