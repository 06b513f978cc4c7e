"""How deep the second stage can go on the machine it runs on, measured when a build loads.

`reranker.depth` (12) was chosen offline under a 200 ms p50 budget on an AVX-512 machine
(app/training/second_stage.py); a CPU without AVX-512 (no bf16, no VNNI) takes about twice as long for the same
depth. So every time a build is loaded for serving (`app.services.Collection.reload`: at start-up and at each
reload), the served path is timed here and the default depth is capped at the deepest that fits
`reranker.latency_budget_ms`. A request may still ask for more, up to `reranker.max_depth`.

What the budget covers: the whole in-process search of one query arriving alone, i.e. the first stage (the
default mode's retrievers and fusion over `search.default_candidates`, for a query whose embedding is not cached
yet) plus the second stage (`Pipeline.rerank`: the passages read, the cross-encoder through the build's
micro-batcher and MaxSim, side by side), on the serving event loop and thread pool, exactly as a request runs
them. Not covered: HTTP, authentication, JSON, the page's fetch of the hits below the depth (about a
millisecond), and waiting behind concurrent requests.

How (bounded: it runs at every start and reload):
1. `PROBE_QUERIES` + 1 short queries drawn from the bundle itself, deterministically: the leading `PROBE_WORDS`
   words of the passages at evenly spaced rows. The first warms up (first calls of the models, thread pools)
   and is not timed.
2. For each probe query: its first stage timed once (`Pipeline.coarse`), then `Pipeline.rerank` over its real
   candidates at each probe depth: the configured depth and a quarter of it.
3. Medians per depth; a line cost(depth) = fixed + per_pair·depth through them; the chosen depth is the deepest
   in [`MIN_DEPTH`, configured depth] with first stage + cost(depth) ≤ budget. When even `MIN_DEPTH` does not
   fit, it is `MIN_DEPTH` and `fits` is False.
About 1 + `PROBE_QUERIES`·(1 + 1/4) times a configured-depth second stage: ~1.5–2 s at depth 12 on an idle 2-core
AVX2 machine, ~0.7 s on an AVX-512 one. Bounded: when the warm-up shows that `PROBE_QUERIES` probes would take
more than `TARGET_SECONDS`, fewer are timed (at least one), so a slow or busy machine spends at most about
2.25 times one configured-depth search. The probes see the machine as it is then: at a reload the old build
still serves, and a busy machine calibrates shallower.

No global state: the result (`DepthCalibration`) is part of the loaded build (`Pipeline.calibration`). The
workers of a pre-fork server share one measurement per build through `SharedCalibrations` (a folder the master
creates): the first worker to load a build measures it while the others wait, so every worker serves the same
default depth (the same ranking, and cursors that work across workers).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.pipeline import Pipeline
    from app.retrieval.protocols import DocstoreReader

PROBE_QUERIES = 3  # timed probe queries (each: one first stage, one second stage per probe depth)
PROBE_WORDS = 12  # words of a probe query: about a SciFact claim or a typed question
LOW_DEPTH_DIVISOR = 4  # the probe depths: the configured depth and this fraction of it
# the default depth never goes below this, even when it does not fit the budget (unless reranker.depth is lower):
# a second stage over one hit cannot reorder anything (one z-score is 0; the hits below keep their order), so
# depth 1 would pay a cross-encoder pass for the first stage's own ranking (SciFact train: nDCG@10 equal to hybrid)
MIN_DEPTH = 2
TARGET_SECONDS = 2.0  # timed probes beyond the warm-up: fewer probe queries (≥ 1) when they would take longer

Clock = Callable[[], float]


@dataclass(frozen=True)
class DepthCalibration:
    """The default second-stage depth chosen for one loaded build on this machine, and what it was chosen from
    (times in ms; costs are of one query alone, in-process, first stage included: see the module)."""

    budget_ms: float
    depth: int  # the default depth served (≤ configured_depth)
    configured_depth: int  # reranker.depth
    cost_ms_at_depth: float  # predicted: first_stage_ms + fixed_ms + per_pair_ms · depth
    first_stage_ms: float  # median first stage of the probe queries
    fixed_ms: float  # the second stage's cost that does not grow with depth
    per_pair_ms: float  # the second stage's cost per reranked hit
    fits: bool  # False: even MIN_DEPTH is predicted over the budget
    samples_ms: tuple[tuple[int, float], ...] = ()  # (probe depth, median second-stage ms)
    probes: int = 0
    seconds: float = 0.0  # wall time the calibration took
    measured_at: float = 0.0  # unix time
    pid: int = 0  # the process that measured it (one worker measures for all of a pre-fork server)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("budget_ms", "cost_ms_at_depth", "first_stage_ms", "fixed_ms", "per_pair_ms"):
            out[key] = round(out[key], 2)
        out["samples_ms"] = {str(d): round(ms, 2) for d, ms in self.samples_ms}
        out["seconds"] = round(self.seconds, 3)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DepthCalibration:
        fields = dict(data)
        fields["samples_ms"] = tuple((int(d), float(ms)) for d, ms in dict(fields.get("samples_ms") or {}).items())
        return cls(**fields)


@dataclass
class Measurements:
    """Times (ms) of the probe queries: each one's first stage, and its second stage at each probe depth."""

    first_stage_ms: list[float]
    second_stage_ms: dict[int, list[float]]


def fit(samples: Mapping[int, float]) -> tuple[float, float]:
    """(fixed, per_pair) of the least-squares line cost = fixed + per_pair·depth through `samples` (depth → ms);
    both clamped at ≥ 0 (timing noise must not make depth free or negative). One depth: all of it per pair."""
    if not samples:
        raise ValueError("no samples to fit")
    depths, costs = list(samples), list(samples.values())
    if len(samples) == 1:
        return 0.0, max(0.0, costs[0] / max(depths[0], 1))
    mean_d, mean_c = statistics.fmean(depths), statistics.fmean(costs)
    spread = sum((d - mean_d) ** 2 for d in depths)
    per_pair = max(0.0, sum((d - mean_d) * (c - mean_c) for d, c in zip(depths, costs)) / spread)
    fixed = mean_c - per_pair * mean_d
    if fixed < 0:  # superlinear: a line through the origin instead
        fixed, per_pair = 0.0, sum(d * c for d, c in zip(depths, costs)) / sum(d * d for d in depths)
    return fixed, per_pair


def choose_depth(
    budget_ms: float | None,
    configured_depth: int,
    first_stage_ms: float,
    fixed_ms: float,
    per_pair_ms: float,
    min_depth: int = MIN_DEPTH,
) -> tuple[int, float, bool]:
    """(depth, predicted cost at it, fits): the deepest depth in [min_depth, configured_depth] whose predicted
    whole search first_stage + fixed + per_pair·depth is within `budget_ms`; min_depth (fits False) when none
    is; the configured depth when there is no budget (None or 0)."""
    lowest = min(min_depth, configured_depth)

    def cost(depth: int) -> float:
        return first_stage_ms + fixed_ms + per_pair_ms * depth

    if not budget_ms:
        return configured_depth, cost(configured_depth), True
    room = budget_ms - first_stage_ms - fixed_ms
    if per_pair_ms <= 0:
        depth = configured_depth if room >= 0 else lowest
    else:
        depth = max(lowest, min(configured_depth, math.floor(room / per_pair_ms + 1e-9)))
    return depth, cost(depth), cost(depth) <= budget_ms


def from_measurements(
    measured: Measurements,
    budget_ms: float,
    configured_depth: int,
    min_depth: int = MIN_DEPTH,
    seconds: float = 0.0,
    measured_at: float | None = None,
) -> DepthCalibration:
    """The calibration `measured` gives: medians, the fitted line, the chosen depth."""
    samples = {d: statistics.median(times) for d, times in sorted(measured.second_stage_ms.items()) if times}
    first = statistics.median(measured.first_stage_ms) if measured.first_stage_ms else 0.0
    fixed, per_pair = fit(samples)
    depth, cost, fits = choose_depth(budget_ms, configured_depth, first, fixed, per_pair, min_depth)
    return DepthCalibration(
        budget_ms=float(budget_ms),
        depth=depth,
        configured_depth=configured_depth,
        cost_ms_at_depth=cost,
        first_stage_ms=first,
        fixed_ms=fixed,
        per_pair_ms=per_pair,
        fits=fits,
        samples_ms=tuple(samples.items()),
        probes=len(measured.first_stage_ms),
        seconds=seconds,
        measured_at=time.time() if measured_at is None else measured_at,
        pid=os.getpid(),
    )


def probe_depths(configured_depth: int) -> list[int]:
    """The depths timed: the configured depth and a quarter of it, at least `MIN_DEPTH` (one depth when they
    coincide)."""
    return sorted({configured_depth, min(configured_depth, max(MIN_DEPTH, configured_depth // LOW_DEPTH_DIVISOR))})


def probe_queries(docstore: DocstoreReader, n: int, words: int = PROBE_WORDS) -> list[str]:
    """`n` short queries from the bundle itself: the leading `words` words of the passages at `n` evenly spaced
    rows (the middle of each of n equal slices), the same for the same build every time."""
    total = int(docstore.num_passages)
    if total == 0:
        return []
    rows = [((2 * i + 1) * total) // (2 * n) for i in range(n)]
    passages = docstore.passages(set(rows))
    return [" ".join(str(passages[r]["text"]).split()[:words]) or str(passages[r]["title"]) for r in rows]


async def measure(
    pipeline: Pipeline,
    depths: Sequence[int],
    probes: int = PROBE_QUERIES,
    clock: Clock = time.perf_counter,
    max_seconds: float | None = TARGET_SECONDS,
) -> Measurements:
    """Time the served path on up to `probes` queries of the bundle (plus one untimed warm-up): each query's
    first stage (`Pipeline.coarse` with the default options, off the event loop as a request runs it), then
    its second stage (`Pipeline.rerank`) at each of `depths` over those candidates. Fewer queries (at least
    one) when the warm-up says `probes` of them would take more than `max_seconds`."""
    queries = await asyncio.to_thread(probe_queries, pipeline.docstore, probes + 1)
    if not queries:
        raise ValueError("the build has no passages to draw probe queries from")
    options = pipeline.options(rerank=False)  # for the first stage only: the second stage is run by `rerank` below
    warm, timed = queries[0], queries[1:]
    started = clock()
    ranked, _ = await asyncio.to_thread(pipeline.coarse, [warm], options)
    await pipeline.rerank([warm], ranked, max(depths))
    if max_seconds is not None:  # one probe costs about the warm-up (deepest depth) plus the shallower depths
        per_probe = (clock() - started) * sum(depths) / max(depths)
        timed = timed[: max(1, min(len(timed), int(max_seconds / max(per_probe, 1e-9))))]
    first: list[float] = []
    second: dict[int, list[float]] = {d: [] for d in depths}
    for query in timed:
        started = clock()
        ranked, _ = await asyncio.to_thread(pipeline.coarse, [query], options)
        first.append((clock() - started) * 1000)
        for depth in sorted(depths, reverse=True):
            started = clock()
            await pipeline.rerank([query], ranked, depth)
            second[depth].append((clock() - started) * 1000)
    return Measurements(first, second)


async def calibrate(
    pipeline: Pipeline,
    budget_ms: float | None = None,
    probes: int = PROBE_QUERIES,
    clock: Clock = time.perf_counter,
) -> DepthCalibration | None:
    """Measure `pipeline`'s second stage on this machine and choose its default depth within `budget_ms`
    (default `reranker.latency_budget_ms`). None when there is nothing to calibrate: no second stage, or no
    budget (None or 0: the default depth stays `reranker.depth`)."""
    rs = pipeline.settings.reranker
    budget = rs.latency_budget_ms if budget_ms is None else budget_ms
    if not pipeline.second_stage or not budget:
        return None
    started = clock()
    measured = await measure(pipeline, probe_depths(rs.depth), probes, clock)
    return from_measurements(measured, budget, rs.depth, seconds=clock() - started)


class SharedCalibrations:
    """One calibration per build for all the worker processes of a pre-fork server, through files in a folder
    the master creates before forking (`create`): the first worker to load a build measures it, holding a lock
    file, while the others wait for its result. A worker that dies holding the lock releases it (flock)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def create(cls) -> SharedCalibrations:
        """A fresh private folder, removed when the creating process (the master) exits."""
        folder = Path(tempfile.mkdtemp(prefix="sift-calibrations-"))
        owner = os.getpid()

        def remove() -> None:
            if os.getpid() == owner:  # forked workers inherit this hook; only the master removes the folder
                shutil.rmtree(folder, ignore_errors=True)

        atexit.register(remove)
        return cls(folder)

    async def get(self, key: str, measure: Callable[[], Awaitable[DepthCalibration | None]]) -> DepthCalibration | None:
        """The calibration stored under `key` (e.g. collection, build and budget), measured by `measure()` here
        if no process has stored it yet."""
        name = hashlib.sha256(key.encode()).hexdigest()[:24]
        path, lock = self.folder / f"{name}.json", self.folder / f"{name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
                stored = json.loads(path.read_text())
                return None if stored is None else DepthCalibration.from_dict(stored)
            result = await measure()
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(None if result is None else asdict(result)))
            os.replace(partial, path)
            return result
        finally:
            os.close(fd)  # releases the lock
