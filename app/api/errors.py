"""Error responses: always JSON `{"error": {"type", "message", "fields"?}}` with a message that says what to do."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error the API reports as-is; `field` names the request field at fault (for 422s)."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.field = status, kind, message, field


def error_body(kind: str, message: str, fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": kind, "message": message}
    if fields:
        body["fields"] = fields
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
        return JSONResponse(status_code=exc.status, content=error_body(exc.kind, exc.message, fields))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route; see /docs for the API"
        if exc.status_code == 405:
            message = "method not allowed on this route; see /docs for the API"
        return JSONResponse(status_code=exc.status_code, content=error_body("http_error", message))
