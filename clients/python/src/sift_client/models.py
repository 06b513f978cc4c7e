"""Typed results of Sift's API, and the search options a request may carry.

These mirror the served OpenAPI document (`/openapi.json`, components `SearchHit`, `SearchResponse`, ...):
a test in Sift's suite compares each response model's fields and JSON types, and the request options, with the
served components, so the two cannot drift unnoticed. The stream events are made of those models (the OpenAPI
document describes a Server-Sent Event only as text). Unknown fields the server may add later are kept
(`extra="allow"`), never an error.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from typing_extensions import TypedDict

FilterValue = str | int | float | bool


class SearchOptions(TypedDict, total=False):
    """Per-call search options (every one optional: the server's settings are the defaults).

    Names and meanings are those of `POST /v1/search` (see the server's `/docs`)."""

    k: int
    mode: Literal["bm25", "dense", "hybrid"]
    candidates: int
    fusion: Literal["rrf", "weighted"]
    rrf_k: int
    weights: dict[Literal["bm25", "dense"], float]
    rerank: bool
    rerank_depth: int
    filters: dict[str, FilterValue | list[FilterValue]]
    collapse: bool
    return_text: bool
    highlight: bool
    collection: str
    allow_partial: bool


class GenerationOptions(TypedDict, total=False):
    """Decoding controls of `POST /v1/answer` (`generation`)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    num_beams: int
    seed: int
    stop: list[str]


class Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class StageExplain(Model):
    """One stage's view of a hit: its score and 1-based rank, or a note saying why it did not score it."""

    score: float | None = None
    rank: int | None = None
    note: str | None = None


class SearchHit(Model):
    doc_id: str
    passage_id: str
    title: str
    text: str | None = None
    snippet: str | None = None
    score: float
    position: int
    start: int
    end: int
    metadata: dict[str, Any]
    explain: dict[str, StageExplain | None]


class SearchResponse(Model):
    query: str
    mode: str
    hits: list[SearchHit]
    timings_ms: dict[str, float]
    bundle: str
    offset: int = 0
    next_cursor: str | None = None
    missing_shards: list[str] = []
    facets: dict[str, dict[str, int]] | None = None


class BatchSearchResponse(Model):
    results: list[SearchResponse]
    timings_ms: dict[str, float]
    bundle: str
    missing_shards: list[str] = []


class DocumentPassage(Model):
    idx: int
    id: str
    position: int
    text: str
    start: int
    end: int
    metadata: dict[str, Any] = {}


class DocumentResponse(Model):
    id: str
    title: str
    text: str
    metadata: dict[str, Any]
    passages: list[DocumentPassage]


class IngestStatus(Model):
    enabled: bool
    applied_seq: int
    served_seq: int
    backlog_batches: int
    backlog_documents: int
    applier_here: bool
    applies: dict[str, int]
    last_apply_s: float | None
    last_apply_error: str | None


class TaskResponse(Model):
    """A batch of documents or deletions sent over HTTP: its number and state (`enqueued`: durable, not yet
    published; `applied`: published, not yet served by the answering process; `searchable`)."""

    task: int
    collection: str
    status: Literal["enqueued", "applied", "searchable"]
    documents: int | None = None
    last_apply_error: str | None = None


class CollectionStatus(Model):
    name: str
    ready: bool
    build: str | None
    modes: list[str]
    documents: int | None
    passages: int | None
    reload_error: str | None
    reloads: dict[str, int]
    draining: list[str]
    ingest: IngestStatus | None = None


class CollectionsResponse(Model):
    collections: list[CollectionStatus]
    default: str


class Citation(Model):
    n: int
    doc_id: str
    passage_id: str
    title: str
    text: str
    inferred: bool
    start: int | None = None
    end: int | None = None


class AnswerPassage(Model):
    n: int
    doc_id: str
    passage_id: str
    title: str
    text: str
    score: float


class AnswerSpan(Model):
    text: str
    passage_id: str
    start: int
    end: int
    confidence: float


class AnswerResponse(Model):
    question: str
    answer: str
    answered: bool
    citations: list[Citation]
    passages: list[AnswerPassage]
    model: str
    mode: str
    timings_ms: dict[str, float]
    bundle: str
    collection: str
    missing_shards: list[str]
    span: AnswerSpan | None = None


class PassagesEvent(Model):
    """First event of a streamed answer: the passages the answer will cite."""

    event: Literal["passages"] = "passages"
    passages: list[AnswerPassage]
    answered: bool
    missing_shards: list[str] = []


class TokenEvent(Model):
    """A piece of the answer text, in order."""

    event: Literal["token"] = "token"
    text: str


class DoneEvent(Model):
    """Last event of a streamed answer: the whole answer with its citations."""

    event: Literal["done"] = "done"
    answer: AnswerResponse


AnswerEvent = PassagesEvent | TokenEvent | DoneEvent


class ClassifyResult(Model):
    """One text's zero-shot label (None below the label set's `min_score`), its probability and every label's."""

    label: str | None
    score: float
    scores: dict[str, float]


class ClassifyResponse(Model):
    model: str
    label_set: str | None
    labels: list[str]
    results: list[ClassifyResult]
    warnings: list[str]
