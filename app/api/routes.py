"""The HTTP routes. Each validates (via the schemas), calls the pipeline and shapes the response."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.errors import ApiError
from app.api.schemas import BatchSearchRequest, BatchSearchResponse, SearchParams, SearchRequest, SearchResponse
from app.api.shaping import search_response
from app.pipeline import Pipeline, SearchOptions
from app.retrieval import FusionConfig

router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"description": "body too large"},
    422: {"description": "invalid body; `error.fields` names each bad field"},
    503: {"description": "bundle or models not loaded yet; retry after /readyz answers 200"},
}


def ready_pipeline(request: Request) -> Pipeline:
    pipeline = request.app.state.pipeline
    if pipeline is None:
        error = request.app.state.load_error
        message = (
            f"not ready: loading failed ({error}); fix the bundle or config and restart"
            if error
            else ("not ready: the bundle and models are still loading; retry shortly (see /readyz)")
        )
        raise ApiError(503, "not_ready", message)
    return pipeline


def to_options(pipeline: Pipeline, params: SearchParams) -> SearchOptions:
    """Merge request parameters over configured defaults and check they fit this bundle."""
    settings = pipeline.settings
    defaults = pipeline.options()
    mode = params.mode or defaults.mode
    if mode not in pipeline.available_modes():
        raise ApiError(
            422,
            "validation_error",
            f"mode: {mode!r} is not available for this bundle; use one of {pipeline.available_modes()}",
            "mode",
        )
    if params.k > settings.search.max_k:
        raise ApiError(422, "validation_error", f"k: must be <= {settings.search.max_k}", "k")
    if params.rerank and pipeline.reranker is None:
        raise ApiError(
            422,
            "validation_error",
            "rerank: no reranker is configured; set reranker.model or send rerank=false",
            "rerank",
        )
    fusion = FusionConfig(
        params.fusion or defaults.fusion.method,
        params.rrf_k or defaults.fusion.rrf_k,
        dict(params.weights) if params.weights is not None else defaults.fusion.weights,
    )
    candidates = params.candidates or defaults.candidates
    return SearchOptions(
        k=params.k,
        mode=mode,
        candidates=max(candidates, params.k),
        fusion=fusion,
        rerank=defaults.rerank if params.rerank is None else params.rerank,
        rerank_depth=params.rerank_depth or defaults.rerank_depth,
        filters=params.filters,
        collapse=params.collapse,
    )


@router.post("/v1/search", response_model=SearchResponse, responses=ERRORS, tags=["search"])
async def search(body: SearchRequest, request: Request) -> SearchResponse:
    """Retrieve (bm25, dense or hybrid), optionally rerank, and return the top `k` passages with per-stage explain."""
    pipeline = ready_pipeline(request)
    options = to_options(pipeline, body)
    result = await pipeline.search(body.query, options)
    request.app.state.metrics.observe_timings(result.timings_ms)
    request.app.state.metrics.reranked.inc(result.reranked)
    return search_response(
        body.query,
        result,
        options,
        pipeline.bundle.build_id,
        body.return_text,
        body.highlight,
        pipeline.settings.search.snippet_chars,
    )


@router.post("/v1/search/batch", response_model=BatchSearchResponse, responses=ERRORS, tags=["search"])
async def search_batch(body: BatchSearchRequest, request: Request) -> BatchSearchResponse:
    """Many queries in one request, encoded and reranked in batches (for batch jobs and evaluation)."""
    pipeline = ready_pipeline(request)
    if len(body.queries) > pipeline.settings.search.max_batch_queries:
        raise ApiError(
            422,
            "validation_error",
            f"queries: at most {pipeline.settings.search.max_batch_queries} per batch",
            "queries",
        )
    options = to_options(pipeline, body)
    started = time.perf_counter()
    results = await pipeline.search_many(body.queries, options)
    timings = results[0].timings_ms if results else {}
    request.app.state.metrics.observe_timings(timings)
    request.app.state.metrics.reranked.inc(sum(r.reranked for r in results))
    shaped = [
        search_response(
            q,
            r,
            options,
            pipeline.bundle.build_id,
            body.return_text,
            body.highlight,
            pipeline.settings.search.snippet_chars,
        )
        for q, r in zip(body.queries, results)
    ]
    total = {**timings, "total": round((time.perf_counter() - started) * 1000, 3)}
    return BatchSearchResponse(results=shaped, timings_ms=total, bundle=pipeline.bundle.build_id)


@router.get("/v1/documents/{doc_id:path}", tags=["documents"], responses={404: {"description": "unknown document"}})
async def get_document(doc_id: str, request: Request) -> dict[str, Any]:
    """A document with all its passages."""
    pipeline = ready_pipeline(request)
    document = pipeline.docstore.document(doc_id)
    if document is None:
        raise ApiError(
            404,
            "not_found",
            f"no document with id {doc_id!r} in bundle {pipeline.bundle.build_id}; check the id (see hits[].doc_id)",
        )
    return document


@router.get("/v1/info", tags=["service"])
async def info(request: Request) -> dict[str, Any]:
    """The bundle manifest, loaded models and the settings that shape results."""
    pipeline = ready_pipeline(request)
    manifest = {k: v for k, v in pipeline.bundle.manifest.items() if k != "files"}
    settings = pipeline.settings
    return {
        "bundle": {"path": str(pipeline.bundle.root), **manifest},
        "modes": pipeline.available_modes(),
        "models": {
            "dense": (pipeline.bundle.manifest.get("dense") or {}).get("model"),
            "reranker": settings.reranker.model,
        },
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


@router.get("/readyz", tags=["service"], responses={503: {"description": "still loading or failed to load"}})
async def readyz(request: Request) -> dict[str, Any]:
    """200 once the bundle and models are loaded; 503 before (or if loading failed)."""
    pipeline = ready_pipeline(request)
    return {"status": "ready", "bundle": pipeline.bundle.build_id, "modes": pipeline.available_modes()}


@router.get("/metrics", tags=["service"])
async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
