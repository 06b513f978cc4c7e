"""`Engine`: one served build's core, the only thing the API (`app/api/`), eval and the benches call.

    Engine.options(**request)                  the one merge of defaults and per-call overrides (checked)
    Engine.search(query, options)              one query through the pipeline
    Engine.search_many(queries, options)       a batch (checked against the batch limits first)
    Engine.rerank_texts(query, documents, …)   texts or stored passages scored by the second stage
    Engine.embed(texts, dimensions)            the build's bi-encoder, normalised as the index's vectors
    Engine.document(doc_id)                    a document and its passages
    Engine.answerer                            answers and streams (`app.answering.Answerer`), or None

The composition root (`app.services`) builds one per loaded build and hands it to the HTTP layer, which only
validates, calls it and shapes its results. Failures are typed (`EngineError` subclasses carry the field at
fault and a status class: invalid → 422, too large → 413, unavailable → 422/503), so no handler re-derives a
limit or holds model code. An `Engine` holds no per-request state.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.answering import Answerer
from app.pipeline import (
    RETRIEVERS_BY_MODE,
    InvalidOption,
    NoReranker,
    Pipeline,
    RerankedTexts,
    RerankTimeout,
    SearchOptions,
    SearchResult,
)
from app.settings import Settings
from indexer.models import passage_index_text


class EngineError(Exception):
    """A request the engine cannot serve as asked: `field` names the request field at fault (or None),
    `kind` the error's type in the API's error body."""

    status = 422
    kind = "validation_error"
    retry_after: int | None = None  # seconds, sent as Retry-After (429s and 503s)

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TooLarge(EngineError):
    """A request over a configured size limit (413)."""

    status = 413

    def __init__(self, message: str, field: str | None, kind: str) -> None:
        super().__init__(message, field)
        self.kind = kind


class Unavailable(EngineError):
    """What the request needs is not part of this build or configuration (422; `kind` says which)."""

    def __init__(self, message: str, field: str | None, kind: str) -> None:
        super().__init__(message, field)
        self.kind = kind


class ServerSide(EngineError):
    """A refusal that is about the server's state, not a request field (`kind` names it)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message, None)
        self.kind = kind


class Overloaded(ServerSide):
    """As much work of this kind is queued as the configuration allows; refused rather than queued (429)."""

    status = 429
    retry_after = 1


class ModelUnavailable(ServerSide):
    """A model the request needs did not load (503: the request was fine; the server is not)."""

    status = 503
    retry_after = 5


class StageTimeout(ServerSide):
    """A stage did not answer within its configured timeout (503)."""

    status = 503


@dataclass(frozen=True)
class PassageRef:
    """A stored passage sent to `rerank_texts` by id (scored from its stored text and token vectors)."""

    passage_id: str


@dataclass
class Embeddings:
    vectors: np.ndarray
    tokens: int
    model: str
    dimension: int


class Engine:
    """One build's stages behind one interface (see the module docstring)."""

    def __init__(self, pipeline: Pipeline, answerer: Answerer | None = None) -> None:
        self.pipeline = pipeline
        self.answerer = answerer

    @property
    def settings(self) -> Settings:
        return self.pipeline.settings

    @property
    def build_id(self) -> str:
        return self.pipeline.bundle.build_id

    # -- search -----------------------------------------------------------------------------------------

    def options(self, **request: Any) -> SearchOptions:  # SearchOptions' fields, by name
        """`Pipeline.options`: the one merge of defaults and overrides; `InvalidOption` becomes a 422."""
        try:
            return self.pipeline.options(**request)
        except InvalidOption as exc:
            raise EngineError(str(exc), exc.field) from exc

    def check_query(self, text: str, field: str) -> None:
        limit = self.settings.search.max_query_chars
        if len(text) > limit:
            raise EngineError(f"{field}: longer than {limit} characters (search.max_query_chars)", field)

    async def search(self, query: str, options: SearchOptions) -> SearchResult:
        self.check_query(query, "query")
        return await self.pipeline.search(query, options)

    async def search_many(self, queries: list[str], options: SearchOptions) -> list[SearchResult]:
        """A batch: at most `search.max_batch_queries` queries, `search.max_batch_work` candidates over all,
        and (reranked) at most `reranker.max_queued_pairs` pairs, else `TooLarge` naming the limit."""
        limits = self.settings.search
        if len(queries) > limits.max_batch_queries:
            raise TooLarge(
                f"queries: at most {limits.max_batch_queries} per batch (search.max_batch_queries)",
                "queries",
                "too_many_queries",
            )
        for i, query in enumerate(queries):
            self.check_query(query, f"queries[{i}]")
        retrievers = len(RETRIEVERS_BY_MODE[options.mode])
        work = len(queries) * options.candidates * retrievers
        if work > limits.max_batch_work:
            raise TooLarge(
                f"queries: {len(queries)} queries × {options.candidates} candidates × {retrievers} retrievers = "
                f"{work} exceeds search.max_batch_work ({limits.max_batch_work}); send fewer queries or fewer "
                "candidates",
                "queries",
                "batch_too_large",
            )
        queued = self.settings.reranker.max_queued_pairs
        if options.rerank and self.pipeline.batcher is not None and len(queries) * options.rerank_depth > queued:
            raise TooLarge(
                f"queries: {len(queries)} queries × rerank_depth {options.rerank_depth} pairs exceed "
                f"reranker.max_queued_pairs ({queued}); send fewer queries, a smaller rerank_depth or rerank=false",
                "queries",
                "batch_too_large",
            )
        return await self.pipeline.search_many(queries, options)

    # -- rerank, embed, documents ----------------------------------------------------------------------

    async def rerank_texts(
        self, query: str, documents: list[str | PassageRef], max_tokens_per_doc: int | None = None
    ) -> RerankedTexts:
        """Score `documents` (texts, or stored passages by id) against `query` with the second stage
        (`Pipeline.rerank_texts`); at most `reranker.max_depth` documents."""
        try:
            self.pipeline.check_rerank_texts()
        except NoReranker as exc:
            raise Unavailable(str(exc), "model", "no_reranker") from exc
        limit = self.settings.reranker.max_depth
        if len(documents) > limit:
            raise TooLarge(
                f"documents: at most {limit} per request (reranker.max_depth)", "documents", "too_many_documents"
            )
        self.check_query(query, "query")
        ids = [d.passage_id for d in documents if isinstance(d, PassageRef)]
        stored: dict[str, dict[str, Any]] = {}
        if ids:
            stored = await asyncio.to_thread(self.pipeline.docstore.passages_by_id, ids)
            missing = [i for i in ids if i not in stored]
            if missing:
                raise EngineError(
                    f"documents: unknown passage id(s) {missing[:5]} in build {self.build_id}; "
                    "see hits[].passage_id of /v1/search",
                    "documents",
                )
        texts: list[str] = []
        rows: list[int | None] = []  # the stored passage's row, for documents sent by id
        for doc in documents:
            if isinstance(doc, PassageRef):
                row = stored[doc.passage_id]
                texts.append(passage_index_text(row["title"], row["text"]))
                rows.append(int(row["idx"]))
            else:
                texts.append(doc)
                rows.append(None)
        try:
            return await self.pipeline.rerank_texts(query, texts, rows, max_tokens_per_doc)
        except RerankTimeout as exc:
            raise StageTimeout(str(exc), "rerank_timeout") from exc

    async def embed(self, texts: list[str], dimensions: int | None = None) -> Embeddings:
        """Vectors of `texts` by the build's bi-encoder (at most `embeddings.max_inputs` texts of
        `embeddings.max_input_chars` characters; `dimensions`, when given, must be the model's)."""
        limits = self.settings.embeddings
        if len(texts) > limits.max_inputs:
            raise TooLarge(
                f"input: at most {limits.max_inputs} texts (embeddings.max_inputs)", "input", "too_many_inputs"
            )
        too_long = [i for i, t in enumerate(texts) if len(t) > limits.max_input_chars]
        if too_long:
            raise TooLarge(
                f"input[{too_long[0]}]: longer than {limits.max_input_chars} characters (embeddings.max_input_chars)",
                "input",
                "input_too_long",
            )
        dense = self.pipeline.dense
        if dense is None:
            raise Unavailable(f"build {self.build_id} has no bi-encoder; rebuild with dense on", None, "no_dense_index")
        info = self.pipeline.bundle.manifest["dense"]
        if dimensions is not None and dimensions != info["dimension"]:
            raise EngineError(f"dimensions: this model gives {info['dimension']}", "dimensions")
        vectors, tokens = await asyncio.to_thread(dense.embed, texts)
        return Embeddings(vectors, tokens, info["model"], int(info["dimension"]))

    async def document(self, doc_id: str) -> dict[str, Any] | None:
        """A document with all its passages, or None when the build has no such document."""
        return await asyncio.to_thread(self.pipeline.docstore.document, doc_id)
