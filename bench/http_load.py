"""End-to-end HTTP load against the real server: queries/s and p50/p99 latency at concurrency 1, 8 and 32,
with the error count (must be 0). An httpx async client is the load generator.

    python bench/http_load.py [--bundle DIR] [--requests 300] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SCIFACT, append_report, progress  # noqa: E402
from bench.search_latency import start_server  # noqa: E402


async def run_load(base: str, queries: list[str], concurrency: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[str] = asyncio.Queue()
    for q in queries:
        queue.put_nowait(q)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                q = queue.get_nowait()
                started = time.perf_counter()
                try:
                    r = await client.post(f"{base}/v1/search", json={"query": q, "k": 10, "return_text": False})
                    errors += r.status_code != 200
                except httpx.HTTPError:
                    errors += 1
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return len(queries) / wall, latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    bundle = args.bundle or next(iter(sorted((ROOT / ".cache").glob("scifact-*"))), ROOT / "var" / "index")
    queries = [json.loads(line)["text"] for line in open(SCIFACT / "queries.jsonl", encoding="utf-8")][: args.requests]
    process, base = start_server(bundle, None)
    rows = []
    try:
        asyncio.run(run_load(base, queries[:20], 4))  # warm-up
        bar = progress(3 * args.runs, "load runs")
        for concurrency in (1, 8, 32):
            qps_runs, p50s, p99s, errors = [], [], [], 0
            for _ in range(args.runs):
                qps, latencies, errs = asyncio.run(run_load(base, queries, concurrency))
                bar.update()
                qps_runs.append(qps)
                p50s.append(float(np.percentile(latencies, 50)))
                p99s.append(float(np.percentile(latencies, 99)))
                errors += errs
            rows.append(
                f"| {concurrency} | {len(queries)} × {args.runs} | {statistics.median(qps_runs):.1f} | "
                f"{statistics.median(p50s):.1f} | {statistics.median(p99s):.1f} | {errors} |"
            )
            print(rows[-1], flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    body = "\n".join(
        [
            f"`POST /v1/search`, hybrid (bm25 + dense, RRF), k=10, no rerank, bundle `{bundle.name}`, one uvicorn "
            "worker; load generator (httpx async) on the same 2-core machine. Medians over runs.",
            "",
            "| concurrency | requests | queries/s | p50 ms | p99 ms | errors |",
            "|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    append_report("End-to-end HTTP load (bench/http_load.py)", body)


if __name__ == "__main__":
    main()
