"""`create_app()`: the FastAPI application, its lifespan (load the bundle and models off the event loop)
and middleware (request id, tracing, body-size limit, metrics, structured access log)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.answer import router as answer_router
from app.api.ecosystem import router as ecosystem_router
from app.api.errors import error_body, install_error_handlers
from app.api.metrics import Metrics
from app.api.playground import assets as playground_assets
from app.api.playground import router as playground_router
from app.api.routes import router
from app.pipeline import Pipeline
from app.services import Services
from app.settings import Settings, load_settings
from app.tracing import REQUEST_ID, Tracer, new_request_id

log = logging.getLogger("sift.api")


class RequestMiddleware:
    """ASGI middleware around every HTTP request: its id (`X-Request-ID`, echoed back and put on every log
    line and span), its tracing span, the body-size limit (413), metrics and the structured access log."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics, tracer: Tracer) -> None:
        self.app, self.max_body_bytes, self.metrics, self.tracer = app, max_body_bytes, metrics, tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}
        too_large = False
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            too_large = True
        received = 0
        request_id = new_request_id(headers.get("x-request-id"))
        token = REQUEST_ID.set(request_id)

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            with self.tracer.request(scope.get("method", ""), scope.get("path", ""), headers) as span:
                try:
                    if too_large:
                        await self._reject(tracked_send, status)
                    else:
                        try:
                            await self.app(scope, limited_receive, tracked_send)
                        except _BodyTooLarge:
                            await self._reject(tracked_send, status)
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

    async def _reject(self, send: Send, status: dict[str, int]) -> None:
        status["code"] = 413
        body = json.dumps(
            error_body(
                "payload_too_large", f"request body exceeds {self.max_body_bytes} bytes; send fewer or shorter queries"
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


def create_app(
    settings: Settings | None = None,
    pipeline: Pipeline | None = None,
    generator=None,  # noqa: ANN001
    services: Services | None = None,
    reader=None,  # noqa: ANN001
) -> FastAPI:
    """Build the app around `services` (the composition root, `app.services`). Without them, services are
    built from `settings` and load in the background at start-up (`/readyz` answers 503 until every
    collection has a build), and a watcher reloads each collection when its `current` changes. With a
    `pipeline` (and optionally a `generator`/`reader`) the app is ready at once and does not reload."""
    if services is None and pipeline is not None:
        services = Services.from_pipeline(pipeline, generator, reader)
    settings = settings or (services.settings if services is not None else load_settings())
    metrics = Metrics()
    watch = services is None
    services = services or Services.from_settings(
        settings, on_reload=lambda collection, outcome: metrics.reloads.labels(collection, outcome).inc()
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = []
        if watch:

            async def start_then_watch() -> None:
                await services.start()
                metrics.ready.set(1 if services.ready else 0)
                if services.load_error is None:
                    await services.watch(settings.server.reload_interval_s)

            tasks.append(asyncio.create_task(start_then_watch()))
        else:
            metrics.ready.set(1)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await services.close()

    app = FastAPI(
        title="Sift",
        version="0.1.0",
        description="Two-stage neural retrieval: BM25 + dense retrieval, fusion, cross-encoder reranking.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.services = services
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(answer_router)
    app.include_router(ecosystem_router)
    app.include_router(playground_router)
    app.mount("/ui/assets", playground_assets, name="playground-assets")
    app.add_middleware(
        RequestMiddleware, max_body_bytes=settings.server.max_body_bytes, metrics=metrics, tracer=services.tracer
    )
    return app
