"""The stage protocols (app/retrieval/protocols.py) at run time: every local, sharded and remote stage class
declares its protocol and implements each of its members itself (a member left to the protocol's stub would
answer None); mypy checks the signatures (`make lint`). Before issue 28 the interfaces were matched by name,
and the sharded dense searcher lacked `embed` (/v1/embeddings failed on a sharded build)."""

from __future__ import annotations

import asyncio
from typing import Any, Generic, Protocol

import numpy as np
import pytest

from app.retrieval.protocols import (
    BiEncoder,
    DenseRetriever,
    DocstoreReader,
    Retriever,
    TextReranker,
    TokenStoreReader,
    VectorIndex,
)


def protocol_members(protocol: type) -> set[str]:
    """The public members a protocol (and the protocols it extends) declares: methods, properties, attributes."""
    names: set[str] = set()
    for base in protocol.__mro__:
        if base in (object, Protocol, Generic) or not getattr(base, "_is_protocol", False):
            continue
        names |= {n for n in (*vars(base), *getattr(base, "__annotations__", {})) if not n.startswith("_")}
    return names


def missing_members(obj: object, protocol: type) -> list[str]:
    """Members of `protocol` that `obj` does not implement: absent, or inherited from a protocol's stub."""
    missing = []
    for name in sorted(protocol_members(protocol)):
        definer = next((base for base in type(obj).__mro__ if name in vars(base)), None)
        if definer is None:  # an attribute: set on the instance
            if name not in vars(obj):
                missing.append(name)
        elif getattr(definer, "_is_protocol", False):
            missing.append(name)
    return missing


def check(obj: object, *protocols: type) -> None:
    for protocol in protocols:
        assert isinstance(obj, protocol), f"{type(obj).__name__} is not a {protocol.__name__}"
        assert protocol in type(obj).__mro__, f"{type(obj).__name__} does not declare {protocol.__name__}"
        assert missing_members(obj, protocol) == [], f"{type(obj).__name__} lacks {protocol.__name__} members"


def test_the_member_check_catches_a_member_left_to_the_protocol():
    class Incomplete(DenseRetriever):  # no embed: mypy refuses to construct it; at run time it answers None
        name = "dense"

        def search_many(self, queries: list[str], k: int, mask: np.ndarray | None = None) -> list[list[Any]]:
            return []

    incomplete = Incomplete()  # type: ignore[abstract]
    assert isinstance(incomplete, DenseRetriever)  # the nominal check alone passes
    assert "embed" in missing_members(incomplete, DenseRetriever)
    assert "search_vectors" in missing_members(incomplete, DenseRetriever)


@pytest.fixture(scope="module")
def parts(example_index, encoder):
    from app.retrieval.cache import QueryCache
    from app.services import open_parts
    from indexer.bundle import open_bundle

    local = open_parts(open_bundle(example_index, verify=False), encoder, QueryCache(16), tokens=True)
    assert local.dense is not None and local.tokens is not None
    yield local
    local.docstore.close()


def test_local_stages_implement_their_protocols(parts, encoder):
    from app.retrieval.maxsim import MaxSimReranker
    from app.retrieval.reranker import Reranker

    check(parts.bm25, Retriever)
    check(parts.dense, Retriever, VectorIndex, DenseRetriever)
    check(parts.dense.queries, BiEncoder)
    check(parts.docstore, DocstoreReader)
    check(parts.tokens, TokenStoreReader)
    check(MaxSimReranker(encoder), TextReranker)
    check(Reranker(object()), TextReranker)  # a stand-in model: the members are the class's


def test_sharded_stages_implement_their_protocols_and_answer_as_the_local_ones(parts, example_pipeline):
    from app.engine import Engine
    from app.pipeline import Pipeline
    from app.retrieval.shards import (
        ShardedDenseSearcher,
        ShardedDocstore,
        ShardedSearcher,
        ShardedTokenStore,
        ShardFanout,
    )

    fanout = ShardFanout(["shard-000"])
    bm25 = ShardedSearcher("bm25", [parts.bm25], [0], fanout)
    dense = ShardedDenseSearcher([parts.dense], [0], fanout, parts.dense.queries)
    docstore = ShardedDocstore([parts.docstore], [0])
    tokens = ShardedTokenStore([parts.tokens], [0])
    try:
        check(bm25, Retriever)
        check(dense, Retriever, VectorIndex, DenseRetriever)
        check(docstore, DocstoreReader)
        check(tokens, TokenStoreReader)
        # the review's case: /v1/embeddings through a sharded build's dense retriever
        pipeline = Pipeline(example_pipeline.bundle, docstore, {"bm25": bm25, "dense": dense})
        sharded = asyncio.run(Engine(pipeline).embed(["how do stars form"]))
        local = asyncio.run(Engine(example_pipeline).embed(["how do stars form"]))
        np.testing.assert_allclose(sharded.vectors, local.vectors, atol=1e-6)
        options = example_pipeline.options(k=5, rerank=False)
        ids = [h.passage_id for h in asyncio.run(pipeline.search("how do stars form", options)).hits]
        assert ids == [h.passage_id for h in asyncio.run(example_pipeline.search("how do stars form", options)).hits]
        rows = [h.idx for h in dense.search("how do stars form", 3)]
        query = dense.query_tokens(["how do stars form"])[0]
        np.testing.assert_allclose(tokens.maxsim(query, rows), parts.tokens.maxsim(query, rows))
        assert docstore.unavailable() == []
    finally:
        fanout.close()


def test_a_pipeline_refuses_a_dense_retriever_that_is_not_one(parts, example_pipeline):
    from app.pipeline import Pipeline

    with pytest.raises(TypeError, match="not a DenseRetriever"):
        Pipeline(example_pipeline.bundle, parts.docstore, {"bm25": parts.bm25, "dense": parts.bm25})


class _Call:
    def __init__(self, method: Any) -> None:
        self.method = method

    def remote(self, *args: Any) -> _Call:
        self.args = args
        return self

    def result(self, timeout_s: float) -> Any:
        return self.method(*self.args)


class _LocalHandle:
    """A Ray Serve deployment handle stand-in: `handle.method.remote(*args).result(timeout_s=…)` runs the
    method of a `ShardServer` in this process."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def __getattr__(self, name: str) -> _Call:
        return _Call(getattr(self.server, name))


def test_remote_shard_classes_implement_their_protocols(example_index, parts):
    pytest.importorskip("ray")
    from app.serving_ray import RemoteRetriever, RemoteShard, RemoteVectorIndex, ShardServer

    server = ShardServer(str(example_index))
    try:
        shard = RemoteShard("shard-000", _LocalHandle(server), timeout_s=5.0)
        check(shard, DocstoreReader, TokenStoreReader)
        check(shard.retriever(), Retriever)
        check(shard.vector_index(), VectorIndex)
        assert isinstance(shard.retriever(), RemoteRetriever) and isinstance(shard.vector_index(), RemoteVectorIndex)
        # the same answers as the shard's own stages, in its rows
        queries = ["sourdough starter"]
        assert shard.retriever().search_many(queries, 3) == parts.bm25.search_many(queries, 3)
        vectors = parts.dense.encode(["sourdough starter"])
        assert shard.vector_index().search_vectors(vectors, 3) == parts.dense.search_vectors(vectors, 3)
        assert shard.passages([0, 1]).keys() == {0, 1} and shard.unavailable() == []
        query = parts.dense.query_tokens(["sourdough starter"])[0]
        np.testing.assert_allclose(shard.maxsim(query, [0, 1]), parts.tokens.maxsim(query, [0, 1]))
    finally:
        server.docstore.close()


def test_maxsim_reranker_prepares_rerank_texts_like_the_cross_encoder(example_pipeline, encoder):
    """`reranker.model: maxsim` with `reranker.maxsim: false` puts MaxSimReranker behind the micro-batcher, and
    /v1/rerank calls its `prepare` (it had none: an AttributeError, found by the TextReranker protocol)."""
    from app.retrieval.maxsim import MaxSimReranker
    from app.services import derive_pipeline

    settings = example_pipeline.settings.model_copy(deep=True)
    settings.reranker.model, settings.reranker.maxsim, settings.reranker.weights = "maxsim", False, None
    pipeline = derive_pipeline(example_pipeline, settings, MaxSimReranker(encoder))
    texts = ["Yeast ferments sugars in the dough.", "Saturn's rings are made of ice. " * 40]
    assert pipeline.owns_batcher and pipeline.batcher is not None
    try:
        out = asyncio.run(pipeline.rerank_texts("why does bread rise", texts, [None, None], max_tokens_per_doc=16))
    finally:  # its own micro-batcher only: the docstore is the session's example pipeline's
        asyncio.run(pipeline.batcher.close())
    assert out.truncated == [1] and out.texts[0] == texts[0] and out.tokens > 0
    assert out.scores[0] > out.scores[1]
