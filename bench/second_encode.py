"""What the second query encode that issue 28 removed cost a reranked search, measured in one process.

    python bench/second_encode.py [--claims 300] [--depth 12] [--bundle DIR]

Before one-pass query encoding (f01cb0f), a reranked search encoded its query twice: pooled for dense
retrieval, then token by token for MaxSim, on a worker thread *beside* the cross-encoder's batch. This bench
serves the shipped configuration in this process, built the way `sift serve` builds it (`Services`: models
warmed up, threads shared as a server shares them, the build calibrated), with the query cache off, and runs
each SciFact test claim twice, back to back and in alternating order: as shipped (one encode), and with that
second token-by-token encode of the query added where it ran before (beside the cross-encoder). The paired
difference, claim by claim, is the second encode's cost to a lone search's latency; the process's CPU per
search is its cost to the machine (what concurrent searches share). `bench/query_path.py` compares the two
commits' servers over HTTP instead, where this machine's run-to-run swing is larger than this difference.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_report, progress  # noqa: E402
from bench.query_path import claims, default_bundle, pct  # noqa: E402


def cpu_s() -> float:
    """This process's user + system CPU seconds, to the microsecond (bench.common's `cpu_seconds` reads
    /proc's clock ticks, 10 ms: coarser than the differences measured here)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(bundle: Path, texts: list[str], depth: int) -> dict[str, Any]:
    from app.services import Services
    from app.settings import load_settings

    settings = load_settings(bundle=str(bundle))
    services = Services.from_settings(settings)
    await services.start()
    if not services.ready:
        raise SystemExit(f"the build did not load: {services.load_error or services.collection(None).error}")
    build = services.collection(None).acquire()
    try:
        pipeline = build.pipeline
        late = pipeline.late
        if late is None or not late.stored:
            raise SystemExit("the shipped second stage scores MaxSim over stored token vectors; this bundle has none")
        shipped = late.score_many
        second = {"on": False}

        def with_second_encode(queries: list[str], rows: list[list[int]], texts_: list[list[str]]) -> Any:
            if second["on"]:  # what f01cb0f did here: the query's token vectors from a pass of their own
                late.dense.token_vectors(queries)
            return shipped(queries, rows, texts_)

        late.score_many = with_second_encode  # type: ignore[method-assign]
        options = build.engine.options(rerank=True, rerank_depth=depth, k=10)
        for text in texts[:10]:  # warm-up
            await build.engine.search_many([text], options)
        wall: dict[str, list[float]] = {"one": [], "two": []}
        cpu: dict[str, list[float]] = {"one": [], "two": []}
        same = 0
        with progress(2 * len(texts), "claims x variants") as bar:
            for i, text in enumerate(texts):
                ids: dict[str, list[int]] = {}
                for variant in ("one", "two") if i % 2 == 0 else ("two", "one"):
                    second["on"] = variant == "two"
                    started, cpu_start = time.perf_counter(), cpu_s()
                    result = (await build.engine.search_many([text], options))[0]
                    wall[variant].append((time.perf_counter() - started) * 1000.0)
                    cpu[variant].append((cpu_s() - cpu_start) * 1000.0)
                    ids[variant] = [h.idx for h in result.hits]
                    bar.update()
                same += ids["one"] == ids["two"]
        return {"wall": wall, "cpu": cpu, "same": same, "runtime": pipeline.runtimes()}
    finally:
        await services.collection(None).release(build)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", type=int, default=300, help="SciFact test claims (300: all)")
    parser.add_argument("--depth", type=int, default=12, help="rerank_depth of every search")
    parser.add_argument("--bundle", type=Path, default=None)
    args = parser.parse_args()
    os.environ["SIFT_RUNTIME__QUERY_CACHE_SIZE"] = "0"  # every search pays its encodes
    texts = claims(args.claims)
    out = asyncio.run(measure(args.bundle or default_bundle(), texts, args.depth))
    wall, cpu = out["wall"], out["cpu"]
    paired = [two - one for one, two in zip(wall["one"], wall["two"], strict=True)]
    cpu_paired = [two - one for one, two in zip(cpu["one"], cpu["two"], strict=True)]
    lines = [
        f"Default reranked search (hybrid, second stage at depth {args.depth}), in one process built as `sift serve` "
        f"builds it, query cache off, {len(texts)} SciFact test claims, each run both ways back to back (order "
        f"alternating). Runtimes: {out['runtime']}.",
        "",
        "| query encodes per search | wall p50 ms | wall p95 ms | CPU ms per search (p50) |",
        "|---|---|---|---|",
    ]
    for variant, label in (("one", "1 (shipped)"), ("two", "2 (f01cb0f's second, token-by-token encode added)")):
        lines.append(
            f"| {label} | {statistics.median(wall[variant]):.1f} | {pct(wall[variant], 0.95):.1f} "
            f"| {statistics.median(cpu[variant]):.1f} |"
        )
    lines += [
        "",
        f"- the second encode's cost to a lone search (median paired difference): **{statistics.median(paired):.1f} "
        f"ms** of latency, **{statistics.median(cpu_paired):.1f} ms** of CPU",
        f"- identical top-10 rankings both ways: {out['same']}/{len(texts)} claims",
        "- it ran beside the cross-encoder's batch, so on a lone search it costs the CPU it takes from that batch, "
        "not its own duration",
    ]
    summary = [
        {
            "claim": "a second query encode beside the cross-encoder, per reranked search",
            "figure": f"+{statistics.median(paired):.1f} ms p50 latency, +{statistics.median(cpu_paired):.1f} ms CPU",
            "target": "(measured: the ceiling of issue 28's saving at concurrency 1)",
            "holds": "n/a",
        }
    ]
    append_report("Second query encode: its cost in one process (bench/second_encode.py)", "\n".join(lines), summary)


if __name__ == "__main__":
    main()
