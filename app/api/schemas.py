"""Request and response models of the HTTP API (documented in the OpenAPI schema at /docs).

Limits are not written here: they live in settings (`search.max_k`, `search.max_query_chars`, ...), the
routes enforce them, and `app.api.openapi` writes them into the served OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import JsonDict

FilterValue = str | int | float | bool

# "has text": a character that is not whitespace as `str.strip()` counts it (the validators' rule), spelled out
# because `\s` means other sets in Python and in JSON Schema's ECMA regexes. The validators stay the check
# (their messages name the field); this pattern tells the OpenAPI document that blank strings are refused.
NON_BLANK = r"[^\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
Text = Annotated[str, Field(json_schema_extra={"pattern": NON_BLANK})]


def _no_default(schema: JsonDict) -> None:
    """The document shows no default (the server's setting is the default)."""
    schema.pop("default", None)


def integral_floats(model: type[BaseModel], data: Any) -> Any:
    """`data` with an integral float (7.0) given for an int field of `model` made that int: JSON has one
    number type, and JSON Schema's `integer` admits 7.0."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name, field in model.model_fields.items():
        key = field.alias or name
        value = out.get(key)
        args = get_args(field.annotation) or (field.annotation,)
        if isinstance(value, float) and value.is_integer() and int in args and float not in args:
            out[key] = int(value)
    return out


class JsonModel(BaseModel):
    """A request body, validated strictly: a JSON value of the wrong type is a 422 (pydantic's lax mode took
    "5" for 5 and "true" or 1 for true, which the OpenAPI document forbids), except that an integral float
    is an integer, as JSON Schema has it."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        return integral_floats(cls, data)


class SearchParams(JsonModel):
    """Options shared by `/v1/search`, `/v1/search/batch` and `/v1/answer`."""

    model_config = ConfigDict(extra="forbid")

    # omitted, it is the server's `search.default_k` (None until `to_options`), so the document shows no default;
    # an explicit null is refused like any other non-integer
    k: int = Field(  # type: ignore[assignment]  # None only when omitted: the schema shows no null, null is refused
        None,
        ge=1,
        description="number of hits to return (default search.default_k, at most search.max_k)",
        examples=[10],
        json_schema_extra=_no_default,
    )
    mode: Literal["bm25", "dense", "hybrid"] | None = Field(
        None,
        description="coarse retrieval: bm25, dense, or both fused (default search.default_mode)",
        examples=["hybrid"],
    )
    candidates: int | None = Field(
        None,
        ge=1,
        description="passages each retriever contributes (default search.default_candidates, at most "
        "search.max_candidates)",
        examples=[100],
    )
    fusion: Literal["rrf", "weighted"] | None = Field(
        None, description="how hybrid rankings are fused", examples=["rrf"]
    )
    rrf_k: int | None = Field(None, ge=1, le=10000, description="RRF constant (default 60)", examples=[60])
    weights: dict[Literal["bm25", "dense"], Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(
        None,
        description="per-retriever weights for `weighted` fusion over min-max normalised scores",
        examples=[{"bm25": 0.3, "dense": 0.7}],
    )
    rerank: bool | None = Field(
        None,
        description="rerank with the configured second stage (default: on when one is configured; true without "
        "one is a 422)",
        examples=[False],
    )
    rerank_depth: int | None = Field(
        None,
        ge=1,
        description="fused candidates reranked (default: the calibrated depth, reranker.depth capped by "
        "reranker.latency_budget_ms on this machine, shown in /v1/info second_stage.depth; at most reranker.max_depth)",
        examples=[20],
    )
    # the document refuses what `_filters_valid` refuses: blank keys and empty lists
    filters: dict[str, FilterValue | Annotated[list[FilterValue], Field(json_schema_extra={"minItems": 1})]] | None = (
        Field(
            None,
            description="document metadata filters: a value means equality, a list means 'any of'",
            examples=[{"topic": "astronomy", "year": [2020, 2021]}],
            json_schema_extra={"propertyNames": {"pattern": NON_BLANK}},
        )
    )
    collapse: bool = Field(
        False, description="one hit per document (its best passage); `k` then counts documents", examples=[False]
    )
    return_text: bool = Field(True, description="include each passage's full text (else a snippet)", examples=[True])
    highlight: bool = Field(False, description="mark query terms with <mark> in the snippet", examples=[False])
    collection: str | None = Field(
        None, description="which served collection to search (default: the first; see /v1/collections)"
    )
    allow_partial: bool = Field(
        False,
        description="sharded builds: answer from the shards that respond when one does not (its name is listed "
        "in `missing_shards`) instead of a 503 naming it",
        examples=[False],
    )

    @field_validator("filters")
    @classmethod
    def _filters_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, item in (value or {}).items():
            if not key.strip():
                raise ValueError("filter keys must be non-empty metadata field names")
            if isinstance(item, list) and not item:
                raise ValueError(f"filter {key!r}: 'in' list must not be empty")
        return value


class FacetParams(JsonModel):
    """`facets` of `/v1/search` (not of batches, whose candidates may number hundreds of thousands, nor of
    answers, which show no candidates)."""

    facets: list[Text] | None = Field(
        None,
        description="metadata fields whose values are counted over the candidates (the whole ranking the page is "
        "cut from, after filters), e.g. zero-shot tags written by `sift index build --tag` (at most "
        "search.max_facets)",
        examples=[["auto_topic", "kind"]],
    )

    @field_validator("facets")
    @classmethod
    def _facets_valid(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not name.strip() for name in value):
            raise ValueError("facets must be non-empty metadata field names")
        return list(dict.fromkeys(value)) if value is not None else None


def non_blank_items(values: list[str], field: str) -> list[str]:
    """`values` unchanged, or a ValueError naming the first blank item (`field[i]`)."""
    for i, value in enumerate(values):
        if not value.strip():
            raise ValueError(f"{field}[{i}] must contain non-whitespace text")
    return values


def _check_query(value: str, field: str = "query") -> str:
    if not value.strip():
        raise ValueError(f"{field} must contain non-whitespace text")
    return value


_OFFSET = Field(
    0,
    ge=0,
    description="hits to skip: the page is ranking[offset : offset + k] of the ranking at depth `candidates`, so "
    "pages agree with one request for the whole range when it fits in `candidates`",
    examples=[0],
)


CURSOR_FORMAT = "sift-cursor"


class SearchRequest(SearchParams, FacetParams):
    # a cursor carries its own offset: one with an offset is a 422, so the document allows only offset 0 with it
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"cursor": {"type": "string"}}, "required": ["cursor"]},
            "then": {"properties": {"offset": {"const": 0}}},
        }
    )

    query: Text = Field(
        ...,
        min_length=1,
        description="the search query (non-blank, at most search.max_query_chars)",
        examples=["how do stars form?"],
    )
    offset: int = _OFFSET
    # not any string: only a `next_cursor` this server issued, for this query and options (format sift-cursor;
    # a made-up one is a 422, one from another build a 409); the pattern is its alphabet (unpadded base64url)
    cursor: (
        Annotated[str, Field(max_length=1024, pattern=r"^[A-Za-z0-9_-]+$", json_schema_extra={"format": CURSOR_FORMAT})]
        | None
    ) = Field(
        None,
        description="`next_cursor` of the previous page (send the same query and options; k may change); it fixes "
        "the ranking's depth and is bound to the build that issued it: 409 once another build serves",
    )

    _query = field_validator("query")(classmethod(lambda cls, v: _check_query(v)))


class BatchSearchRequest(SearchParams):
    queries: list[Text] = Field(
        ...,
        min_length=1,
        description="queries, answered in order (at most search.max_batch_queries, each at most "
        "search.max_query_chars; queries × candidates at most search.max_batch_work)",
        examples=[["black holes", "tea"]],
    )
    offset: int = _OFFSET

    @field_validator("queries")
    @classmethod
    def _queries_valid(cls, value: list[str]) -> list[str]:
        return non_blank_items(value, "queries")


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable kind, e.g. validation_error, unauthorized, rate_limited")
    message: str = Field(description="what went wrong and what to do next")
    fields: list[dict[str, str]] | None = Field(None, description="each bad field and why (422s)")
    request_id: str | None = Field(None, description="the X-Request-ID this error is logged under")


class ErrorResponse(BaseModel):
    """Every error, whatever its status."""

    error: ErrorDetail


class StageExplain(BaseModel):
    score: float | None = Field(None, description="the stage's score for this passage")
    rank: int | None = Field(None, description="1-based rank in the stage's ranking")
    note: str | None = Field(None, description="why the stage did not score the passage")


class SearchHit(BaseModel):
    doc_id: str = Field(description="id of the source document", examples=["astro-001"])
    passage_id: str = Field(description="`<doc_id>#<position>`", examples=["astro-001#0"])
    title: str = Field(description="document title", examples=["How stars form"])
    text: str | None = Field(None, description="passage text (when return_text)")
    snippet: str | None = Field(None, description="window around the query terms (when highlight or not return_text)")
    score: float = Field(description="final score: rerank score when reranked, else fused, else the retriever's")
    position: int = Field(description="passage number within its document")
    start: int = Field(description="character offset of the passage in the document text")
    end: int = Field(description="character offset just past the passage")
    metadata: dict[str, Any] = Field(
        description="the document's metadata, with the passage's own keys (e.g. zero-shot tags) over it"
    )
    explain: dict[str, StageExplain | None] = Field(
        description="score and rank per stage: bm25, dense, fused, rerank, and maxsim when the second stage has it"
    )


class SearchResponse(BaseModel):
    query: str = Field(description="the query as received")
    mode: str = Field(description="retrieval mode used")
    hits: list[SearchHit] = Field(description="best first")
    timings_ms: dict[str, float] = Field(
        description="milliseconds per stage: bm25, dense, fusion, rerank, fetch, total"
    )
    bundle: str = Field(description="build id of the bundle that answered")
    offset: int = Field(0, description="hits skipped before this page")
    next_cursor: str | None = Field(
        None, description="send as `cursor` (with the same query and options) for the next page; null on the last"
    )
    missing_shards: list[str] = Field(
        default_factory=list,
        description="shards that did not answer (only with allow_partial; the hits come from the others)",
    )
    facets: dict[str, dict[str, int]] | None = Field(
        None,
        description="when `facets` was asked: per field, how many candidates hold each value (most first; a list "
        "value counts each item; non-string values as JSON text)",
        examples=[{"auto_topic": {"astronomy": 12, "earth": 3}}],
    )


class BatchSearchResponse(BaseModel):
    results: list[SearchResponse] = Field(description="one result per query, in order")
    timings_ms: dict[str, float] = Field(description="milliseconds per stage for the whole batch")
    bundle: str = Field(description="build id of the bundle that answered")
    missing_shards: list[str] = Field(
        default_factory=list,
        description="shards that did not answer (only with allow_partial; every result comes from the others)",
    )


# Documented shapes of the endpoints that build their JSON by hand (`responses={200: {"model": ...}}`: the
# routes do not re-validate what they return). They exist so that clients (`clients/python`) can be checked
# against the served document, and schema fuzzing checks the routes against them.


class DocumentPassage(BaseModel):
    idx: int = Field(description="row of the passage in the bundle (its BM25 and FAISS position)")
    id: str = Field(description="passage id, `<doc_id>#<position>`")
    position: int = Field(description="passage number within the document")
    text: str = Field(description="passage text")
    start: int = Field(description="character offset of the passage in the document text")
    end: int = Field(description="character offset just past the passage")
    metadata: dict[str, Any] = Field(
        {}, description="the passage's own metadata (e.g. zero-shot tags); search hits show it over the document's"
    )


class DocumentResponse(BaseModel):
    id: str = Field(description="document id")
    title: str = Field(description="document title")
    text: str = Field(description="the document's full text")
    metadata: dict[str, Any] = Field(description="the document's metadata")
    passages: list[DocumentPassage] = Field(description="the document's passages in order")


class IngestStatus(BaseModel):
    enabled: bool = Field(description="documents are accepted over HTTP (ingest.enabled)")
    applied_seq: int = Field(description="the newest batch in the published build")
    served_seq: int = Field(description="the newest batch in the build this process serves")
    backlog_batches: int = Field(description="batches accepted, not yet in the published build")
    backlog_documents: int = Field(description="documents and ids in those batches")
    applier_here: bool = Field(description="this process applies the folder's batches (one process per folder does)")
    applies: dict[str, int] = Field(description="applies run here: ok and failed")
    last_apply_s: float | None = Field(description="seconds the last apply here took")
    last_apply_error: str | None = Field(description="why the last apply here failed (it is retried)")


class CollectionStatus(BaseModel):
    name: str = Field(description="collection name (`collection` in requests)")
    ready: bool = Field(description="a build is loaded and answers")
    build: str | None = Field(description="build id served now")
    modes: list[str] = Field(description="retrieval modes this build offers")
    documents: int | None = Field(description="documents in the served build")
    passages: int | None = Field(description="passages in the served build")
    reload_error: str | None = Field(description="why the last reload failed, if it did")
    reloads: dict[str, int] = Field(description="reload attempts: ok and failed")
    draining: list[str] = Field(description="older builds still finishing in-flight requests")
    ingest: IngestStatus | None = Field(None, description="documents sent over HTTP (absent: ingestion is off)")


class CollectionsResponse(BaseModel):
    collections: list[CollectionStatus] = Field(description="served collections, the default first")
    default: str = Field(description="the collection used when a request names none")


class Citation(BaseModel):
    n: int = Field(description="the passage's number in the prompt, as cited in the answer ([n])")
    doc_id: str
    passage_id: str
    title: str
    text: str = Field(description="the cited passage's text")
    inferred: bool = Field(description="true when the answer cited nothing and the passage was attributed by overlap")
    start: int | None = Field(None, description="extractive answers: the span's start in the passage text")
    end: int | None = Field(None, description="extractive answers: the span's end in the passage text")


class AnswerPassage(BaseModel):
    n: int = Field(description="number of the passage in the prompt")
    doc_id: str
    passage_id: str
    title: str
    text: str
    score: float = Field(description="the search score that ranked the passage")


class AnswerSpan(BaseModel):
    text: str = Field(description="the reader's span")
    passage_id: str
    start: int
    end: int
    confidence: float


class AnswerResponse(BaseModel):
    question: str = Field(description="the question as received")
    answer: str = Field(description="the answer text, citing passages as [n]")
    answered: bool = Field(description="false when the passages did not hold an answer")
    citations: list[Citation] = Field(description="the passages the answer cites")
    passages: list[AnswerPassage] = Field(description="the passages given to the reader or generator")
    model: str = Field(description="the model that answered")
    mode: str = Field(description="answer.mode: generative, extractive or extract-then-generate")
    timings_ms: dict[str, float] = Field(description="milliseconds per stage")
    bundle: str = Field(description="build id of the bundle that answered")
    collection: str = Field(description="the collection that answered")
    missing_shards: list[str] = Field(description="shards that did not answer (only with allow_partial)")
    span: AnswerSpan | None = Field(None, description="extractive modes: the reader's span and its confidence")
