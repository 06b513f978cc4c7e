"""Search latency over HTTP against the real server, and micro-batched reranking against per-request
`CrossEncoder.predict`, measured in the same run.

    python bench/search_latency.py [--bundle DIR] [--requests 200] [--runs 5]

- Starts `sift serve` (uvicorn) twice on loopback: without and with a reranker (any CrossEncoder; by default
  a MiniLM-L6 cross-encoder with an untrained head is made locally — latency does not depend on its weights).
- Sends SciFact test claims (or example-corpus queries) at concurrency 1 and 16; reports p50/p95 end to end
  (client-side) and per stage (server-side `timings_ms`).
- In-process: 16 concurrent requests × 50 candidates reranked by `MicroBatcher` versus one
  `CrossEncoder.predict` call per request; pairs/s, median of --runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SCIFACT, append_report, progress, start_server  # noqa: E402


def make_cross_encoder(path: Path) -> Path:
    import torch
    from sentence_transformers import CrossEncoder

    from indexer.encoders import resolve_model_path

    torch.manual_seed(0)
    CrossEncoder(resolve_model_path("default"), num_labels=1, max_length=256, device="cpu").save(str(path))
    return path


async def load(
    base: str, queries: list[str], concurrency: int, body: dict
) -> tuple[list[float], list[dict], int, int, float]:
    """Send every query at `concurrency`; returns latencies, server timings of the good responses, errors, rerank
    timeouts and the wall time of the whole load. A non-200, a transport error, a client time-out or a 200 whose
    rerank was skipped for time (explain note `skipped (timeout)`) is an error, never a success."""
    latencies: list[float] = []
    timings: list[dict] = []
    errors = timeouts = 0
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(q: str) -> None:
            nonlocal errors, timeouts
            async with semaphore:
                started = time.perf_counter()
                try:
                    response = await client.post(f"{base}/v1/search", json={"query": q, **body})
                except httpx.HTTPError:
                    errors += 1
                    latencies.append((time.perf_counter() - started) * 1000)
                    return
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    errors += 1
                    return
                data = response.json()
                if any("timeout" in ((h["explain"].get("rerank") or {}).get("note") or "") for h in data["hits"]):
                    errors += 1
                    timeouts += 1
                    return
                timings.append(data["timings_ms"])

        started = time.perf_counter()
        await asyncio.gather(*(one(q) for q in queries))
        wall = time.perf_counter() - started
    return latencies, timings, errors, timeouts, wall


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else float("nan")


def rerank_throughput(reranker_dir: Path, texts: list[str], runs: int) -> tuple[float, float, int]:
    from app.retrieval.reranker import MicroBatcher, Reranker

    reranker = Reranker.load(str(reranker_dir), max_length=256, device="cpu", batch_size=64)
    requests = [
        [(f"claim number {r} about medicine", texts[(r * 50 + i) % len(texts)]) for i in range(50)] for r in range(16)
    ]
    n_pairs = sum(len(r) for r in requests)

    async def micro() -> None:
        batcher = MicroBatcher(reranker, max_batch_size=64, max_wait_ms=5)
        await asyncio.gather(*(batcher.score(r) for r in requests))
        await batcher.close()

    async def naive() -> None:
        async def one(pairs):
            return await asyncio.to_thread(reranker.model.predict, [list(p) for p in pairs], show_progress_bar=False)

        await asyncio.gather(*(one(r) for r in requests))

    micro_times, naive_times = [], []
    asyncio.run(micro())
    for _ in range(runs):  # interleaved, pair by pair
        t = time.perf_counter()
        asyncio.run(naive())
        naive_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        asyncio.run(micro())
        micro_times.append(time.perf_counter() - t)
    return n_pairs / statistics.median(micro_times), n_pairs / statistics.median(naive_times), n_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bundle", type=Path, default=None, help="bundle to serve (default: SciFact if built, else var/index)"
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rerank-requests", type=int, default=48)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only-rerank-throughput", action="store_true", help="skip the HTTP part")
    args = parser.parse_args()

    bundle = args.bundle or next((p for p in sorted((ROOT / ".cache").glob("scifact-*"))), ROOT / "var" / "index")
    if (SCIFACT / "queries.jsonl").exists():
        queries = [json.loads(line)["text"] for line in open(SCIFACT / "queries.jsonl", encoding="utf-8")]
    else:
        queries = ["how do stars form", "why does bread rise", "history of the internet"]
    with tempfile.TemporaryDirectory() as tmp:
        ce = make_cross_encoder(Path(tmp) / "ce")
        rows = []
        for rerank in () if args.only_rerank_throughput else (False, True):
            # no query cache: the concurrency-16 load repeats the concurrency-1 claims
            process, base = start_server(bundle, ce if rerank else None, env={"SIFT_RUNTIME__QUERY_CACHE_SIZE": "0"})
            try:
                n = args.rerank_requests if rerank else args.requests
                body = {"k": 10, "mode": "hybrid", "rerank": rerank, "rerank_depth": 50 if rerank else None}
                body = {k: v for k, v in body.items() if v is not None}
                asyncio.run(load(base, queries[:8], 4, body))  # warm-up
                bar = progress(2, f"load (rerank={rerank})")
                for concurrency in (1, 16):
                    latencies, timings, errors, timeouts, wall = asyncio.run(load(base, queries[:n], concurrency, body))
                    bar.update()
                    stages = {
                        s: [t[s] for t in timings if s in t]
                        for s in ("bm25", "dense", "fusion", "rerank", "fetch", "total")
                    }
                    rows.append((rerank, concurrency, n, latencies, stages, errors, timeouts, wall))
            finally:
                process.terminate()
                process.wait(timeout=30)
        texts = []
        if (SCIFACT / "corpus.jsonl").exists():
            texts = [json.loads(line)["text"] for line in open(SCIFACT / "corpus.jsonl", encoding="utf-8")][:800]
        else:
            texts = [json.loads(line)["text"] for line in open(ROOT / "examples" / "corpus.jsonl", encoding="utf-8")]
        micro, naive, n_pairs = rerank_throughput(ce, texts, args.runs)

    lines = (
        []
        if args.only_rerank_throughput
        else [
            f"Bundle: `{bundle.name}`; hybrid, k=10, candidates 100; rerank depth 50 with a MiniLM-L6 cross-encoder "
            "(max length 256). Latency in ms; end to end measured by the client, stages by the server.",
            "",
            "Errors count non-200s, transport errors and time-outs, and 200s whose rerank was skipped for time "
            "(of which: the timeouts column); stage latencies cover good responses only; req/s = good responses ÷ "
            "the measured wall time of the whole load.",
            "",
            "| rerank | concurrency | requests | errors | rerank timeouts | end-to-end p50 | p95 | bm25 p50 "
            "| dense p50 | fusion p50 | rerank p50 | rerank p95 | good req/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    )
    for rerank, concurrency, n, latencies, stages, errors, timeouts, wall in rows:
        lines.append(
            f"| {'on' if rerank else 'off'} | {concurrency} | {n} | {errors} | {timeouts} | {pct(latencies, 50):.1f} "
            f"| {pct(latencies, 95):.1f} | {pct(stages['bm25'], 50):.1f} | {pct(stages['dense'], 50):.1f} "
            f"| {pct(stages['fusion'], 50):.2f} | {pct(stages['rerank'], 50):.1f} | {pct(stages['rerank'], 95):.1f} "
            f"| {(n - errors) / wall:.1f} |"
        )
    if not rows:
        lines = []
    lines += [
        "",
        f"Reranking throughput, 16 concurrent requests × 50 candidates ({n_pairs} pairs), median of {args.runs}:",
        "",
        "| strategy | pairs/s |",
        "|---|---:|",
        f"| `MicroBatcher` (pooled, length-sorted batches of 64) | {micro:.1f} |",
        f"| `CrossEncoder.predict` once per request | {naive:.1f} |",
        f"| ratio | {micro / naive:.2f}× |",
    ]
    append_report("Search latency and reranking throughput (bench/search_latency.py)", "\n".join(lines))


if __name__ == "__main__":
    main()
