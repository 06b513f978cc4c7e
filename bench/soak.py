"""Soak: `--minutes` (default 10) of mixed traffic at `--concurrency` (default 32) against a real `sift serve`
(loopback, examples bundle, local SmolLM2 generator): searches, batch searches, answers and chats. Counts
every response by status (a timed-out or failed request is an error, never a success) and samples the
server's RSS every 10 s. Acceptance: no 5xx, and RSS growth from minute 1 to the last minute ≤ 10 %.

    python bench/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, SCIFACT, append_report, progress, start_server  # noqa: E402

MIX = (("search", 0.6), ("batch", 0.15), ("answer", 0.15), ("chat", 0.10))


def request_for(kind: str, rng: random.Random, queries: list[str]) -> tuple[str, dict]:
    q = rng.choice(queries)
    if kind == "search":
        return "/v1/search", {"query": q, "k": rng.choice([5, 10, 20]), "mode": rng.choice(["hybrid", "bm25", "dense"])}
    if kind == "batch":
        return "/v1/search/batch", {"queries": rng.sample(queries, 8), "k": 5}
    if kind == "answer":
        return "/v1/answer", {"question": q, "stream": rng.random() < 0.5, "generation": {"max_new_tokens": 32}}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": q}], "max_tokens": 32}


async def worker(base: str, queries: list[str], deadline: float, counts: collections.Counter, seed: int) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX)
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            path, body = request_for(kind, rng, queries)
            try:
                async with client.stream("POST", f"{base}{path}", json=body) as response:
                    await response.aread()
                    status = response.status_code
                    if status == 200 and body.get("stream") and b"event: error" in response.content:
                        status = "stream-error"
            except httpx.HTTPError as exc:
                status = f"error:{type(exc).__name__}"
            counts[(kind, status)] += 1
            if status == 429:
                await asyncio.sleep(0.2)


async def soak(base: str, queries: list[str], args, pid: int) -> tuple[collections.Counter, list[tuple[float, int]]]:  # noqa: ANN001
    counts: collections.Counter = collections.Counter()
    started = time.monotonic()
    deadline = started + args.minutes * 60
    process = psutil.Process(pid)
    samples: list[tuple[float, int]] = []

    async def sampler() -> None:
        bar = progress(int(args.minutes * 6), "soak (10 s steps)")
        while time.monotonic() + 10 <= deadline + 1:
            await asyncio.sleep(10)
            samples.append((time.monotonic() - started, process.memory_info().rss))
            bar.update()

    tasks = [worker(base, queries, deadline, counts, i) for i in range(args.concurrency)]
    await asyncio.gather(sampler(), *tasks)
    return counts, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bundle", type=Path, default=ROOT / "var" / "index")
    args = parser.parse_args()
    queries = [json.loads(line)["text"] for line in open(SCIFACT / "queries.jsonl", encoding="utf-8")][:300]
    server, base = start_server(args.bundle)
    try:
        counts, samples = asyncio.run(soak(base, queries, args, server.pid))
    finally:
        server.terminate()
        server.wait(timeout=60)
    by_status: collections.Counter = collections.Counter()
    for (_, status), n in counts.items():
        by_status[status] += n
    server_errors = sum(n for s, n in by_status.items() if isinstance(s, int) and s >= 500)
    failures = sum(n for s, n in by_status.items() if not isinstance(s, int))
    first = next((rss for t, rss in samples if t >= 60), samples[0][1])  # minute 1 (or the first sample)
    last = samples[-1][1]
    growth = (last - first) / first * 100
    kinds = sorted({k for k, _ in counts})
    lines = [
        f"{args.minutes:g} minutes at concurrency {args.concurrency}, mix "
        + ", ".join(f"{k} {w:.0%}" for k, w in MIX)
        + " (answers half streamed; local SmolLM2, max 32 new tokens; server.max_concurrent_generations 4).",
        "",
        "| request | " + " | ".join(str(s) for s in sorted(by_status, key=str)) + " |",
        "|---|" + "---:|" * len(by_status),
    ]
    for kind in kinds:
        lines.append(
            f"| {kind} | " + " | ".join(str(counts.get((kind, s), 0)) for s in sorted(by_status, key=str)) + " |"
        )
    lines += [
        "",
        f"- 5xx responses: **{server_errors}**; transport errors or error events: **{failures}**",
        f"- server RSS at minute 1: {first / 2**20:.0f} MB; at the end: {last / 2**20:.0f} MB; growth **{growth:+.1f} %**",
        "- RSS every minute (MB): "
        + ", ".join(f"{rss / 2**20:.0f}" for t, rss in samples if abs(t % 60) < 10 or t == samples[-1][0]),
    ]
    append_report("Soak: mixed traffic against a real server", "\n".join(lines))


if __name__ == "__main__":
    main()
