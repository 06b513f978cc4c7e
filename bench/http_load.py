"""End-to-end HTTP load against the real server: queries/s and p50/p99 latency at concurrency 1, 8 and 32,
with the error count (must be 0). An httpx async client is the load generator.

    python bench/http_load.py [--bundle DIR] [--requests 300] [--runs 5] [--baseline-rev REV] [--env K=V ...]
                              [--variant 'LABEL:K=V,K=V' ...]

With --baseline-rev, the same load first runs against a server started from that commit's source
(`bench.common.source_tree`: same Python environment, its own default configuration), then
against this tree's server with --env overrides: before and after in one run, on one machine. The after
server runs with the query-embedding cache off unless --cache: the load repeats its queries across runs, so a
cache would turn later runs into lookups.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SCIFACT, append_report, progress, source_tree, start_server  # noqa: E402

SEARCH = {"k": 10, "rerank": False, "return_text": False}  # the load's default request (first stage only)


async def post_load(
    url: str, bodies: list[dict[str, Any]], concurrency: int, timeout: float = 120
) -> tuple[float, list[tuple[float, bool]]]:
    """`bodies` POSTed to `url` by `concurrency` clients (one connection each); returns (wall seconds, each
    request's (latency ms, answered 200)): a timeout or connection error is a request that failed."""
    outcomes: list[tuple[float, bool]] = []
    queue = list(reversed(bodies))
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                started = time.perf_counter()
                try:
                    ok = (await client.post(url, json=body)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                outcomes.append(((time.perf_counter() - started) * 1000, ok))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return wall, outcomes


async def run_load(
    base: str, queries: list[str], concurrency: int, body: dict | None = None
) -> tuple[float, list[float], int]:
    """`queries` sent to /v1/search by `concurrency` clients (`body` around each, default `SEARCH`); returns
    (requests per second, latencies in ms, failed or timed-out requests)."""
    wall, outcomes = await post_load(
        f"{base}/v1/search", [{**(body or SEARCH), "query": q} for q in queries], concurrency
    )
    return len(queries) / wall, [ms for ms, _ in outcomes], sum(not ok for _, ok in outcomes)


def measure(base: str, queries: list[str], runs: int, label: str) -> list[dict]:
    asyncio.run(run_load(base, queries[:20], 4))  # warm-up
    out = []
    bar = progress(3 * runs, f"load runs ({label})")
    for concurrency in (1, 8, 32):
        qps_runs, p50s, p99s, errors = [], [], [], 0
        for _ in range(runs):
            qps, latencies, errs = asyncio.run(run_load(base, queries, concurrency))
            bar.update()
            qps_runs.append(qps)
            p50s.append(float(np.percentile(latencies, 50)))
            p99s.append(float(np.percentile(latencies, 99)))
            errors += errs
        out.append(
            {
                "label": label,
                "concurrency": concurrency,
                "qps": statistics.median(qps_runs),
                "p50": statistics.median(p50s),
                "p99": statistics.median(p99s),
                "errors": errors,
            }
        )
        print(out[-1], flush=True)
    bar.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline-rev", default=None, help="commit whose server is measured first (before)")
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE settings for this tree's server (after)")
    parser.add_argument("--cache", action="store_true", help="keep the query-embedding cache on (after)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:K=V,K=V",
        help="also measure this tree's server with these settings on top of --env (repeatable), e.g. "
        "'2 workers:SIFT_SERVER__WORKERS=2'",
    )
    args = parser.parse_args()
    default_bundle = ROOT / "var" / "eval" / "scifact"
    bundle = args.bundle or (
        default_bundle
        if default_bundle.exists()
        else next(iter(sorted((ROOT / ".cache").glob("scifact-*"))), ROOT / "var" / "index")
    )
    queries = [json.loads(line)["text"] for line in open(SCIFACT / "queries.jsonl", encoding="utf-8")][: args.requests]
    env = dict(item.split("=", 1) for item in args.env)
    if not args.cache:
        env.setdefault("SIFT_RUNTIME__QUERY_CACHE_SIZE", "0")
    results = []
    if args.baseline_rev:
        with source_tree(args.baseline_rev) as tree:
            process, base = start_server(bundle, None, root=tree)
            try:
                results += measure(base, queries, args.runs, f"before ({args.baseline_rev})")
            finally:
                process.terminate()
                process.wait(timeout=30)
    variants = [("after" if args.baseline_rev else "this tree", {})]
    for spec in args.variant:
        label, _, pairs = spec.partition(":")
        variants.append(
            (f"after, {label}" if args.baseline_rev else label, dict(p.split("=", 1) for p in pairs.split(",") if p))
        )
    for label, extra in variants:
        process, base = start_server(bundle, None, env={**env, **extra})
        try:
            results += measure(base, queries, args.runs, label)
        finally:
            process.terminate()
            process.wait(timeout=60)
    settings = ", ".join(f"`{k}={v}`" for k, v in env.items()) or "none"
    lines = [
        f"`POST /v1/search`, hybrid (bm25 + dense, RRF), k=10, no rerank, bundle `{bundle.name}`, one uvicorn "
        f"worker unless a variant says otherwise; load generator (httpx async) on the same 2-core machine; {len(queries)} SciFact claims × "
        f"{args.runs} runs per concurrency, medians over runs. Settings of this tree's server: {settings}.",
        "",
        "| server | concurrency | queries/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['label']} | {r['concurrency']} | {r['qps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} |"
        for r in results
    ]
    if variants[1:]:
        lines += [
            "",
            "Variants (this tree's server, settings on top of the above): "
            + "; ".join(
                f"{label}: " + ", ".join(f"`{k}={v}`" for k, v in extra.items()) for label, extra in variants[1:]
            )
            + ".",
        ]
    summary = []
    before = {r["concurrency"]: r for r in results if r["label"].startswith("before")}
    for label, _ in variants:
        after = {r["concurrency"]: r for r in results if r["label"] == label}
        errors = any(r["errors"] for r in results if r["label"] == label or r["label"].startswith("before"))
        if before:
            ratio = after[8]["qps"] / before[8]["qps"]
            lines += ["", f"Queries/s at concurrency 8, {label} ÷ before: **{ratio:.2f}×**."]
            summary.append(
                {
                    "claim": f"hybrid /v1/search queries/s at c=8 vs {args.baseline_rev} (same run), {label}",
                    "figure": f"{after[8]['qps']:.1f} vs {before[8]['qps']:.1f} ({ratio:.2f}×)",
                    "target": "≥ 3×",
                    "holds": "yes" if ratio >= 3 and not errors else "no",
                }
            )
        summary.append(
            {
                "claim": f"hybrid /v1/search p50 at c=1, {label}",
                "figure": f"{after[1]['p50']:.1f} ms",
                "target": "≤ 8 ms",
                "holds": "yes" if after[1]["p50"] <= 8 else "no",
            }
        )
    append_report("End-to-end HTTP load (bench/http_load.py)", "\n".join(lines), summary)


if __name__ == "__main__":
    main()
