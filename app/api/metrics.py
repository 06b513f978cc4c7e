"""Prometheus metrics, one registry per app instance (no process-global state)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sift_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "sift_request_latency_seconds",
            "End-to-end request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_latency = Histogram(
            "sift_stage_latency_seconds",
            "Latency per pipeline stage",
            ["stage", "collection"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge("sift_in_flight_requests", "Requests being served", registry=self.registry)
        self.reranked = Counter(
            "sift_reranked_candidates", "Candidates scored by the reranker", ["collection"], registry=self.registry
        )
        self.searches = Counter(
            "sift_searches", "Queries searched, by collection", ["collection"], registry=self.registry
        )
        self.ready = Gauge("sift_ready", "1 when the bundle and models are loaded", registry=self.registry)
        self.generations = Gauge(
            "sift_generations_active", "Answers holding a generation slot now", registry=self.registry
        )
        self.reloads = Counter(
            "sift_reloads",
            "Build loads by collection and outcome (ok | failed: the old build kept serving)",
            ["collection", "outcome"],
            registry=self.registry,
        )

        self.ingest_batches = Counter(
            "sift_ingest_batches",
            "Batches accepted over HTTP (durable in the ingest log), by collection and operation",
            ["collection", "op"],
            registry=self.registry,
        )
        self.ingest_documents = Counter(
            "sift_ingest_documents",
            "Documents (upsert) or ids (delete) accepted over HTTP",
            ["collection", "op"],
            registry=self.registry,
        )
        self.ingest_apply = Histogram(
            "sift_ingest_apply_seconds",
            "One apply of pending batches (incremental update, publish), by outcome",
            ["collection", "outcome"],
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
            registry=self.registry,
        )
        self.ingest_visible = Histogram(
            "sift_ingest_time_to_visible_seconds",
            "From an applied update's oldest accepted batch to its build being served here",
            ["collection"],
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
            registry=self.registry,
        )

    def ingest_event(self, collection: str, event: str, value: float) -> None:
        """An `app.ingesting` event: batch_upsert / batch_delete (value: items), apply / apply_failed (seconds),
        visible (seconds)."""
        if event.startswith("batch_"):
            op = event.removeprefix("batch_")
            self.ingest_batches.labels(collection, op).inc()
            self.ingest_documents.labels(collection, op).inc(value)
        elif event in ("apply", "apply_failed"):
            self.ingest_apply.labels(collection, "ok" if event == "apply" else "failed").observe(value)
        elif event == "visible":
            self.ingest_visible.labels(collection).observe(value)

    def watch_ingest(self, statuses: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Export each collection's ingest backlog as `statuses()` gives it at each scrape (collection ->
        `Ingestor.status()`)."""

        class Collector:
            def collect(self) -> Iterator[Metric]:
                documents = GaugeMetricFamily(
                    "sift_ingest_backlog_documents",
                    "Documents and ids accepted over HTTP, not yet in the published build",
                    labels=["collection"],
                )
                batches = GaugeMetricFamily(
                    "sift_ingest_backlog_batches", "Batches not yet in the published build", labels=["collection"]
                )
                for name, status in statuses().items():
                    documents.add_metric([name], status["backlog_documents"])
                    batches.add_metric([name], status["backlog_batches"])
                yield documents
                yield batches

        self.registry.register(Collector())

    def watch_query_cache(self, cache: Callable[[], Any]) -> None:
        """Export the query-embedding cache's hits, misses and size (`cache()` is read at each scrape: the
        cache is created when the first build loads)."""

        class Collector:
            def collect(self) -> Iterator[Metric]:
                current = cache()
                hits, misses, size = (current.hits, current.misses, len(current)) if current is not None else (0, 0, 0)
                yield CounterMetricFamily("sift_query_cache_hits", "Query embeddings served from the cache", value=hits)
                yield CounterMetricFamily("sift_query_cache_misses", "Query embeddings computed", value=misses)
                yield GaugeMetricFamily("sift_query_cache_entries", "Query embeddings held", value=size)

        self.registry.register(Collector())

    def watch_second_stage(self, reports: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Export each collection's second stage as `reports()` gives it at each scrape (collection ->
        `Pipeline.second_stage_report()`, as `Services.second_stages`): its default depth, and when it was
        calibrated, the predicted cost of a search at that depth and the budget it was chosen under."""

        class Collector:
            def collect(self) -> Iterator[Metric]:
                current = reports()
                depth = GaugeMetricFamily(
                    "sift_second_stage_depth",
                    "Default depth of the second stage (reranker.depth capped by the calibration)",
                    labels=["collection"],
                )
                cost = GaugeMetricFamily(
                    "sift_second_stage_cost_ms",
                    "Calibrated in-process cost of a lone search at the default depth (first + second stage), ms",
                    labels=["collection"],
                )
                budget = GaugeMetricFamily(
                    "sift_second_stage_budget_ms",
                    "reranker.latency_budget_ms it was calibrated under",
                    labels=["collection"],
                )
                fits = GaugeMetricFamily(
                    "sift_second_stage_fits",
                    "1 when the calibrated default depth fits the budget",
                    labels=["collection"],
                )
                for collection, report in current.items():
                    depth.add_metric([collection], report["depth"])
                    calibration = report.get("calibration")
                    if calibration is not None:
                        cost.add_metric([collection], calibration["cost_ms_at_depth"])
                        budget.add_metric([collection], calibration["budget_ms"])
                        fits.add_metric([collection], 1.0 if calibration["fits"] else 0.0)
                yield from (depth, cost, budget, fits)

        self.registry.register(Collector())

    def observe_timings(self, timings_ms: dict[str, float], collection: str = "default") -> None:
        for stage, ms in timings_ms.items():
            self.stage_latency.labels(stage, collection).observe(ms / 1000.0)
