"""Question answering and the OpenAI-compatible chat backend: `/v1/answer`, `/v1/chat/completions`,
`/v1/models`. Routes validate, call the `Answerer` and a `Generator`, and shape (or stream) the response."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict, Field, field_validator

from app.answering import Answerer, AnswerResult, PreparedAnswer
from app.api.errors import ApiError
from app.api.openapi import event_stream
from app.api.routes import (
    ERRORS,
    SEARCH,
    acquire_build,
    check_max,
    check_text,
    to_options,
)
from app.api.schemas import NON_BLANK, AnswerResponse, JsonModel, SearchParams, Text, integral_floats
from app.generation.base import GenerationError, GenerationOptions
from app.pipeline import SearchOptions
from app.services import Build, Collection
from app.tracing import REQUEST_ID

log = logging.getLogger("sift.api")
router = APIRouter()
SIFT_MODEL_ID = "sift-rag"
ANSWER_K = 5  # passages an answer retrieves unless the request says (`k` of /v1/answer, `sift.k` of a chat)


# `GenerationOptions.problems()` refuses (422) top_k or top_p without sampling, beams with sampling and empty stop
# sequences: the document says so (sampling, or greedy without top_k and top_p)
GENERATION_RULES: dict[str, Any] = {
    "properties": {"stop": {"items": {"minLength": 1}}},
    "anyOf": [
        {
            "properties": {"temperature": {"exclusiveMinimum": 0}, "num_beams": {"maximum": 1}},
            "required": ["temperature"],
        },
        {"properties": {"temperature": {"maximum": 0}, "top_k": {"type": "null"}, "top_p": {"type": "null"}}},
    ],
}


class AnswerRequest(SearchParams):
    # beams cannot stream (a 422): the document allows num_beams above 1 only without stream
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
            "then": {"properties": {"generation": {"properties": {"num_beams": {"maximum": 1}}}}},
        }
    )

    question: Text = Field(
        ...,
        min_length=1,
        description="non-blank, at most search.max_query_chars characters",
        examples=["When was the Eiffel Tower completed?"],
    )
    k: int = Field(ANSWER_K, ge=1, description="passages retrieved (the best fitting ones go into the prompt)")
    passages: int | None = Field(
        None,
        ge=1,
        description="most passages put into the prompt (default answer.passages, at most answer.max_passages)",
    )
    generation: GenerationOptions = Field(
        default_factory=GenerationOptions, description="decoding controls", json_schema_extra=GENERATION_RULES
    )
    stream: bool = Field(False, description="send Server-Sent Events: passages, then tokens, then a final event")

    @field_validator("generation", mode="before")
    @classmethod
    def _generation_strict(cls, value: Any) -> Any:
        """Typed as JSON is (see `JsonModel`): "5" is not a number here either."""
        if isinstance(value, dict):
            return GenerationOptions.model_validate(integral_floats(GenerationOptions, value), strict=True)
        return value

    @field_validator("question")
    @classmethod
    def _non_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("question must contain non-whitespace text")
        return value


class ChatMessage(JsonModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: its content, or the `text` strings of its content parts."""
        if isinstance(self.content, list):
            parts = (part.get("text") for part in self.content if isinstance(part, dict))
            return " ".join(text for text in parts if isinstance(text, str))
        return self.content or ""


# what `_has_user_message` requires, for the document: a user message whose content, or a content part's text,
# has text
USER_TEXT: dict[str, Any] = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"const": "user"},
        "content": {
            "anyOf": [
                {"type": "string", "pattern": NON_BLANK},
                {
                    "type": "array",
                    "contains": {
                        "type": "object",
                        "required": ["text"],
                        "properties": {"text": {"type": "string", "pattern": NON_BLANK}},
                    },
                },
            ]
        },
    },
}


class StreamOptions(JsonModel):
    """OpenAI's `stream_options` (used with stream=true; ignored without it)."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool = Field(
        False,
        description="one more chunk before `data: [DONE]` carries `usage` and an empty `choices`; every other "
        "chunk carries `usage: null`",
    )


class ChatRequest(JsonModel):
    """The OpenAI chat-completions request; unknown OpenAI fields are accepted and ignored. Sift's own
    retrieval options may be sent in `sift` (mode, k, rerank, filters)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(SIFT_MODEL_ID, examples=[SIFT_MODEL_ID])
    messages: list[ChatMessage] = Field(..., min_length=1, json_schema_extra={"contains": USER_TEXT})
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, description="at most answer.max_tokens_limit")
    max_completion_tokens: int | None = Field(None, ge=1, description="at most answer.max_tokens_limit")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # up to 4 non-empty stop sequences, as `GenerationOptions` takes them (it refused others with a 422)
    stop: (
        Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)]
    ) | None = None
    seed: int | None = Field(None, ge=0, description="makes sampling reproducible")
    n: int = Field(1, ge=1, le=1)
    sift: SearchParams | None = None
    collection: str | None = Field(None, description="which served collection answers (default: the first)")

    @field_validator("messages")
    @classmethod
    def _has_user_message(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and m.text().strip() for m in value):
            raise ValueError("messages must contain a user message with text")
        return value


def answerer_of(build: Build) -> Answerer:
    """The build's `Answerer` (built once per build by the composition root)."""
    if build.answerer is None:
        raise ApiError(
            503,
            "no_answer_backend",
            "no answer backend is configured: set generator.backend to local or openai (answer.mode generative), "
            "or answer.reader (answer.mode extractive)",
        )
    return build.answerer


def check_generation(options: GenerationOptions, stream: bool, prefix: str, limit: int) -> None:
    if options.max_new_tokens > limit:
        field = f"{prefix}max_new_tokens" if prefix else "max_tokens"
        raise ApiError(422, "validation_error", f"{field}: must be <= {limit} (answer.max_tokens_limit)", field)
    problems = options.problems(stream=stream)
    if problems:
        field, why = problems[0]
        raise ApiError(422, "validation_error", f"{prefix}{field}: {why}", f"{prefix}{field}")


async def admit_and_prepare(
    collection: Collection,
    build: Build,
    reader: Answerer,
    question: str,
    options: SearchOptions,
    passages: int | None = None,
) -> tuple[PreparedAnswer, Callable[[], Awaitable[None]]]:
    """Take a generation slot (or 429 at once) and retrieve. Returns the prepared answer and `done`, which
    frees the slot and the build; on failure both are freed here."""

    async def done() -> None:
        reader.dismiss()
        await collection.release(build)

    try:
        reader.admit()
    except BaseException:
        await collection.release(build)
        raise
    try:
        return await reader.prepare(question, options, passages), done
    except BaseException:
        await done()
        raise


def stream_error(exc: Exception) -> str:
    """What a stream's error event says: a backend's public message, or an internal error with the request
    id (the details go to the log, never to the client)."""
    if isinstance(exc, GenerationError):
        return str(exc)
    log.error("answer stream failed", exc_info=exc, extra={"request_id": REQUEST_ID.get()})
    return f"generation failed (internal error, logged with request id {REQUEST_ID.get()})"


def check_question_tokens(reader: Answerer, texts: list[str], limit: int, field: str) -> None:
    """413 when the caller's part of the prompt (question, or chat user and system text) exceeds the budget."""
    tokens = sum(reader.count_tokens(t) for t in texts if t)
    if tokens > limit:
        raise ApiError(
            413,
            "prompt_too_long",
            f"{field}: {tokens} prompt tokens exceed answer.max_question_tokens ({limit}); shorten them",
            field,
        )


def usage_of(reader: Answerer, prepared: PreparedAnswer, result: AnswerResult) -> dict[str, int]:
    """OpenAI `usage` of one answer: the generator's own counts when it reports them (a non-streamed
    generation), else counted with the answerer's tokenizer: for an extractive answer the question and the
    passages the reader read, otherwise the prompt's message texts; and the answer's text. Streamed and
    non-streamed extractive answers therefore report the same numbers."""
    prompt, completion = result.prompt_tokens, result.completion_tokens
    if not prompt and not completion:
        if reader.mode == "extractive":
            texts = [prepared.question, *(p["text"] for p in prepared.passages)]
        else:
            texts = [m["content"] for m in prepared.messages]
        prompt = sum(reader.count_tokens(t) for t in texts if t)
        completion = reader.count_tokens(result.text) if result.text else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def passages_payload(prepared: PreparedAnswer) -> list[dict[str, Any]]:
    return [{k: p[k] for k in ("n", "doc_id", "passage_id", "title", "text", "score")} for p in prepared.passages]


@router.post(
    "/v1/answer",
    responses={
        **ERRORS,
        **event_stream(
            "the answer (JSON), or with stream=true Server-Sent Events: passages, token…, done", AnswerResponse
        ),
    },
    tags=["answer"],
    dependencies=SEARCH,
)
async def answer(body: AnswerRequest, request: Request) -> Any:
    """Retrieve, then answer from the best passages with citations (JSON or SSE): generated, an extracted
    span (`answer.mode: extractive`, citations with character offsets) or both (`extract-then-generate`)."""
    collection, build = acquire_build(request, body.collection)
    try:
        reader = answerer_of(build)
        limits = build.engine.settings
        check_text(body.question, "question", limits.search.max_query_chars, "search.max_query_chars")
        check_max(body.passages, limits.answer.max_passages, "passages", "answer.max_passages")
        check_question_tokens(reader, [body.question], limits.answer.max_question_tokens, "question")
        check_generation(body.generation, body.stream, "generation.", limits.answer.max_tokens_limit)
        options = to_options(build.engine, body)
    except BaseException:
        await collection.release(build)
        raise
    started = time.perf_counter()
    prepared, done = await admit_and_prepare(collection, build, reader, body.question, options, body.passages)
    missing = prepared.missing_shards
    generation = body.generation.model_copy()
    if "max_new_tokens" not in body.generation.model_fields_set:
        generation.max_new_tokens = reader.settings.max_new_tokens

    def final(result: AnswerResult, generate_ms: float) -> dict[str, Any]:
        timings = {
            **prepared.timings_ms,
            "generate": round(generate_ms, 3),
            "total": round((time.perf_counter() - started) * 1000, 3),
        }
        out = {
            "question": body.question,
            "answer": result.text,
            "answered": result.answered,
            "citations": result.citations,
            "passages": passages_payload(prepared),
            "model": reader.name,
            "mode": reader.mode,
            "timings_ms": timings,
            "bundle": build.build_id,
            "collection": collection.name,
            "missing_shards": missing,
        }
        if result.span is not None:
            out["span"] = result.span
        return out

    if not body.stream:
        try:
            t = time.perf_counter()
            result = await reader.answer(prepared, generation, request.is_disconnected)
            return final(result, (time.perf_counter() - t) * 1000)
        finally:
            await done()

    async def events() -> AsyncIterator[str]:
        try:
            passages = {"passages": passages_payload(prepared), "answered": prepared.answerable}
            yield sse("passages", {**passages, "missing_shards": missing})
            t = time.perf_counter()
            try:
                async for piece in reader.stream(prepared, generation, request.is_disconnected):
                    if isinstance(piece, AnswerResult):
                        yield sse("done", final(piece, (time.perf_counter() - t) * 1000))
                    else:
                        yield sse("token", {"text": piece})
            except Exception as exc:  # noqa: BLE001 - reported in-stream: the status line has been sent
                yield sse("error", {"message": stream_error(exc)})
        finally:
            await done()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


@router.get("/v1/models", tags=["chat"], responses=ERRORS, dependencies=SEARCH)
async def models(request: Request) -> dict[str, Any]:
    """OpenAI-style model list: Sift's RAG model."""
    generator = request.app.state.services.models.generator
    owned = f"sift ({generator.name})" if generator is not None else "sift"
    return {"object": "list", "data": [{"id": SIFT_MODEL_ID, "object": "model", "created": 0, "owned_by": owned}]}


@router.post(
    "/v1/chat/completions",
    responses={**ERRORS, **event_stream("a chat.completion (JSON), or with stream=true chat.completion.chunk events")},
    tags=["chat"],
    dependencies=SEARCH,
)
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    """OpenAI-compatible chat completion answered from the index; citations ride in an extra `citations` field."""
    params = body.sift or SearchParams()
    if params.k is None:
        params = params.model_copy(update={"k": ANSWER_K})
    collection, build = acquire_build(request, body.collection or params.collection)
    try:
        reader = answerer_of(build)
        if body.model not in (SIFT_MODEL_ID, reader.name):
            raise ApiError(
                404,
                "model_not_found",
                f"model {body.model!r} not served here; use {SIFT_MODEL_ID!r} (see /v1/models)",
                "model",
            )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            generation = GenerationOptions(
                max_new_tokens=body.max_completion_tokens or body.max_tokens or reader.settings.max_new_tokens,
                temperature=body.temperature or 0.0,
                top_p=body.top_p if (body.temperature or 0) > 0 else None,
                seed=body.seed,
                stop=stops,
            )
        except ValueError as exc:
            raise ApiError(422, "validation_error", f"stop: {exc}", "stop") from exc
        check_generation(generation, body.stream, "", build.engine.settings.answer.max_tokens_limit)
        query = reader.chat_query([m.text() for m in body.messages if m.role == "user"])
        limits = build.engine.settings
        check_text(query, "messages", limits.search.max_query_chars, "search.max_query_chars")
        caller_text = [m.text() for m in body.messages if m.role in ("system", "developer")] + [query]
        check_question_tokens(reader, caller_text, limits.answer.max_question_tokens, "messages")
        options = to_options(build.engine, params)
    except BaseException:
        await collection.release(build)
        raise
    prepared, done = await admit_and_prepare(collection, build, reader, query, options)
    missing = prepared.missing_shards
    reader.with_instructions(prepared, [m.text() for m in body.messages if m.role in ("system", "developer")])
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    if not body.stream:
        try:
            result = await reader.answer(prepared, generation, request.is_disconnected)
        finally:
            await done()
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage_of(reader, prepared, result),
            "citations": result.citations,
            "bundle": build.build_id,
            "collection": collection.name,
            "missing_shards": missing,
        }

    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> str:
        """A chunk with one choice carrying `delta`, or (delta None) with no choice: the usage chunk."""
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if delta is not None else []
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": choices,
            **({"usage": None} if include_usage else {}),
            **extra,
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for piece in reader.stream(prepared, generation, request.is_disconnected):
                    if isinstance(piece, AnswerResult):
                        yield chunk(
                            {},
                            piece.finish_reason,
                            citations=piece.citations,
                            bundle=build.build_id,
                            missing_shards=missing,
                        )
                        if include_usage:  # OpenAI's last chunk before [DONE]: no choices, the whole usage
                            yield chunk(None, usage=usage_of(reader, prepared, piece))
                    else:
                        yield chunk({"content": piece})
            except Exception as exc:  # noqa: BLE001 - the status line has been sent: end with an error event
                error = {"error": {"type": "generation_failed", "message": stream_error(exc)}}
                yield f"data: {json.dumps(error)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await done()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
