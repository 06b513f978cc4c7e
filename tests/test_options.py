"""One merge of defaults and per-call overrides (`Pipeline.options`), for the API, eval and the benches (issue
28): before, the API had its own (`routes.to_options`), and only it ranked at least `k` candidates on a first
page, so eval and the API could rank differently for the same request."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from app.pipeline import InvalidOption


@pytest.fixture(scope="module")
def shallow(example_index):
    """First stage only, 5 candidates per retriever by default."""
    from app.services import load_pipeline
    from app.settings import load_settings

    settings = load_settings(
        bundle=example_index, reranker={"model": None}, search={"default_candidates": 5, "max_k": 50}
    )
    pipeline = load_pipeline(settings)
    yield pipeline
    asyncio.run(pipeline.close())


def test_a_first_page_ranks_at_least_k_candidates_on_every_path(shallow):
    options = shallow.options(k=8, mode="bm25")
    assert options.candidates == 8  # before: 5 here, 8 in the API
    hits = asyncio.run(shallow.search("how do stars form", options)).hits
    assert len(hits) == 8
    # a later page keeps the depth its cursor fixed
    assert shallow.options(k=8, mode="bm25", offset=8).candidates == 5
    # the API answers the same request with the same ranking
    from app.api.main import create_app

    with TestClient(create_app(shallow.settings)) as client:
        deadline = time.monotonic() + 300  # a hang guard: the server loads its build in the background
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        response = client.post("/v1/search", json={"query": "how do stars form", "k": 8, "mode": "bm25"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [h["passage_id"] for h in body["hits"]] == [h.passage_id for h in hits]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"k": 51}, "k"),
        ({"candidates": 1001}, "candidates"),
        ({"rerank_depth": 10_000}, "rerank_depth"),
        ({"rerank": True}, "rerank"),  # no second stage here
    ],
)
def test_options_that_do_not_fit_name_their_field(shallow, overrides, field):
    with pytest.raises(InvalidOption) as caught:
        shallow.options(**overrides)
    assert caught.value.field == field and str(caught.value).startswith(f"{field}: ")


def test_unknown_options_are_refused(shallow):
    with pytest.raises(TypeError, match="unknown search options"):
        shallow.options(topk=3)


def test_allow_partial_is_a_search_option(example_index, tmp_path):
    """Before: a context variable the API set around the call; now an option every caller passes, and the
    results name the shards left out."""
    from app.retrieval.shards import ShardUnavailable
    from app.services import load_pipeline
    from app.settings import load_settings
    from indexer.build import reshard_bundle

    sharded = reshard_bundle(example_index, tmp_path / "index", 2, show_progress=False).path
    pipeline = load_pipeline(load_settings(bundle=sharded, reranker={"model": None}))

    class Dead:
        def search_many(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise TimeoutError("shard frozen")

        search_vectors = search_many

    try:
        for name in ("bm25", "dense"):
            pipeline.searchers[name].shards[1] = Dead()
        with pytest.raises(ShardUnavailable):
            asyncio.run(pipeline.search("how do stars form", pipeline.options(k=5)))
        results = asyncio.run(
            pipeline.search_many(["how do stars form", "tides"], pipeline.options(k=5, allow_partial=True))
        )
        assert [r.missing_shards for r in results] == [["shard-001"], ["shard-001"]]
        assert all(r.hits for r in results)
        whole = asyncio.run(pipeline.search("tides", pipeline.options(k=5, allow_partial=True)))
        assert whole.missing_shards == ["shard-001"]
    finally:
        asyncio.run(pipeline.close())
