"""Question answering and the OpenAI-compatible chat backend: `/v1/answer`, `/v1/chat/completions`,
`/v1/models`. Routes validate, call the `Answerer` and a `Generator`, and shape (or stream) the response."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.answering import Answerer, PreparedAnswer, citations
from app.api.errors import ApiError
from app.api.routes import ERRORS, ready_pipeline, to_options
from app.api.schemas import MAX_QUERY_CHARS, SearchParams
from app.generation.base import GenerationOptions

router = APIRouter()
SIFT_MODEL_ID = "sift-rag"


class AnswerRequest(SearchParams):
    question: str = Field(
        ..., min_length=1, max_length=MAX_QUERY_CHARS, examples=["When was the Eiffel Tower completed?"]
    )
    k: int = Field(5, ge=1, le=100, description="passages retrieved (the best fitting ones go into the prompt)")
    passages: int | None = Field(None, ge=1, le=20, description="most passages put into the prompt (default 3)")
    generation: GenerationOptions = Field(default_factory=GenerationOptions, description="decoding controls")
    stream: bool = Field(False, description="send Server-Sent Events: passages, then tokens, then a final event")

    @field_validator("question")
    @classmethod
    def _non_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("question must contain non-whitespace text")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return " ".join(str(part.get("text", "")) for part in self.content if isinstance(part, dict))
        return self.content or ""


class ChatRequest(BaseModel):
    """The OpenAI chat-completions request; unknown OpenAI fields are accepted and ignored. Sift's own
    retrieval options may be sent in `sift` (mode, k, rerank, filters)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(SIFT_MODEL_ID, examples=[SIFT_MODEL_ID])
    messages: list[ChatMessage] = Field(..., min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=2048)
    max_completion_tokens: int | None = Field(None, ge=1, le=2048)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    sift: SearchParams | None = None

    @field_validator("messages")
    @classmethod
    def _has_user_message(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and m.text().strip() for m in value):
            raise ValueError("messages must contain a user message with text")
        return value


def answerer(request: Request) -> Answerer:
    """The app's `Answerer`, built once (prompt template read once) for its pipeline and generator."""
    pipeline = ready_pipeline(request)
    generator = request.app.state.generator
    if generator is None:
        raise ApiError(503, "no_generator", "no generator is configured; set generator.backend to local or openai")
    reader = getattr(request.app.state, "answerer", None)
    if reader is None or reader.pipeline is not pipeline or reader.generator is not generator:
        reader = Answerer(pipeline, generator, pipeline.settings.answer)
        request.app.state.answerer = reader
    return reader


def check_generation(options: GenerationOptions, stream: bool, prefix: str) -> None:
    problems = options.problems(stream=stream)
    if problems:
        field, why = problems[0]
        raise ApiError(422, "validation_error", f"{prefix}{field}: {why}", f"{prefix}{field}")


async def iterate_in_thread(make: Any) -> AsyncIterator[str]:
    """Consume a blocking iterator on a worker thread, yielding its items to the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def run() -> None:
        try:
            iterator: Iterator[str] = make()
            for item in iterator:
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    threading.Thread(target=run, daemon=True, name="stream").start()
    while True:
        item = await queue.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def passages_payload(prepared: PreparedAnswer) -> list[dict[str, Any]]:
    return [{k: p[k] for k in ("n", "doc_id", "passage_id", "title", "text", "score")} for p in prepared.passages]


@router.post("/v1/answer", responses=ERRORS, tags=["answer"])
async def answer(body: AnswerRequest, request: Request) -> Any:
    """Retrieve, prompt the generator with the best passages, and answer with citations (JSON or SSE)."""
    reader = answerer(request)
    check_generation(body.generation, body.stream, "generation.")
    options = to_options(reader.pipeline, body)
    started = time.perf_counter()
    prepared = await reader.prepare(body.question, options, body.passages)
    generation = body.generation.model_copy()
    if "max_new_tokens" not in body.generation.model_fields_set:
        generation.max_new_tokens = reader.settings.max_new_tokens

    def final(text: str, generate_ms: float) -> dict[str, Any]:
        timings = {
            **prepared.timings_ms,
            "generate": round(generate_ms, 3),
            "total": round((time.perf_counter() - started) * 1000, 3),
        }
        return {
            "question": body.question,
            "answer": text,
            "answered": prepared.answerable,
            "citations": citations(text, prepared.passages) if prepared.answerable else [],
            "passages": passages_payload(prepared),
            "model": reader.generator.name,
            "timings_ms": timings,
            "bundle": reader.pipeline.bundle.build_id,
        }

    if not body.stream:
        t = time.perf_counter()
        if prepared.answerable:
            result = await asyncio.to_thread(reader.generator.generate, prepared.messages, generation)
            text = result.text
        else:
            text = prepared.no_answer
        return final(text, (time.perf_counter() - t) * 1000)

    async def events() -> AsyncIterator[str]:
        yield sse("passages", {"passages": passages_payload(prepared), "answered": prepared.answerable})
        t = time.perf_counter()
        pieces: list[str] = []
        if prepared.answerable:
            try:
                async for piece in iterate_in_thread(lambda: reader.generator.stream(prepared.messages, generation)):
                    pieces.append(piece)
                    yield sse("token", {"text": piece})
            except Exception as exc:  # noqa: BLE001 - reported in-stream: the status line has been sent
                yield sse("error", {"message": f"generation failed: {exc}"})
                return
        else:
            pieces.append(prepared.no_answer)
            yield sse("token", {"text": prepared.no_answer})
        yield sse("done", final("".join(pieces), (time.perf_counter() - t) * 1000))

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


def chat_query(messages: list[ChatMessage]) -> str:
    """The retrieval query: the last user message, prefixed by the previous one when it is a short follow-up."""
    users = [m.text().strip() for m in messages if m.role == "user" and m.text().strip()]
    last = users[-1]
    if len(users) > 1 and len(last.split()) < 8:
        return f"{users[-2]} {last}"
    return last


@router.get("/v1/models", tags=["chat"])
async def models(request: Request) -> dict[str, Any]:
    """OpenAI-style model list: Sift's RAG model."""
    generator = request.app.state.generator
    owned = f"sift ({generator.name})" if generator is not None else "sift"
    return {"object": "list", "data": [{"id": SIFT_MODEL_ID, "object": "model", "created": 0, "owned_by": owned}]}


@router.post("/v1/chat/completions", responses=ERRORS, tags=["chat"])
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    """OpenAI-compatible chat completion answered from the index; citations ride in an extra `citations` field."""
    reader = answerer(request)
    if body.model not in (SIFT_MODEL_ID, reader.generator.name):
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
    check_generation(generation, body.stream, "")
    params = body.sift or SearchParams(k=5)
    options = to_options(reader.pipeline, params)
    prepared = await reader.prepare(chat_query(body.messages), options)
    system_and_history = [m for m in body.messages if m.role in ("system", "developer")]
    if system_and_history:
        prepared.messages[0]["content"] += "\n" + "\n".join(m.text() for m in system_and_history)
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    if not body.stream:
        if prepared.answerable:
            result = await asyncio.to_thread(reader.generator.generate, prepared.messages, generation)
            text, finish, usage = result.text, result.finish_reason, (result.prompt_tokens, result.completion_tokens)
        else:
            text, finish, usage = prepared.no_answer, "stop", (0, 0)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": usage[0] + usage[1]},
            "citations": citations(text, prepared.passages) if prepared.answerable else [],
        }

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        pieces: list[str] = []
        if prepared.answerable:
            async for piece in iterate_in_thread(lambda: reader.generator.stream(prepared.messages, generation)):
                pieces.append(piece)
                yield chunk({"content": piece})
        else:
            pieces.append(prepared.no_answer)
            yield chunk({"content": prepared.no_answer})
        text = "".join(pieces)
        yield chunk({}, "stop", citations=citations(text, prepared.passages) if prepared.answerable else [])
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
