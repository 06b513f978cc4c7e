"""Optional OpenTelemetry tracing: a span per HTTP request and one per stage (bm25, dense encode and search,
fusion, rerank, fetch, read, generate), each carrying the request id.

Off by default (`tracing.enabled: false`): `Tracer.span()` then returns a shared null context and nothing
of OpenTelemetry is imported, so the `tracing` extra (`pip install 'sift[tracing]'`) is only needed when it
is on. The composition root builds one `Tracer` per process from settings (`Tracer.from_settings`) and hands
it to every pipeline; tests hand in their own provider (for example with an in-memory exporter).

Invariants:
- a stage span is a child of the span current where the stage runs; `asyncio.to_thread` and the answer
  stream's thread copy the context, so spans made on worker threads join their request's trace;
- the request id lives in a context variable set once per request by the HTTP middleware
  (`X-Request-ID` from the client when it is sane, else a new one) and is put on every span.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.settings import TracingSettings

REQUEST_ID: ContextVar[str | None] = ContextVar("sift_request_id", default=None)
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_NULL = contextlib.nullcontext()


def new_request_id(offered: str | None = None) -> str:
    """The client's `X-Request-ID` when it is a short token of safe characters, else a fresh random id."""
    if offered and _SANE_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


class Tracer:
    """Spans for requests and stages; a no-op without a provider."""

    def __init__(self, provider: Any = None) -> None:
        """`provider`: an OpenTelemetry `TracerProvider` (None: tracing off)."""
        self.provider = provider
        self._tracer = provider.get_tracer("sift") if provider is not None else None

    @classmethod
    def from_settings(cls, settings: TracingSettings) -> Tracer:
        """The tracer `tracing:` asks for; a clear error when it is on but the extra is missing."""
        if not settings.enabled:
            return cls(None)
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        except ImportError as exc:
            raise RuntimeError(
                "tracing.enabled is true but OpenTelemetry is not installed: pip install 'sift[tracing]' "
                "(or set tracing.enabled: false)"
            ) from exc
        provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        if settings.exporter == "console":
            exporter: Any = ConsoleSpanExporter()
        else:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError as exc:
                raise RuntimeError(
                    "tracing.exporter otlp needs opentelemetry-exporter-otlp-proto-http: pip install 'sift[tracing]'"
                ) from exc
            exporter = OTLPSpanExporter(endpoint=settings.endpoint) if settings.endpoint else OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        """A span around a block, made current (children nest under it); a null context when off."""
        if self._tracer is None:
            return _NULL
        return self._tracer.start_as_current_span(name, attributes=_attributes(attributes))

    def start(self, name: str, **attributes: Any) -> Any:
        """A span that is not made current (for work spread over an async generator); end it with `end()`.
        None when off."""
        if self._tracer is None:
            return None
        return self._tracer.start_span(name, attributes=_attributes(attributes))

    @staticmethod
    def end(span: Any, error: BaseException | None = None) -> None:
        if span is None:
            return
        if error is not None:
            span.record_exception(error)
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()

    @contextlib.contextmanager
    def request(self, method: str, path: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """The server span of one HTTP request, continuing the caller's trace (W3C `traceparent`)."""
        if self._tracer is None:
            yield None
            return
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        parent = extract(dict(headers))
        attributes = _attributes({"http.request.method": method, "url.path": path})
        with self._tracer.start_as_current_span(
            f"{method} {path}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            yield span

    def shutdown(self) -> None:
        """Flush and stop the exporter (at server shutdown)."""
        if self.provider is not None and hasattr(self.provider, "shutdown"):
            self.provider.shutdown()


def _attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in attributes.items() if v is not None}
    request_id = REQUEST_ID.get()
    if request_id is not None:
        out["sift.request_id"] = request_id
    return out
