"""Drop-in endpoints of the de-facto protocols RAG stacks speak:

- `POST /v1/rerank` (and `/v2/rerank`, where the official cohere client posts): the Cohere v2 / Jina rerank
  shape, scored by the configured reranker through the same micro-batcher and timeout as `/v1/search`;
- `POST /v1/embeddings`: the OpenAI embeddings shape, encoded by the served bundle's bi-encoder with the
  index's normalisation.

Routes validate, call the served build and shape; the scoring and encoding live in the stages.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, field_validator

from app.api.routes import ERRORS, SEARCH, use_build
from app.api.schemas import JsonModel, Text
from app.engine import PassageRef

router = APIRouter()


PASSAGE_ID_FORMAT = "sift-passage-id"


class RerankDocument(JsonModel):
    """A document to rerank: its text, or (Sift's addition) the id of a passage of the served bundle."""

    # exactly one of text and id (`_documents_valid`); an id names a passage of the served build (format
    # sift-passage-id: another is a 422), so the document does not allow any string there
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["text"], "properties": {"text": {"type": "string"}, "id": {"type": "null"}}},
                {"required": ["id"], "properties": {"id": {"type": "string"}, "text": {"type": "null"}}},
            ]
        },
    )
    text: Text | None = Field(None, description="the document text")
    id: Annotated[str, Field(json_schema_extra={"format": PASSAGE_ID_FORMAT})] | None = Field(
        None, description="a passage id of the served bundle (`<doc_id>#<position>`, see hits[].passage_id)"
    )


class RerankRequest(JsonModel):
    """Cohere v2 / Jina rerank request; unknown fields of those APIs are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, description="ignored: the configured reranker answers", examples=["sift"])
    query: Text = Field(
        ..., min_length=1, description="non-blank, at most search.max_query_chars", examples=["how do stars form?"]
    )
    documents: list[Text | RerankDocument] = Field(
        ...,
        min_length=1,
        description='texts, `{"text": ...}` or `{"id": passage id}` (at most reranker.max_depth)',
        examples=[["Stars form in cold molecular clouds.", {"id": "astro-001#0"}]],
    )
    top_n: int | None = Field(None, ge=1, description="return only the best n (default: all)", examples=[3])
    return_documents: bool = Field(False, description="include each document's text in the results")
    max_tokens_per_doc: int | None = Field(
        None, ge=1, description="truncate each document to this many reranker tokens", examples=[256]
    )
    collection: str | None = Field(None, description='collection whose passages `{"id"}` refers to')

    @field_validator("query")
    @classmethod
    def _query_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query must contain non-whitespace text")
        return value

    @field_validator("documents")
    @classmethod
    def _documents_valid(cls, value: list[str | RerankDocument]) -> list[str | RerankDocument]:
        for i, doc in enumerate(value):
            if isinstance(doc, RerankDocument) and (doc.text is None) == (doc.id is None):
                raise ValueError(f"documents[{i}] must have exactly one of `text` or `id`")
            text = doc if isinstance(doc, str) else doc.text
            if text is not None and not text.strip():
                raise ValueError(f"documents[{i}] is empty")
        return value


@router.post("/v1/rerank", responses=ERRORS, tags=["ecosystem"], dependencies=SEARCH)
@router.post("/v2/rerank", responses=ERRORS, tags=["ecosystem"], include_in_schema=False, dependencies=SEARCH)
async def rerank(body: RerankRequest, request: Request) -> dict[str, Any]:
    """Score documents against a query with the configured reranker (Cohere v2 / Jina shape). Scores are the
    reranker's raw relevance scores (cross-encoder logits, or MaxSim), the same numbers `/v1/search` shows in
    `explain.rerank` for the same pairs (`explain.maxsim` when MaxSim alone is the second stage)."""
    async with use_build(request, body.collection) as (_, build):
        engine = build.engine
        documents: list[str | PassageRef] = [
            doc if isinstance(doc, str) else doc.text if doc.text is not None else PassageRef(str(doc.id))
            for doc in body.documents
        ]
        started = time.perf_counter()
        reranked = await engine.rerank_texts(body.query, documents, body.max_tokens_per_doc)
        texts, scores, truncated, tokens = reranked.texts, reranked.scores, reranked.truncated, reranked.tokens
        order = sorted(range(len(texts)), key=lambda i: (-float(scores[i]), i))  # ties: earlier document first
        if body.top_n:
            order = order[: body.top_n]
        results = []
        for i in order:
            item: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
            if body.return_documents:
                item["document"] = {"text": texts[i]}
            if i in truncated:
                item["truncated"] = True
            results.append(item)
        return {
            "id": f"rerank-{uuid.uuid4().hex[:24]}",
            "results": results,
            "meta": {
                "api_version": {"version": "2"},
                "billed_units": {"search_units": 1},
                "truncated_documents": truncated,
                "model": engine.settings.reranker.model,
                "bundle": build.build_id,
                "ms": round((time.perf_counter() - started) * 1000, 3),
            },
            "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
        }


class EmbeddingsRequest(JsonModel):
    """OpenAI embeddings request; unknown OpenAI fields (e.g. `user`) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    input: Text | Annotated[list[Text], Field(json_schema_extra={"minItems": 1})] = Field(
        ...,
        description="a text or a non-empty list of texts (at most embeddings.max_inputs, each at most "
        "embeddings.max_input_chars)",
        examples=[["how do stars form?"]],
    )
    model: str | None = Field(None, description="ignored: the served bundle's bi-encoder answers")
    encoding_format: Literal["float", "base64"] = Field("float", description="float list or base64 float32")
    # no other size is given (vectors are not cut): the served document lists the models' dimensions
    dimensions: int | None = Field(None, ge=1, description="must equal the model's dimension when given")
    collection: str | None = Field(None, description="collection whose bi-encoder encodes")

    @field_validator("input")
    @classmethod
    def _input_valid(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("input must not be empty")
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"input[{i}] is empty" if isinstance(value, list) else "input is empty")
        return value


@router.post("/v1/embeddings", responses=ERRORS, tags=["ecosystem"], dependencies=SEARCH)
async def embeddings(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
    """Embed texts with the served bundle's bi-encoder (OpenAI shape), normalised as the index's vectors."""
    async with use_build(request, body.collection) as (_, build):
        texts = [body.input] if isinstance(body.input, str) else body.input
        embedded = await build.engine.embed(texts, body.dimensions)
        vectors, tokens = embedded.vectors, embedded.tokens
        data = []
        for i, vector in enumerate(vectors):
            if body.encoding_format == "base64":
                embedding: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            else:
                embedding = [float(x) for x in vector]
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        return {
            "object": "list",
            "data": data,
            "model": embedded.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
