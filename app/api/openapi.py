"""The served OpenAPI document, made to agree with the server: the limits in settings are written into the
request schemas (the models themselves carry none), and the routes that answer with something other than
JSON say so (see `TEXT_PLAIN`, `EVENT_STREAM`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.settings import Settings

TEXT_PLAIN: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


def event_stream(description: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or Server-Sent Events when the request asks to stream."""
    return {
        200: {
            "description": description,
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "description": "one Server-Sent Event: `event` names it (absent for chat chunks), `data` "
                        "is its JSON payload",
                        "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                        "required": ["data"],
                    }
                },
            },
        }
    }


def _limits(settings: Settings) -> dict[str, dict[str, tuple[str, int]]]:
    """schema name -> property -> (JSON-schema keyword, value from settings)."""
    search = {
        "k": ("maximum", settings.search.max_k),
        "candidates": ("maximum", settings.search.max_candidates),
        "rerank_depth": ("maximum", settings.reranker.max_depth),
    }
    return {
        "SearchRequest": {**search, "query": ("maxLength", settings.search.max_query_chars)},
        "BatchSearchRequest": {**search, "queries": ("maxItems", settings.search.max_batch_queries)},
        "AnswerRequest": {
            **search,
            "question": ("maxLength", settings.search.max_query_chars),
            "passages": ("maximum", settings.answer.max_passages),
        },
        "SearchParams": search,
        "GenerationOptions": {"max_new_tokens": ("maximum", settings.answer.max_tokens_limit)},
        "ChatRequest": {
            "max_tokens": ("maximum", settings.answer.max_tokens_limit),
            "max_completion_tokens": ("maximum", settings.answer.max_tokens_limit),
        },
    }


def _set_limit(prop: dict[str, Any], keyword: str, value: int) -> None:
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"] or [prop]
    for branch in branches:
        if keyword == "maxLength" and branch.get("type") not in (None, "string"):
            continue
        branch[keyword] = value


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve an OpenAPI document carrying this server's limits (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes, tags=app.openapi_tags
        )
        components = schema.get("components", {}).get("schemas", {})
        for name, limits in _limits(settings).items():
            properties = components.get(name, {}).get("properties", {})
            for field, (keyword, value) in limits.items():
                if field in properties:
                    _set_limit(properties[field], keyword, value)
        batch = components.get("BatchSearchRequest", {}).get("properties", {}).get("queries", {})
        if "items" in batch:
            batch["items"]["maxLength"] = settings.search.max_query_chars
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
