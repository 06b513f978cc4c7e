"""Error responses: always JSON `{"error": {"type", "message", "fields"?, "request_id"}}` with a message that
says what to do, for every status. Unhandled errors become JSON 500s in `RequestMiddleware` (app/api/main.py),
which sees every request and its id."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine import EngineError
from app.generation.base import GenerationError
from app.generation.pool import Busy
from app.retrieval.reranker import QueueFull
from app.retrieval.shards import ShardUnavailable
from app.tracing import REQUEST_ID

log = logging.getLogger("sift.api")


class ApiError(Exception):
    """An error the API reports as-is; `field` names the request field at fault (for 422s)."""

    def __init__(
        self, status: int, kind: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.field, self.headers = status, kind, message, field, headers


def error_body(kind: str, message: str, fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": kind, "message": message}
    if fields:
        body["fields"] = fields
    request_id = REQUEST_ID.get()
    if request_id is not None:
        body["request_id"] = request_id
    return {"error": body}


def _field_name(loc: tuple[Any, ...]) -> str:
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    parts = [str(p) for p in loc]
    name = ""
    for part in parts:
        name += f"[{part}]" if part.isdigit() else (f".{part}" if name else part)
    return name or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = []
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            if err.get("type") == "literal_error" or err.get("type") == "enum":
                loc = loc[:2] if loc and loc[0] == "body" else loc
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            fields.append({"field": _field_name(loc), "message": msg})
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return JSONResponse(
            status_code=422,
            content=error_body("validation_error", f"invalid request: {summary}; see /docs for the schema", fields),
        )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        fields = [{"field": exc.field, "message": exc.message}] if exc.field else None
        return JSONResponse(
            status_code=exc.status, content=error_body(exc.kind, exc.message, fields), headers=exc.headers
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body FastAPI could not parse (e.g. not UTF-8): a bad field like any other
            why = "could not be parsed; send a UTF-8 JSON object (content-type: application/json)"
            return JSONResponse(
                status_code=422,
                content=error_body(
                    "validation_error", f"invalid request: body: {why}", [{"field": "body", "message": why}]
                ),
            )
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route; see /docs for the API"
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"method not allowed on this route; use {allowed or 'another method'} (see /docs)"
        return JSONResponse(
            status_code=exc.status_code, content=error_body("http_error", message), headers=exc.headers or None
        )

    @app.exception_handler(ShardUnavailable)
    async def _shard(_: Request, exc: ShardUnavailable) -> JSONResponse:
        log.warning("shard unavailable: %s", exc, extra={"request_id": REQUEST_ID.get()})
        body = error_body(
            "shard_unavailable",
            f"shard {exc.shard} did not answer; retry shortly, or send allow_partial: true to get the other "
            "shards' results",
        )
        body["error"]["shard"] = exc.shard
        return JSONResponse(status_code=503, content=body, headers={"Retry-After": "1"})

    @app.exception_handler(Busy)
    async def _busy(_: Request, exc: Busy) -> JSONResponse:
        return JSONResponse(
            status_code=429, content=error_body("generation_busy", str(exc)), headers={"Retry-After": "1"}
        )

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        body = error_body(exc.kind, str(exc), [{"field": exc.field, "message": str(exc)}] if exc.field else None)
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return JSONResponse(status_code=exc.status, content=body, headers=headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(status_code=429, content=error_body("rerank_busy", str(exc)), headers={"Retry-After": "1"})

    @app.exception_handler(GenerationError)
    async def _generation(_: Request, exc: GenerationError) -> JSONResponse:
        log.warning("generation failed: %s", exc.detail, extra={"request_id": REQUEST_ID.get()})
        return JSONResponse(status_code=502, content=error_body("generator_failed", str(exc)))
