"""`Engine` (app/engine.py): the one interface of a served build that the API, eval and the benches call; its
failures are typed and carry the field and the status class the API answers with."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app.answering import Answerer
from app.engine import Engine, EngineError, PassageRef, TooLarge, Unavailable


@pytest.fixture(scope="module")
def engine(example_pipeline):
    return Engine(example_pipeline)


def test_options_and_search_are_the_pipelines(engine, example_pipeline):
    options = engine.options(k=4, mode="bm25")
    assert options == example_pipeline.options(k=4, mode="bm25")
    result = asyncio.run(engine.search("how do stars form", options))
    assert [h.passage_id for h in result.hits] == [
        h.passage_id for h in asyncio.run(example_pipeline.search("how do stars form", options)).hits
    ]


def test_failures_are_typed_with_field_and_status(engine):
    with pytest.raises(EngineError) as caught:
        engine.options(k=10_000)
    assert (caught.value.status, caught.value.field) == (422, "k")
    too_many = ["q"] * (engine.settings.search.max_batch_queries + 1)
    with pytest.raises(TooLarge) as caught:
        asyncio.run(engine.search_many(too_many, engine.options(rerank=False)))
    assert (caught.value.status, caught.value.kind, caught.value.field) == (413, "too_many_queries", "queries")
    with pytest.raises(EngineError) as caught:
        asyncio.run(engine.search("x" * (engine.settings.search.max_query_chars + 1), engine.options()))
    assert caught.value.field == "query"
    with pytest.raises(Unavailable) as caught:  # the example pipeline has no second stage
        asyncio.run(engine.rerank_texts("stars", ["a text"]))
    assert (caught.value.status, caught.value.kind, caught.value.field) == (422, "no_reranker", "model")
    with pytest.raises(EngineError) as caught:
        asyncio.run(engine.embed(["stars"], dimensions=7))
    assert caught.value.field == "dimensions"


def test_embed_gives_the_indexs_vectors(engine, example_pipeline):
    embedded = asyncio.run(engine.embed(["how do stars form"]))
    assert embedded.vectors.shape == (1, embedded.dimension) and embedded.tokens > 0
    expected = example_pipeline.searchers["dense"].encode(["how do stars form"])
    np.testing.assert_allclose(embedded.vectors, expected, atol=1e-5)


def test_unknown_passage_ids_name_the_documents_field(example_index):
    from app.services import load_pipeline
    from app.settings import load_settings

    pipeline = load_pipeline(load_settings(bundle=example_index, reranker={"maxsim": False}))
    try:
        engine = Engine(pipeline)
        with pytest.raises(EngineError) as caught:
            asyncio.run(engine.rerank_texts("stars", [PassageRef("no-such-passage")]))
        assert caught.value.field == "documents" and "no-such-passage" in str(caught.value)
        scored = asyncio.run(engine.rerank_texts("how do stars form", ["Stars form in molecular clouds.", "Bread."]))
        assert scored.scores[0] > scored.scores[1]
    finally:
        asyncio.run(pipeline.close())


def test_a_chats_query_is_its_last_user_message_or_a_short_follow_up_with_the_one_before():
    assert Answerer.chat_query(["When was the Eiffel Tower completed?"]) == "When was the Eiffel Tower completed?"
    assert Answerer.chat_query(["Who designed the Eiffel Tower?", "and when?"]) == (
        "Who designed the Eiffel Tower? and when?"
    )
    long = "What causes the tides on the coasts of the oceans?"
    assert Answerer.chat_query(["Who designed the Eiffel Tower?", long]) == long
