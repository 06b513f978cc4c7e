"""OpenTelemetry tracing: with a tracer on, every request gets a server span and one child span per stage
(bm25, dense encode and search, fusion, rerank, fetch, generate), each carrying the request id; with it off
(the default) nothing is recorded. Spans are caught by the SDK's in-memory exporter."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing tests need the `tracing` extra (make install has it)")

from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from app.settings import TracingSettings, load_settings  # noqa: E402
from app.tracing import Tracer  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.servers import app_client, served_pipeline  # noqa: E402

STAGES = {"sift.bm25", "sift.dense.encode", "sift.dense.search", "sift.fusion", "sift.rerank", "sift.fetch"}


@pytest.fixture(scope="module")
def traced(example_index):
    """A server with tracing on (settings' console exporter) and the default second stage at its configured
    depth (uncalibrated: the spans carry it); its provider also hands every span to an in-memory exporter."""
    settings = load_settings(
        bundle=example_index,
        reranker={"model": "models/sift-reranker-minilm-l6", "max_length": 128, "latency_budget_ms": 0},
        answer={"max_new_tokens": 12, "mode": "generative"},
        generator={"backend": "local", "model": "smollm2", "cache_dir": str(ROOT / "var" / "models")},  # conftest's
        tracing={"enabled": True, "exporter": "console"},
    )
    exporter = InMemorySpanExporter()
    with app_client(settings) as client:
        client.app.state.services.tracer.provider.add_span_processor(SimpleSpanProcessor(exporter))
        yield client, exporter


def _by_trace(exporter, request_id):
    spans = [s for s in exporter.get_finished_spans() if s.attributes.get("sift.request_id") == request_id]
    assert spans, f"no span carries request id {request_id}"
    return spans


def test_a_search_has_one_span_per_stage_under_its_request_span(traced):
    client, exporter = traced
    exporter.clear()
    response = client.post(
        "/v1/search",
        json={"query": "how do stars form", "mode": "hybrid", "rerank": True},
        headers={"X-Request-ID": "req-42"},
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-42"
    spans = _by_trace(exporter, "req-42")
    names = [s.name for s in spans]
    assert STAGES <= set(names), names
    server = next(s for s in spans if s.name == "POST /v1/search")
    assert server.attributes["http.route"] == "/v1/search" and server.attributes["http.response.status_code"] == 200
    for span in spans:
        assert span.context.trace_id == server.context.trace_id
        if span is not server:
            assert span.parent is not None and span.parent.span_id == server.context.span_id, span.name
            assert span.attributes["sift.build"] == response.json()["bundle"]
            assert span.start_time >= server.start_time and span.end_time <= server.end_time
    # stage order within the request: retrieval, then fusion, then rerank, then fetch
    start = {s.name: s.start_time for s in spans}
    assert start["sift.dense.encode"] < start["sift.dense.search"] < start["sift.fusion"] < start["sift.rerank"]
    assert start["sift.rerank"] < start["sift.fetch"]
    rerank = next(s for s in spans if s.name == "sift.rerank")
    assert rerank.attributes["sift.depth"] == load_settings().reranker.depth  # configs/default.yaml
    assert rerank.attributes["sift.maxsim"] == "stored"  # the default second stage reads the bundle's vectors


def test_bm25_mode_traces_only_its_stages_and_ids_are_generated_when_absent(traced):
    client, exporter = traced
    exporter.clear()
    response = client.post("/v1/search", json={"query": "coral reef", "mode": "bm25", "rerank": False})
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    names = {s.name for s in _by_trace(exporter, request_id)}
    assert names == {"POST /v1/search", "sift.bm25", "sift.fetch"}
    # an unsafe offered id is replaced, not echoed
    bad = client.post("/v1/search", json={"query": "tea", "mode": "bm25"}, headers={"X-Request-ID": "<script>"})
    assert bad.headers["x-request-id"] != "<script>" and len(bad.headers["x-request-id"]) == 32


def test_the_callers_trace_is_continued(traced):
    client, exporter = traced
    exporter.clear()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "X-Request-ID": "req-parent"}
    assert client.post("/v1/search", json={"query": "stars", "mode": "bm25"}, headers=headers).status_code == 200
    spans = _by_trace(exporter, "req-parent")
    assert {format(s.context.trace_id, "032x") for s in spans} == {trace_id}


def test_answers_trace_generation_streamed_or_not(traced):
    client, exporter = traced
    exporter.clear()
    body = {"question": "When was the Eiffel Tower completed?", "rerank": False}
    assert client.post("/v1/answer", json=body, headers={"X-Request-ID": "ans-1"}).status_code == 200
    generate = next(s for s in _by_trace(exporter, "ans-1") if s.name == "sift.generate")
    assert generate.attributes["sift.stream"] is False and generate.attributes["sift.completion_tokens"] >= 1
    with client.stream("POST", "/v1/answer", json={**body, "stream": True}, headers={"X-Request-ID": "ans-2"}) as r:
        text = "".join(r.iter_text())
    assert "event: done" in text
    spans = _by_trace(exporter, "ans-2")
    server = next(s for s in spans if s.name == "POST /v1/answer")
    generate = next(s for s in spans if s.name == "sift.generate")
    assert generate.attributes["sift.stream"] is True and generate.attributes["sift.pieces"] >= 1
    assert generate.context.trace_id == server.context.trace_id and generate.end_time <= server.end_time


def test_tracing_is_off_by_default_and_records_nothing(example_settings):
    assert load_settings().tracing.enabled is False
    assert not Tracer.from_settings(TracingSettings()).enabled
    with app_client(example_settings) as client:
        assert not served_pipeline(client.app).tracer.enabled
        response = client.post("/v1/search", json={"query": "stars", "mode": "bm25"}, headers={"X-Request-ID": "off"})
    assert response.headers["x-request-id"] == "off"
    # on, with the console exporter: a real SDK provider is built from settings
    tracer = Tracer.from_settings(TracingSettings(enabled=True, exporter="console", service_name="sift-test"))
    assert tracer.enabled and tracer.provider.resource.attributes["service.name"] == "sift-test"
    tracer.shutdown()
