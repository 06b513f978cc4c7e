"""The second stage's default depth, calibrated on the machine that serves it (app/retrieval/calibration.py):
the depth choice from a cost model (no dependence on this CPU's speed), the measurement's wiring with a fake
clock, workers sharing one measurement, and real servers that report and serve the calibrated depth."""

from __future__ import annotations

import asyncio
import json
import re
import time
from types import SimpleNamespace

import httpx
import pytest

from app.retrieval.calibration import (
    MIN_DEPTH,
    DepthCalibration,
    Measurements,
    SharedCalibrations,
    calibrate,
    choose_depth,
    fit,
    from_measurements,
    probe_depths,
    probe_queries,
)
from app.settings import load_settings


def cost_model(first_ms: float, fixed_ms: float, per_pair_ms: float, depths: list[int], probes: int = 3):
    """Measurements a machine with exactly this cost would give."""
    return Measurements([first_ms] * probes, {d: [fixed_ms + per_pair_ms * d] * probes for d in depths})


# -- the depth choice ------------------------------------------------------------------------------------------


def test_the_deepest_depth_whose_whole_search_fits_the_budget_is_chosen():
    # 200 ms, no fixed cost, 10 ms a pair: at most 20 pairs, capped at the configured depth
    assert choose_depth(200, 50, 0, 0, 10) == (20, 200, True)
    assert choose_depth(200, 12, 0, 0, 10) == (12, 120, True)
    # the first stage and the fixed part come out of the budget first: (200 - 20 - 30) / 10 = 15
    assert choose_depth(200, 50, 20, 30, 10) == (15, 200, True)
    depth, cost, fits = choose_depth(199.9, 50, 20, 30, 10)
    assert (depth, fits) == (14, True) and cost == pytest.approx(190)


def test_a_budget_below_the_fixed_cost_gives_the_minimum_depth_and_says_it_does_not_fit():
    depth, cost, fits = choose_depth(50, 12, 20, 40, 10)
    assert depth == MIN_DEPTH == 2 and not fits and cost == pytest.approx(80)
    assert choose_depth(1, 12, 0, 0, 10) == (2, 20, False)  # even the minimum is over a 1 ms budget
    assert choose_depth(1, 1, 0, 0, 10) == (1, 10, False)  # never deeper than configured


def test_no_budget_keeps_the_configured_depth():
    for budget in (None, 0):
        depth, _, fits = choose_depth(budget, 12, 500, 500, 100)
        assert depth == 12 and fits


def test_depth_is_free_when_it_costs_nothing_per_pair():
    assert choose_depth(200, 12, 20, 30, 0)[0] == 12
    assert choose_depth(40, 12, 20, 30, 0) == (2, 50, False)


def test_the_fitted_line_recovers_the_cost_model_and_noise_never_makes_depth_free_or_negative():
    assert fit({3: 30 + 10 * 3, 12: 30 + 10 * 12}) == pytest.approx((30, 10))
    assert fit({3: 100, 12: 90}) == pytest.approx((95, 0))  # noise: slower at the shallower depth
    fixed, per_pair = fit({3: 10, 12: 200})  # superlinear: the line would start below zero
    assert fixed == 0 and per_pair > 0
    assert fit({12: 120}) == pytest.approx((0, 10))


def test_calibration_from_measurements_uses_medians_and_records_what_it_chose_from():
    measured = cost_model(20, 30, 10, [3, 12])
    measured.second_stage_ms[12][0] = 5000  # one stall (a page fault, another process) does not move the median
    measured.first_stage_ms[1] = 900
    cal = from_measurements(measured, 200, 12, measured_at=123.0)
    assert (cal.depth, cal.fits, cal.configured_depth, cal.budget_ms) == (12, True, 12, 200)
    assert cal.first_stage_ms == 20 and cal.fixed_ms == pytest.approx(30) and cal.per_pair_ms == pytest.approx(10)
    assert cal.cost_ms_at_depth == pytest.approx(170) and cal.samples_ms == ((3, 60), (12, 150))
    assert cal.probes == 3 and cal.measured_at == 123.0
    # a machine twice as slow per pair gets a shallower default, never deeper than configured
    slow = from_measurements(cost_model(20, 30, 20, [3, 12]), 200, 12)
    assert slow.depth == 7 and slow.fits and slow.cost_ms_at_depth == pytest.approx(190)
    assert DepthCalibration.from_dict(json.loads(json.dumps(slow.as_dict()))).depth == 7


def test_probe_depths_and_queries_are_deterministic_and_drawn_from_the_bundle(example_pipeline):
    assert probe_depths(12) == [3, 12] and probe_depths(8) == [2, 8] and probe_depths(2) == [2]
    assert probe_depths(1) == [1]  # never deeper than configured
    queries = probe_queries(example_pipeline.docstore, 4)
    assert queries == probe_queries(example_pipeline.docstore, 4) and len(set(queries)) == 4
    assert all(1 <= len(q.split()) <= 12 for q in queries)


# -- the measurement, with a fake clock ------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CostedPipeline:
    """Just what `calibrate` uses of a `Pipeline`, each stage advancing a fake clock by a cost model's ms."""

    def __init__(self, example_pipeline, clock: FakeClock, first_ms: float, fixed_ms: float, per_pair_ms: float):
        self.settings = load_settings(reranker={"depth": 12, "latency_budget_ms": 200})
        self.docstore, self.clock = example_pipeline.docstore, clock
        self.first_ms, self.fixed_ms, self.per_pair_ms = first_ms, fixed_ms, per_pair_ms
        self.second_stage, self.reranked = True, []
        self.options = example_pipeline.options

    def coarse(self, queries, options):  # noqa: ANN001, ANN201
        self.clock.now += self.first_ms / 1000
        return [[SimpleNamespace(idx=i) for i in range(100)] for _ in queries], {}

    async def rerank(self, queries, ranked, depth):  # noqa: ANN001, ANN201
        self.reranked.append(depth)
        self.clock.now += (self.fixed_ms + self.per_pair_ms * min(depth, len(ranked[0]))) / 1000
        return ranked, 0.0, {}


def test_calibrate_times_each_probe_query_at_each_probe_depth_after_an_untimed_warm_up(example_pipeline):
    clock = FakeClock()
    fake = CostedPipeline(example_pipeline, clock, first_ms=20, fixed_ms=30, per_pair_ms=20)
    cal = asyncio.run(calibrate(fake, clock=clock))
    assert fake.reranked == [12] + [12, 3] * 3  # warm-up at the deepest probe, then each probe query
    assert (cal.depth, cal.fits, cal.probes) == (7, True, 3)
    assert cal.first_stage_ms == pytest.approx(20) and cal.per_pair_ms == pytest.approx(20)
    assert cal.seconds == pytest.approx((20 * 4 + 30 * 7 + 20 * (12 + 3 * 15)) / 1000)
    assert asyncio.run(calibrate(fake, budget_ms=0, clock=clock)) is None  # no budget: nothing measured


def test_a_slow_machine_times_fewer_probe_queries_to_stay_within_the_target(example_pipeline):
    """2.45 s a configured-depth search: one probe query after the warm-up, not three (≈ 5.5 s, not 12 s)."""
    clock = FakeClock()
    fake = CostedPipeline(example_pipeline, clock, first_ms=20, fixed_ms=30, per_pair_ms=200)
    cal = asyncio.run(calibrate(fake, clock=clock))
    assert fake.reranked == [12, 12, 3] and cal.probes == 1
    assert (cal.depth, cal.fits) == (2, False) and cal.per_pair_ms == pytest.approx(200)
    assert cal.seconds == pytest.approx((20 + 2430) * 2 / 1000 + 630 / 1000)


def test_options_default_to_the_calibrated_depth_and_a_request_may_ask_deeper(example_pipeline):
    from app.services import derive_pipeline

    pipeline = derive_pipeline(example_pipeline)
    configured = pipeline.settings.reranker.depth
    assert pipeline.options().rerank_depth == configured and pipeline.calibration is None
    pipeline.calibration = from_measurements(cost_model(0, 0, 200 / 5, probe_depths(configured)), 200, configured)
    assert pipeline.options().rerank_depth == pipeline.default_depth == 5
    assert pipeline.options(rerank_depth=40).rerank_depth == 40


def test_workers_share_one_measurement_per_build(tmp_path):
    shared, calls = SharedCalibrations(tmp_path), []

    async def measure() -> DepthCalibration:
        calls.append(1)
        await asyncio.sleep(0.2)  # the others wait on the lock meanwhile
        return from_measurements(cost_model(0, 0, 40, [3, 12]), 200, 12)

    async def workers() -> list[DepthCalibration | None]:
        return await asyncio.gather(*(shared.get("default/build-1", measure) for _ in range(3)))

    first, second, third = asyncio.run(workers())
    assert len(calls) == 1 and first == second == third and first.depth == 5
    assert asyncio.run(shared.get("default/build-2", measure)).depth == 5 and len(calls) == 2


def test_metrics_export_the_depth_and_cost_per_collection():
    from prometheus_client import generate_latest

    from app.api.metrics import Metrics

    cal = from_measurements(cost_model(20, 30, 20, [3, 12]), 200, 12)
    reports = {
        "docs": {"depth": cal.depth, "calibration": cal.as_dict()},
        "off": {"depth": 12, "calibration": None},
    }
    metrics = Metrics()
    metrics.watch_second_stage(lambda: reports)
    text = generate_latest(metrics.registry).decode()
    assert 'sift_second_stage_depth{collection="docs"} 7.0' in text
    assert 'sift_second_stage_depth{collection="off"} 12.0' in text
    assert 'sift_second_stage_cost_ms{collection="docs"} 190.0' in text
    assert 'sift_second_stage_fits{collection="docs"} 1.0' in text
    assert 'sift_second_stage_cost_ms{collection="off"}' not in text


# -- real servers --------------------------------------------------------------------------------------------

QUERY = {"query": "how do honeybees communicate", "k": 30, "return_text": False}


def reranked(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return sum(1 for h in response.json()["hits"] if (h["explain"].get("rerank") or {}).get("score") is not None)


def gauge(metrics: str, name: str, collection: str = "default") -> float | None:
    found = re.search(rf'^{name}{{collection="{collection}"}} (\S+)$', metrics, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_a_server_calibrates_its_second_stage_at_start_and_serves_that_depth(example_index):
    """configs/default.yaml's second stage (shipped cross-encoder + stored-vector MaxSim) under its 200 ms budget:
    whatever this CPU gives, the depth is in [1, reranker.depth], reported in /v1/info and the log, and is what
    a search without `rerank_depth` reranks; a request may still ask deeper."""
    from tests.servers import sift_server

    env = {"SIFT_BUNDLE": str(example_index), "SIFT_GENERATOR__BACKEND": "none"}
    with sift_server(env) as (base, process), httpx.Client(timeout=60) as client:
        info = client.get(f"{base}/v1/info").json()
        stage, configured = info["second_stage"], load_settings().reranker.depth
        cal = stage["calibration"]
        assert stage["configured_depth"] == configured and stage["latency_budget_ms"] == 200
        assert cal is not None and cal["budget_ms"] == 200 and cal["configured_depth"] == configured
        assert 1 <= stage["depth"] == cal["depth"] <= configured
        assert cal["per_pair_ms"] > 0 and cal["first_stage_ms"] > 0 and cal["probes"] >= 1
        assert cal["fits"] == (cal["cost_ms_at_depth"] <= 200)
        assert reranked(client.post(f"{base}/v1/search", json=QUERY)) == stage["depth"]
        deeper = stage["depth"] + 4
        assert deeper <= info["settings"]["reranker"]["max_depth"]
        assert reranked(client.post(f"{base}/v1/search", json={**QUERY, "rerank_depth": deeper})) == deeper
        log = open(process.log_path, encoding="utf-8").read()
        line = next(json.loads(x[x.index("{") :]) for x in log.splitlines() if "second_stage_calibrated" in x)
        assert line["depth"] == stage["depth"] and line["calibration"]["pid"] == info["process"]["pid"]
        metrics = client.get(f"{base}/metrics").text
        assert gauge(metrics, "sift_second_stage_depth") == stage["depth"]
        assert gauge(metrics, "sift_second_stage_cost_ms") == pytest.approx(cal["cost_ms_at_depth"], abs=0.01)


def test_a_budget_nothing_fits_serves_the_minimum_depth_measured_once_for_both_workers(example_index):
    """A 1 ms budget: the minimum depth (2) and `fits` false, whatever the CPU. With two pre-forked workers, one
    measures and both serve its result (the same default depth, so the same ranking from either)."""
    from tests.servers import sift_server

    env = {
        "SIFT_BUNDLE": str(example_index),
        "SIFT_GENERATOR__BACKEND": "none",
        "SIFT_RERANKER__LATENCY_BUDGET_MS": "1",
        "SIFT_SERVER__WORKERS": "2",
    }
    with sift_server(env, ready_timeout=300) as (base, _):
        seen: dict[int, dict] = {}
        deadline = time.time() + 120
        while len(seen) < 2 and time.time() < deadline:
            with httpx.Client(timeout=60) as client:  # a new connection each time: either worker may accept it
                info = client.get(f"{base}/v1/info")
                if info.status_code != 200:
                    time.sleep(0.2)
                    continue
                pid, stage = info.json()["process"]["pid"], info.json()["second_stage"]
                assert stage["depth"] == MIN_DEPTH and stage["calibration"]["fits"] is False
                assert reranked(client.post(f"{base}/v1/search", json=QUERY)) == MIN_DEPTH
                assert reranked(client.post(f"{base}/v1/search", json={**QUERY, "rerank_depth": 6})) == 6
                seen[pid] = stage["calibration"]
        assert len(seen) == 2, f"only workers {set(seen)} answered"
        first, second = seen.values()
        assert first == second  # one measurement (same pid, same time), read by the other worker


def test_metrics_of_a_started_app_carry_the_depth_its_info_reports(example_index):
    """Through the app (services built from settings, started by its lifespan): the gauges `Metrics` exports
    from `Services.second_stages` agree with /v1/info (watched here as app/api/main.py should watch them)."""
    from fastapi.testclient import TestClient

    from app.api.main import create_app

    settings = load_settings(bundle=example_index, generator={"backend": "none"}, reranker={"latency_budget_ms": 1})
    app = create_app(settings)  # it exports every collection's second stage to /metrics
    with TestClient(app) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        stage = client.get("/v1/info").json()["second_stage"]
        metrics = client.get("/metrics").text
    assert stage["depth"] == MIN_DEPTH and not stage["calibration"]["fits"]
    assert gauge(metrics, "sift_second_stage_depth") == MIN_DEPTH
    assert gauge(metrics, "sift_second_stage_cost_ms") == pytest.approx(stage["calibration"]["cost_ms_at_depth"])
    assert gauge(metrics, "sift_second_stage_budget_ms") == 1 and gauge(metrics, "sift_second_stage_fits") == 0
