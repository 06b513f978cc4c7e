"""The served OpenAPI document, made to agree with the server: the limits in settings are written into the
request schemas (the models themselves carry none), what the served builds offer (retrieval modes, the
bi-encoder's dimension; a reranker) narrows them, and the routes that answer with something other than JSON
say so (see `TEXT_PLAIN`, `EVENT_STREAM`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app.settings import Settings

TEXT_PLAIN: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


def event_stream(description: str, model: type[BaseModel] | None = None) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON (`model` when given, else any object), or Server-Sent Events when the request asks
    to stream."""
    json_body: dict[str, Any] = {"model": model} if model is not None else {}
    return {
        200: {
            **json_body,
            "description": description,
            "content": {
                **({} if model is not None else {"application/json": {"schema": {"type": "object"}}}),
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


Limit = tuple[str, int] | list[tuple[str, int]]  # (JSON-schema keyword, value from settings), or several


def _limits(settings: Settings) -> dict[str, dict[str, Limit]]:
    """schema name -> property -> (JSON-schema keyword, value from settings), or a list of them."""
    search: dict[str, Limit] = {
        "k": ("maximum", settings.search.max_k),
        "candidates": ("maximum", settings.search.max_candidates),
        "rerank_depth": ("maximum", settings.reranker.max_depth),
    }
    return {
        "AnswerRequest": {
            **search,
            "question": ("maxLength", settings.search.max_query_chars),
            "passages": ("maximum", settings.answer.max_passages),
        },
        "SearchParams": search,
        "SearchRequest": {
            **search,
            "query": ("maxLength", settings.search.max_query_chars),
            "facets": ("maxItems", settings.search.max_facets),
        },
        "BatchSearchRequest": {
            **search,
            "queries": ("maxItems", settings.search.max_batch_queries),
        },
        "ClassifyRequest": {
            "texts": [("maxLength", settings.classify.max_text_chars), ("maxItems", settings.classify.max_texts)],
        },
        "InlineLabelSet": {"labels": ("maxProperties", settings.classify.max_labels)},
        "GenerationOptions": {"max_new_tokens": ("maximum", settings.answer.max_tokens_limit)},
        "ChatRequest": {
            "max_tokens": ("maximum", settings.answer.max_tokens_limit),
            "max_completion_tokens": ("maximum", settings.answer.max_tokens_limit),
        },
        "RerankRequest": {
            "query": ("maxLength", settings.search.max_query_chars),
            "documents": ("maxItems", settings.reranker.max_depth),
        },
        "EmbeddingsRequest": {
            "input": [
                ("maxLength", settings.embeddings.max_input_chars),
                ("maxItems", settings.embeddings.max_inputs),
            ],
        },
    }


def _set_limit(prop: dict[str, Any], keyword: str, value: int) -> None:
    """`keyword: value` on the property, or on each of its non-null `anyOf` branches it applies to (a length
    to a string or to the strings of an array, a count of items to an array)."""
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"] or [prop]
    for branch in branches:
        kind = branch.get("type")
        if keyword == "maxLength" and kind == "array" and (branch.get("items") or {}).get("type") == "string":
            branch["items"][keyword] = value
            continue
        if keyword == "maxLength" and kind not in (None, "string"):
            continue
        if keyword == "maxItems" and kind not in (None, "array"):
            continue
        branch[keyword] = value


def _typed_branch(prop: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The schema of a property (or of its `anyOf` branch) of JSON type `kind`."""
    return next((b for b in [prop, *prop.get("anyOf", [])] if b.get("type") == kind), None)


def _served(app: FastAPI) -> tuple[list[str], list[int]] | None:
    """The retrieval modes and bi-encoder dimensions the served builds offer (None until every collection has
    a build; a reload keeps both: a build with another bi-encoder or dimension is refused)."""
    services = getattr(app.state, "services", None)
    if services is None or not services.ready:
        return None
    builds = [c.current for c in services.collections.values()]
    modes = {m for b in builds for m in b.pipeline.available_modes()}
    dimensions = {
        int(dense["dimension"])
        for b in builds
        if (dense := b.pipeline.bundle.manifest.get("dense") or {}).get("enabled") and "dimension" in dense
    }
    return [m for m in ("bm25", "dense", "hybrid") if m in modes], sorted(dimensions)


def _narrow(schema: dict[str, Any], settings: Settings, served: tuple[list[str], list[int]] | None) -> None:
    """What this server cannot do leaves the document: `rerank: true` and `/v1/rerank` without a second
    stage (both 422), modes the builds lack (422), a `dimensions` other than the bi-encoder's (422), and
    `/v1/embeddings` without one."""
    components = schema.get("components", {}).get("schemas", {})
    params = [c.get("properties", {}) for c in components.values()]
    if not settings.classify.enabled:
        schema.get("paths", {}).pop("/v1/classify", None)
    if not settings.ingest.enabled:  # documents over HTTP: 404 on all three routes
        for path in [p for p in schema.get("paths", {}) if p.startswith("/v1/collections/{collection}/")]:
            schema["paths"].pop(path)
    label_set = components.get("ClassifyRequest", {}).get("properties", {}).get("label_set", {})
    if (branch := _typed_branch(label_set, "string")) is not None:  # a name must be a configured one (else 422)
        names = sorted(settings.index.tagging.label_sets)
        if names:
            branch["enum"] = names
        else:
            label_set["anyOf"] = [b for b in label_set.get("anyOf", []) if b is not branch]
    if not settings.reranker.model:
        schema.get("paths", {}).pop("/v1/rerank", None)
        for properties in params:
            if (branch := _typed_branch(properties.get("rerank", {}), "boolean")) is not None:
                branch["enum"] = [False]
    if served is None:
        return
    modes, dimensions = served
    for properties in params:
        if (branch := _typed_branch(properties.get("mode", {}), "string")) is not None and "enum" in branch:
            branch["enum"] = modes
    if not dimensions:
        schema.get("paths", {}).pop("/v1/embeddings", None)
    embeddings = components.get("EmbeddingsRequest", {}).get("properties", {})
    if (branch := _typed_branch(embeddings.get("dimensions", {}), "integer")) is not None and dimensions:
        branch["enum"] = dimensions


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve an OpenAPI document carrying this server's limits and what its builds offer (built on request, and
    kept from the first request that finds every collection loaded)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes, tags=app.openapi_tags
        )
        components = schema.get("components", {}).get("schemas", {})
        for name, limits in _limits(settings).items():
            properties = components.get(name, {}).get("properties", {})
            for field, limit in limits.items():
                for keyword, value in limit if isinstance(limit, list) else [limit]:
                    if field in properties:
                        _set_limit(properties[field], keyword, value)
        words = components.get("InlineLabelSet", {}).get("properties", {}).get("labels", {})
        if isinstance(words.get("additionalProperties"), dict):
            words["additionalProperties"]["maxItems"] = settings.classify.max_words
        batch = components.get("BatchSearchRequest", {}).get("properties", {}).get("queries", {})
        if "items" in batch:
            batch["items"]["maxLength"] = settings.search.max_query_chars
        served = _served(app)
        _narrow(schema, settings, served)
        if served is not None:  # kept once the builds are loaded (before, it is rebuilt on each request)
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI documents replacing app.openapi
