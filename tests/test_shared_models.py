"""Models own one reranker and one micro-batcher per process (issue 28): every build and collection a process
serves queues its rerank pairs on the model's one batcher, so `reranker.max_queued_pairs` bounds the model
(before: one batcher per pipeline, each bounded alone, all waiting on the model's one lock), and `/v1/rerank`
scores through the same stage as search (`Pipeline.rerank_texts`)."""

from __future__ import annotations

import asyncio

import pytest

from app.retrieval.reranker import QueueFull
from indexer.models import passage_index_text


@pytest.fixture(scope="module")
def two_builds(example_index):
    """Two pipelines over the examples bundle, loaded as a server loads two collections: one `Models`."""
    from app.services import Models, load_pipeline
    from app.settings import load_settings

    settings = load_settings(bundle=example_index, reranker={"max_queued_pairs": 20, "maxsim": False})
    models = Models.load(settings, generator=False, reader=False)
    first, second = load_pipeline(settings, models=models), load_pipeline(settings, models=models)
    yield first, second, models

    async def close() -> None:
        await first.close()
        await second.close()
        await models.close()

    asyncio.run(close())


def test_every_build_queues_on_the_models_one_batcher(two_builds):
    first, second, models = two_builds
    assert first.reranker is second.reranker is models.reranker
    assert first.batcher is second.batcher is models.batchers[id(models.reranker)]
    assert not first.owns_batcher and first.batcher.max_queued == 20


def test_the_queue_limit_bounds_the_model_across_builds(two_builds):
    """12 pairs of the first build wait in the queue; 12 more from the second build exceed the model's 20."""
    first, second, _ = two_builds
    pairs = [("stars", f"passage {i}") for i in range(12)]

    async def both() -> None:
        waiting = asyncio.ensure_future(first.batcher.score(pairs))
        await asyncio.sleep(0)  # the first build's pairs are queued (the batcher waits max_wait_ms for company)
        with pytest.raises(QueueFull, match="max_queued_pairs"):
            await second.batcher.score(pairs)
        assert len(await waiting) == 12

    asyncio.run(both())


def test_rerank_texts_scores_as_search_does(two_builds):
    """The stage `/v1/rerank` calls gives, for a hit's passage sent by id, the raw score search shows."""
    first, _, _ = two_builds
    options = first.options(k=3, rerank_depth=5)
    result = asyncio.run(first.search("how do stars form", options))
    hit = result.hits[0]
    texts = [passage_index_text(result.passages[hit.idx]["title"], result.passages[hit.idx]["text"])]
    reranked = asyncio.run(first.rerank_texts("how do stars form", texts, [hit.idx]))
    assert reranked.truncated == [] and reranked.tokens > 0
    assert reranked.scores[0] == pytest.approx(hit.stages["rerank"].score, abs=1e-4)


def test_the_process_thread_policy_reaches_every_onnx_model_it_holds(two_builds):
    """`Models.warm_up` applies `runtime.spin_wait` to the models it loaded, `Models.encoder` to the
    bi-encoders loaded after it (the query encoder runs on ONNX Runtime by default)."""
    from app.threads import onnx_modules

    first, _, models = two_builds
    modules = onnx_modules(*models.loaded())
    assert modules, "the default query runtime is onnx: the bi-encoder runs an ONNX Runtime session"
    assert models.spin_wait is first.settings.runtime.spin_wait is False
    assert all(m.spin_wait is False for m in modules)


def test_model_loads_take_turns():
    """transformers swaps functions process-wide while it loads (initialisers off, weight tying deferred), so
    two loads at once can leave one model untied (SmolLM2's lm_head on the meta device): every load holds
    `MODEL_LOADS`. A load started while another thread holds it waits, then loads a working model."""
    import threading

    from indexer.encoders import load_encoder
    from indexer.runtime import MODEL_LOADS

    loaded = []
    with MODEL_LOADS:
        thread = threading.Thread(target=lambda: loaded.append(load_encoder("sentence-transformers/all-MiniLM-L6-v2")))
        thread.start()
        thread.join(timeout=15)  # ample for this small model to load (~2 s here) were it not held back
        assert thread.is_alive() and not loaded  # waiting for the lock, not loading beside the holder
    thread.join(timeout=300)
    assert not thread.is_alive() and len(loaded) == 1
    vector = loaded[0].encode(["tides are caused by the moon"])
    assert vector.shape == (1, 384)
