"""The HTTP routes. Each validates (via the schemas), calls the pipeline and shapes the response."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.auth import principal_of, require
from app.api.errors import ApiError, error_body
from app.api.openapi import TEXT_PLAIN
from app.api.pagination import Cursor, encode_cursor, fingerprint, resume
from app.api.schemas import (
    BatchSearchRequest,
    BatchSearchResponse,
    CollectionsResponse,
    DocumentResponse,
    ErrorResponse,
    SearchParams,
    SearchRequest,
    SearchResponse,
)
from app.api.shaping import FastJSON, redact, search_response
from app.engine import Engine
from app.pipeline import Pipeline, SearchOptions
from app.services import Build, Collection, NotReady, Services, UnknownCollection

router = APIRouter()

SEARCH = [Depends(require("search"))]
ADMIN = [Depends(require("admin"))]

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        401: "missing or unknown API key (send `Authorization: Bearer <key>`)",
        403: "the key lacks the scope this route needs",
        404: "unknown collection, document or model",
        409: "a paging cursor from another build",
        413: "body or work over a limit; the message names the setting",
        422: "invalid request; `error.fields` names each bad field",
        429: "rate limit, generation slots or rerank queue full; see `Retry-After`",
        502: "the generator backend failed",
        503: "bundle or models not loaded yet (retry after /readyz answers 200), or no answer backend",
    }.items()
}


def collection_of(request: Request, name: str | None) -> Collection:
    """The collection a request names (default: the first), or a 404 naming the known ones."""
    services: Services = request.app.state.services
    try:
        return services.collection(name)
    except UnknownCollection as exc:
        raise ApiError(404, "unknown_collection", f"{exc}; see /v1/collections", "collection") from exc


def acquire_build(request: Request, name: str | None = None) -> tuple[Collection, Build]:
    """The build a request runs on, held until `release` (requests finish on the build they started on)."""
    services: Services = request.app.state.services
    collection = collection_of(request, name)
    try:
        return collection, collection.acquire()
    except NotReady as exc:
        error = services.load_error or collection.error
        message = (
            f"not ready: loading failed ({redact(error)}); fix the bundle or config (see /readyz)"
            if error
            else "not ready: the bundle and models are still loading; retry shortly (see /readyz)"
        )
        raise ApiError(503, "not_ready", message) from exc


@contextlib.asynccontextmanager
async def use_build(request: Request, name: str | None = None) -> AsyncIterator[tuple[Collection, Build]]:
    collection, build = acquire_build(request, name)
    try:
        yield collection, build
    finally:
        await collection.release(build)


def check_text(value: str, field: str, limit: int, setting: str) -> None:
    """422 naming the field and the setting when a query-like text is longer than its limit."""
    if len(value) > limit:
        raise ApiError(422, "validation_error", f"{field}: longer than {limit} characters ({setting})", field)


def check_max(value: int | None, limit: int, field: str, setting: str) -> None:
    """422 naming the field and the setting when `value` is over its limit."""
    if value is not None and value > limit:
        raise ApiError(422, "validation_error", f"{field}: must be <= {limit} ({setting})", field)


def to_options(engine: Engine, params: SearchParams, offset: int = 0) -> SearchOptions:
    """The request's search options: `Engine.options` merges them over the configured defaults and checks
    them (the same merge eval and the benches use; one that does not fit is a 422 naming it)."""
    return engine.options(
        k=params.k,
        mode=params.mode,
        candidates=params.candidates,
        fusion=params.fusion,
        rrf_k=params.rrf_k,
        weights=dict(params.weights) if params.weights is not None else None,
        rerank=params.rerank,
        rerank_depth=params.rerank_depth,
        filters=params.filters,
        collapse=params.collapse,
        offset=offset,
        allow_partial=params.allow_partial,
        facets=tuple(facets) if (facets := getattr(params, "facets", None)) else None,
    )


@router.post("/v1/search", response_model=SearchResponse, responses=ERRORS, tags=["search"], dependencies=SEARCH)
async def search(body: SearchRequest, request: Request) -> FastJSON:
    """Retrieve (bm25, dense or hybrid), optionally rerank, and return the top `k` passages with per-stage explain."""
    async with use_build(request, body.collection) as (collection, build):
        return await _search(body, request, collection, build.engine)


async def _search(body: SearchRequest, request: Request, collection: Collection, engine: Engine) -> FastJSON:
    settings, build_id = engine.settings, engine.build_id
    engine.check_query(body.query, "query")
    options = to_options(engine, body, body.offset)
    ranking = fingerprint(body.query, options, collection.name)
    if body.cursor is not None:
        max_depth = max(settings.search.max_candidates, settings.search.max_k)
        cursor = resume(body.cursor, body.offset, build_id, collection.name, ranking, max_depth)
        options = replace(options, offset=cursor.offset, candidates=cursor.depth)
    result = await engine.search(body.query, options)
    end = options.offset + len(result.hits)
    more = bool(result.hits) and end < result.ranked
    next_cursor = encode_cursor(Cursor(build_id, collection.name, end, options.candidates, ranking)) if more else None
    metrics = request.app.state.metrics
    metrics.observe_timings(result.timings_ms, collection.name)
    metrics.reranked.labels(collection.name).inc(result.reranked)
    metrics.searches.labels(collection.name).inc()
    response = search_response(
        body.query,
        result,
        options,
        build_id,
        body.return_text,
        body.highlight,
        settings.search.snippet_chars,
        next_cursor,
    )
    if result.missing_shards:
        response["missing_shards"] = result.missing_shards
        response["next_cursor"] = None  # a partial ranking cannot be paged on consistently
    return FastJSON(response)


@router.post(
    "/v1/search/batch", response_model=BatchSearchResponse, responses=ERRORS, tags=["search"], dependencies=SEARCH
)
async def search_batch(body: BatchSearchRequest, request: Request) -> FastJSON:
    """Many queries in one request, encoded and reranked in batches (for batch jobs and evaluation)."""
    async with use_build(request, body.collection) as (collection, build):
        return await _search_batch(body, request, collection, build.engine)


async def _search_batch(body: BatchSearchRequest, request: Request, collection: Collection, engine: Engine) -> FastJSON:
    options = to_options(engine, body, body.offset)
    started = time.perf_counter()
    results = await engine.search_many(body.queries, options)
    timings = results[0].timings_ms if results else {}
    metrics = request.app.state.metrics
    metrics.observe_timings(timings, collection.name)
    metrics.reranked.labels(collection.name).inc(sum(r.reranked for r in results))
    metrics.searches.labels(collection.name).inc(len(results))
    shaped = [
        search_response(
            q,
            r,
            options,
            engine.build_id,
            body.return_text,
            body.highlight,
            engine.settings.search.snippet_chars,
        )
        for q, r in zip(body.queries, results)
    ]
    missing = results[0].missing_shards if results else []
    for item in shaped:  # one fan-out served every query: the same shards are missing from each result
        item["missing_shards"] = missing
    total = {**timings, "total": round((time.perf_counter() - started) * 1000, 3)}
    return FastJSON({"results": shaped, "timings_ms": total, "bundle": engine.build_id, "missing_shards": missing})


@router.get(
    "/v1/documents/{doc_id:path}",
    response_model=None,
    tags=["documents"],
    responses={
        **ERRORS,
        200: {"model": DocumentResponse, "description": "the document"},
        404: {"description": "unknown document"},
    },
    dependencies=SEARCH,
)
async def get_document(doc_id: str, request: Request, collection: str | None = None) -> dict[str, Any]:
    """A document with all its passages (`?collection=` picks the collection)."""
    async with use_build(request, collection) as (_, build):
        document = await build.engine.document(doc_id)
    if document is None:
        raise ApiError(
            404,
            "not_found",
            f"no document with id {doc_id!r} in bundle {build.build_id}; check the id (see hits[].doc_id)",
        )
    return document


@router.get(
    "/v1/collections",
    response_model=None,
    tags=["service"],
    responses={**ERRORS, 200: {"model": CollectionsResponse, "description": "the served collections"}},
    dependencies=SEARCH,
)
async def collections(request: Request) -> dict[str, Any]:
    """The served collections (the first is the default), each with its build and reload state."""
    services: Services = request.app.state.services
    ingest = services.ingest_statuses()
    listing = {
        "collections": [
            {**c.status(), **({"ingest": ingest[c.name]} if c.name in ingest else {})}
            for c in services.collections.values()
        ],
        "default": services.collection(None).name,
    }
    return shown_to(request, listing)


@router.post("/v1/admin/reload", tags=["service"], responses=ERRORS, dependencies=ADMIN)
async def reload(request: Request, collection: str | None = None) -> dict[str, Any]:
    """Check now for a newly published build (of one collection, or all) instead of waiting for the watcher."""
    services: Services = request.app.state.services
    collection_of(request, collection)
    return shown_to(request, {"results": await services.reload(collection)})


@router.get("/v1/info", tags=["service"], responses=ERRORS, dependencies=SEARCH)
async def info(request: Request, collection: str | None = None) -> dict[str, Any]:
    """The bundle manifest, loaded models, the settings that shape results and the reload state."""
    async with use_build(request, collection) as (served, build):
        return shown_to(request, _info(build.pipeline, served))


def shown_to(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    """`body` in full for an admin key; without paths and host names for anyone else."""
    principal = principal_of(request)
    return body if principal is not None and principal.verified and principal.may("admin") else redact(body)


def _info(pipeline: Pipeline, collection: Collection) -> dict[str, Any]:
    manifest = {k: v for k, v in pipeline.bundle.manifest.items() if k != "files"}
    settings = pipeline.settings
    return {
        "bundle": {"path": str(pipeline.bundle.root), **manifest},
        "modes": pipeline.available_modes(),
        "models": {
            "dense": (pipeline.bundle.manifest.get("dense") or {}).get("model"),
            "reranker": settings.reranker.model,
        },
        "runtimes": pipeline.runtimes(),
        "second_stage": pipeline.second_stage_report(),  # default depth and its calibration on this machine
        "collection": collection.status(),
        "process": {"pid": os.getpid(), "workers": settings.server.workers, "threads": settings.runtime.threads},
        "settings": {
            "search": settings.search.model_dump(),
            "fusion": settings.fusion.model_dump(),
            "reranker": settings.reranker.model_dump(),
        },
    }


@router.get("/healthz", tags=["service"])
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["service"],
    responses={503: {"model": ErrorResponse, "description": "still loading or failed to load"}},
)
async def readyz(request: Request) -> Any:
    """200 once the models and every collection's build are loaded; 503 before (or if loading failed).
    `details` shows each collection's build and the last failed reload (the old build keeps serving)."""
    services: Services = request.app.state.services
    details = redact({c.name: c.status() for c in services.collections.values()})  # a public probe
    down = await asyncio.to_thread(services.unavailable_shards) if services.ready else []
    if down:
        body = error_body("not_ready", f"not ready: shard(s) {', '.join(down)} do not answer")
        body["details"] = details
        return JSONResponse(status_code=503, content=body)
    if not services.ready:
        error = services.load_error or "; ".join(
            f"{c.name}: {c.error}" for c in services.collections.values() if c.current is None and c.error
        )
        message = f"not ready: loading failed ({redact(error)})" if error else "not ready: still loading; retry shortly"
        body = error_body("not_ready", message)
        body["details"] = details
        return JSONResponse(status_code=503, content=body)
    first = services.collection(None).current
    if first is None:  # `services.ready`: every collection holds a build
        raise RuntimeError("services report ready without a served build")
    return {
        "status": "ready",
        "bundle": first.build_id,
        "modes": first.pipeline.available_modes(),
        "details": details,
    }


@router.get(
    "/metrics", tags=["service"], responses={**ERRORS, **TEXT_PLAIN}, response_class=Response, dependencies=ADMIN
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (admin scope when keys are configured)."""
    services: Services = request.app.state.services
    request.app.state.metrics.generations.set(services.models.generation.active)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
