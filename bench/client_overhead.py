"""What `sift-client` costs per search over plain httpx, against one real `sift serve`.

Each pair sends the same search twice, once through `SiftClient.search` (typed, validated results) and once as
`httpx.Client.post(...).json()` (a dict), in alternating order, over a kept-alive connection each; the overhead
is the per-pair difference, so server-side drift cancels. Reported per round (median over the round's pairs)
and as the median over rounds, for BM25 pages of k=10 (the service's default k) and k=50 with full texts.
A failed request fails the run. A second table times the client's own work without a network (building the
body, validating the answer) against `json.loads`, the floor of what a dict-returning caller pays.

    python bench/client_overhead.py [--bundle var/index] [--rounds 5] [--pairs 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sift_client import SiftClient  # noqa: E402
from sift_client.models import SearchResponse  # noqa: E402

from bench.common import ROOT, append_report, progress, start_server  # noqa: E402

QUERIES = [
    "how do stars form",
    "what causes earthquakes",
    "how do vaccines train the immune system",
    "who built the pyramids",
    "how does a compiler work",
    "why do we sleep",
    "how to make bread rise",
    "what is a black hole",
]
TARGET_MS = 0.5


def measure(base: str, k: int, rounds: int, pairs: int) -> dict[str, list[float]]:
    """Per round: p50 of the client's latency, of plain httpx's, and median of the paired differences (ms)."""
    out: dict[str, list[float]] = {"client": [], "httpx": [], "paired": []}
    options = {"k": k, "mode": "bm25", "rerank": False}
    with SiftClient(base, max_retries=0) as sift, httpx.Client(timeout=60) as plain:
        url = f"{base}/v1/search"
        for query in QUERIES:  # warm both connections and the server's caches
            sift.search(query, **options)
            plain.post(url, json={"query": query, **options}).raise_for_status()
        with progress(rounds * pairs, f"k={k}") as bar:
            for _ in range(rounds):
                client_ms, httpx_ms, diff = [], [], []
                for i in range(pairs):
                    query = QUERIES[i % len(QUERIES)]

                    def via_client(query: str = query) -> float:
                        started = time.perf_counter()
                        page = sift.search(query, **options)
                        elapsed = (time.perf_counter() - started) * 1000
                        assert page.hits, "no hits"
                        return elapsed

                    def via_httpx(query: str = query) -> float:
                        started = time.perf_counter()
                        response = plain.post(url, json={"query": query, **options})
                        response.raise_for_status()
                        body = response.json()
                        elapsed = (time.perf_counter() - started) * 1000
                        assert body["hits"], "no hits"
                        return elapsed

                    if i % 2:
                        a, b = via_client(), via_httpx()
                    else:
                        b, a = via_httpx(), via_client()
                    client_ms.append(a)
                    httpx_ms.append(b)
                    diff.append(a - b)
                    bar.update()
                out["client"].append(statistics.median(client_ms))
                out["httpx"].append(statistics.median(httpx_ms))
                out["paired"].append(statistics.median(diff))
    return out


def offline(base: str, k: int, repeats: int = 2000) -> tuple[float, float]:
    """Median µs of the client's own work on one real answer (body building + `model_validate_json`) and of
    `json.loads` on the same bytes."""
    raw = httpx.post(f"{base}/v1/search", json={"query": QUERIES[0], "k": k, "mode": "bm25", "rerank": False}).content
    typed, plain = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        body = {"query": QUERIES[0], "k": k, "mode": "bm25", "rerank": False}
        json.dumps(body)
        SearchResponse.model_validate_json(raw)
        typed.append((time.perf_counter() - started) * 1e6)
        started = time.perf_counter()
        json.dumps(body)
        json.loads(raw)
        plain.append((time.perf_counter() - started) * 1e6)
    return statistics.median(typed), statistics.median(plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "var" / "index")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=300)
    args = parser.parse_args()
    if not (args.bundle / "current").exists() and not (args.bundle / "manifest.json").exists():
        sys.exit(f"no index at {args.bundle}: run `make index` first (or pass --bundle)")
    process, base = start_server(args.bundle, env={"SIFT_GENERATOR__BACKEND": "none"})
    try:
        results = {k: measure(base, k, args.rounds, args.pairs) for k in (10, 50)}
        floors = {k: offline(base, k) for k in (10, 50)}
    finally:
        process.terminate()
        process.wait(timeout=30)
    rows = []
    for k, r in results.items():
        per_round = ", ".join(f"{d:+.3f}" for d in r["paired"])
        rows.append(
            f"| {k} | {statistics.median(r['httpx']):.3f} | {statistics.median(r['client']):.3f} | "
            f"**{statistics.median(r['paired']):+.3f}** | {per_round} |"
        )
    body = (
        f"One `sift serve` over `{args.bundle.name}` (BM25 pages with full passage texts, no rerank, so the server's "
        f"share is small and the client's shows); {args.rounds} rounds of {args.pairs} pairs per k, each pair the "
        "same search through `SiftClient.search` and through `httpx.Client.post(...).json()`, in alternating order, "
        "every request checked. Figures are milliseconds; each is the median over rounds of the round's median.\n\n"
        "| k | plain httpx p50 | sift-client p50 | overhead (paired p50) | overhead per round |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nThe client's own work on one real answer, without a network (median of 2000): building the body and "
        "validating the typed result vs `json.loads` of the same bytes.\n\n"
        "| k | sift-client (µs) | json.loads (µs) | difference (µs) |\n|---|---|---|---|\n"
        + "\n".join(f"| {k} | {t:.1f} | {p:.1f} | {t - p:+.1f} |" for k, (t, p) in floors.items())
    )
    overhead = statistics.median(results[10]["paired"])
    append_report(
        "Python client overhead over plain httpx (bench/client_overhead.py)",
        body,
        summary=[
            {
                "claim": "sift-client's latency overhead per search over plain httpx (p50, k=10)",
                "figure": f"{overhead:+.3f} ms",
                "target": f"≤ {TARGET_MS} ms",
                "holds": "yes" if overhead <= TARGET_MS else "no",
            }
        ],
    )


if __name__ == "__main__":
    main()
