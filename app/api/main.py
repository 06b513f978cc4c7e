"""`create_app()`: the FastAPI application, its lifespan (load the bundle and models off the event loop)
and middleware (request id, tracing, body-size limit, metrics, structured access log)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.answer import router as answer_router
from app.api.auth import Auth
from app.api.classify import router as classify_router
from app.api.ecosystem import router as ecosystem_router
from app.api.errors import error_body, install_error_handlers
from app.api.ingest import router as ingest_router
from app.api.metrics import Metrics
from app.api.openapi import install_openapi
from app.api.playground import assets as playground_assets
from app.api.playground import router as playground_router
from app.api.routes import router
from app.services import Services
from app.settings import Settings, load_settings
from app.tracing import REQUEST_ID, Tracer, new_request_id

log = logging.getLogger("sift.api")


class RequestMiddleware:
    """ASGI middleware around every HTTP request: its id (`X-Request-ID`, echoed back and put on every log
    line and span), its tracing span, the body-size limit (413), metrics and the structured access log."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        metrics: Metrics,
        tracer: Tracer,
        ingest_body_bytes: int | None = None,
    ) -> None:
        self.app, self.max_body_bytes, self.metrics, self.tracer = app, max_body_bytes, metrics, tracer
        self.ingest_body_bytes = ingest_body_bytes

    def _limit(self, path: str) -> tuple[int, str]:
        """The body limit of a request to `path` and the setting that sets it: documents sent for ingestion
        (`/v1/collections/NAME/documents...`) have their own."""
        if self.ingest_body_bytes is not None and path.startswith("/v1/collections/") and "/documents" in path:
            return self.ingest_body_bytes, "ingest.max_body_bytes"
        return self.max_body_bytes, "server.max_body_bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500, "started": False}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        request_id = new_request_id(headers.get("x-request-id"))
        token = REQUEST_ID.set(request_id)

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            with self.tracer.request(scope.get("method", ""), scope.get("path", ""), headers) as span:
                try:
                    limit = self._limit(scope.get("path", ""))
                    body = await self._read_body(receive, headers, limit[0])
                    if body is None:
                        await self._reject(tracked_send, limit)
                    else:
                        await self.app(scope, _replay(body, receive), tracked_send)
                except Exception as exc:  # noqa: BLE001 - any error becomes the documented JSON 500
                    log.error("unhandled error", exc_info=exc, extra={"request_id": request_id})
                    if status["started"]:
                        raise
                    await self._internal_error(tracked_send)
                finally:
                    if span is not None:
                        route = getattr(scope.get("route"), "path", None)
                        if route:
                            span.update_name(f"{scope.get('method')} {route}")
                            span.set_attribute("http.route", route)
                        span.set_attribute("http.response.status_code", status["code"])
        finally:
            REQUEST_ID.reset(token)
            self.metrics.in_flight.dec()
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(path, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.latency.labels(path).observe(elapsed)
            log.info(
                json.dumps(
                    {
                        "event": "request",
                        "request_id": request_id,
                        "method": scope.get("method"),
                        "path": scope.get("path"),
                        "route": path,
                        "status": status["code"],
                        "ms": round(elapsed * 1000, 2),
                    }
                )
            )

    async def _read_body(self, receive: Receive, headers: dict[str, str], limit: int) -> bytes | None:
        """The whole request body (at most `limit` bytes, declared or chunked), or None when larger. Bodies
        are bounded by design, so reading them first gives a clean 413 however they are sent."""
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # a disconnect: the app sees an empty body, then the disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _reject(self, send: Send, limit: tuple[int, str]) -> None:
        message = f"request body exceeds {limit[0]} bytes ({limit[1]}); send fewer or shorter inputs"
        await _send_json(send, 413, error_body("payload_too_large", message))

    async def _internal_error(self, send: Send) -> None:
        message = "internal error; it is logged with this request_id: report it, or retry if the cause was transient"
        await _send_json(send, 500, error_body("internal_error", message))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then the client's later messages (disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_json(send: Send, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """Build the app around `services` (the composition root, `app.services`), or around services built from
    `settings` (default: `load_settings()`). The services load in the background at start-up (models, every
    collection's build, its lease and second-stage calibration; `/readyz` answers 503 until every collection
    has a build), then a watcher reloads each collection when its `current` changes. `services` are handed in
    by the servers that build them first: a pre-fork worker (`app.serving`) and a Ray Serve replica."""
    settings = settings or (services.settings if services is not None else load_settings())
    metrics = Metrics()
    services = services or Services.from_settings(settings)
    services.on_reload(lambda collection, outcome: metrics.reloads.labels(collection, outcome).inc())
    services.on_ingest(metrics.ingest_event)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # one pool, sized for the machine, runs every blocking stage (asyncio.to_thread uses it)
        pool = ThreadPoolExecutor(max_workers=settings.server.threads or os.cpu_count() or 1, thread_name_prefix="sift")
        asyncio.get_running_loop().set_default_executor(pool)

        async def start_then_watch() -> None:
            started = time.perf_counter()
            await services.start()
            metrics.ready.set(1 if services.ready else 0)
            if services.ready:
                builds = {c.name: c.current.build_id for c in services.collections.values() if c.current}
                log.info("ready", extra={"builds": builds, "start_s": round(time.perf_counter() - started, 1)})
            if services.load_error is None:
                await asyncio.gather(services.watch(settings.server.reload_interval_s), services.run_appliers())

        task = asyncio.create_task(start_then_watch())
        try:
            yield
        finally:
            task.cancel()
            await services.close()
            pool.shutdown(wait=False)

    app = FastAPI(
        title="Sift",
        version="0.1.0",
        description="Two-stage neural retrieval: BM25 + dense retrieval, fusion, cross-encoder reranking.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.services = services
    app.state.auth = Auth(settings.server)
    app.state.metrics = metrics
    metrics.watch_query_cache(lambda: services.models.queries)
    metrics.watch_ingest(services.ingest_statuses)  # each collection's backlog of documents sent over HTTP
    metrics.watch_second_stage(services.second_stages)  # each collection's calibrated default depth and its cost
    install_error_handlers(app)
    install_openapi(app, settings)
    app.include_router(router)
    app.include_router(answer_router)
    app.include_router(ecosystem_router)
    app.include_router(classify_router)
    app.include_router(ingest_router)
    app.include_router(playground_router)
    app.mount("/ui/assets", playground_assets, name="playground-assets")
    app.add_middleware(
        RequestMiddleware,
        max_body_bytes=settings.server.max_body_bytes,
        metrics=metrics,
        tracer=services.tracer,
        ingest_body_bytes=settings.ingest.max_body_bytes if settings.ingest.enabled else None,
    )
    return app
