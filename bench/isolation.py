"""Does generation starve search? `/v1/search` latency alone, then while 8 clients keep answers generating,
against real `sift serve` processes (loopback), for this checkout and for an earlier commit (`--baseline`,
default: the commit before generation got its own pool) in the same run.

Each phase sends `--searches` sequential hybrid searches (SciFact claims over the examples bundle); a
timed-out or failed search counts as an error and its time as the timeout. Figures are medians over
`--runs` runs of each phase's p50/p99. The acceptance line: p99 under generation ≤ 2× p99 alone.

    python bench/isolation.py --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, SCIFACT, append_report, progress, source_tree, start_server  # noqa: E402

BASELINE = "6daa8f0"  # main before this work: generation shared asyncio's default executor with retrieval
QUESTION = "Describe the Eiffel Tower: its history, construction, height and visitors."


def searches(base: str, queries: list[str], timeout: float) -> tuple[list[float], int]:
    latencies, errors = [], 0
    with httpx.Client(timeout=timeout) as client:
        for q in queries:
            t = time.perf_counter()
            try:
                ok = client.post(f"{base}/v1/search", json={"query": q, "k": 10}).status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t)
            errors += not ok
    return latencies, errors


class Generators:
    """`n` clients each sending non-streamed answers back to back until stopped."""

    def __init__(self, base: str, n: int, max_new_tokens: int) -> None:
        self.stop = threading.Event()
        self.answers = self.refused = self.failed = 0
        body = {"question": QUESTION, "generation": {"max_new_tokens": max_new_tokens}}
        self.threads = [threading.Thread(target=self._run, args=(base, body), daemon=True) for _ in range(n)]

    def _run(self, base: str, body: dict) -> None:
        with httpx.Client(timeout=300) as client:
            while not self.stop.is_set():
                try:
                    status = client.post(f"{base}/v1/answer", json=body).status_code
                except httpx.HTTPError:
                    status = 0
                if status == 200:
                    self.answers += 1
                elif status == 429:
                    self.refused += 1
                    time.sleep(0.2)
                else:
                    self.failed += 1

    def __enter__(self) -> Generators:
        for t in self.threads:
            t.start()
        time.sleep(3)  # let every client get its answer going
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)


def measure(code: Path, bundle: Path, extra: dict[str, str], queries: list[str], args, bar) -> dict:  # noqa: ANN001
    process, base = start_server(bundle, root=code, env={"SIFT_RERANKER__MODEL": "none", **extra})
    rows = {"alone": [], "generating": []}
    load = {"answers": 0, "refused": 0, "failed": 0, "errors": 0}
    try:
        searches(base, queries[:10], args.timeout)  # warm-up
        for _ in range(args.runs):
            latencies, errors = searches(base, queries, args.timeout)
            rows["alone"].append((np.percentile(latencies, 50), np.percentile(latencies, 99), errors))
            bar.update()
            with Generators(base, args.clients, args.max_new_tokens) as gen:
                latencies, errors = searches(base, queries, args.timeout)
            rows["generating"].append((np.percentile(latencies, 50), np.percentile(latencies, 99), errors))
            load["answers"] += gen.answers
            load["refused"] += gen.refused
            load["failed"] += gen.failed
            bar.update()
    finally:
        process.terminate()
        process.wait(timeout=60)
    out = {}
    for phase, values in rows.items():
        out[phase] = {
            "p50_ms": statistics.median(v[0] for v in values) * 1000,
            "p99_ms": statistics.median(v[1] for v in values) * 1000,
            "errors": sum(v[2] for v in values),
        }
    out["load"] = load
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--searches", type=int, default=60)
    parser.add_argument("--clients", type=int, default=8, help="concurrent answer clients")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=60.0, help="a search slower than this is an error")
    parser.add_argument("--baseline", default=BASELINE, help="commit measured for comparison ('' to skip)")
    parser.add_argument("--bundle", type=Path, default=ROOT / "var" / "index")
    args = parser.parse_args()

    queries = [json.loads(line)["text"] for line in open(SCIFACT / "queries.jsonl", encoding="utf-8")][: args.searches]
    versions: list[tuple[str, Path, dict[str, str]]] = [
        ("this checkout", ROOT, {"SIFT_SERVER__MAX_CONCURRENT_GENERATIONS": str(args.clients)})
    ]
    results = {}
    with contextlib.ExitStack() as stack:
        if args.baseline:
            versions.insert(0, (f"`{args.baseline}` (before)", stack.enter_context(source_tree(args.baseline)), {}))
        bar = progress(2 * args.runs * len(versions), "phases")
        for name, code, extra in versions:
            results[name] = measure(code, args.bundle, extra, queries, args, bar)
    lines = [
        f"{len(queries)} sequential hybrid `/v1/search` requests per phase, alone and while {args.clients} clients "
        f"send non-streamed `/v1/answer` requests back to back (local SmolLM2, max_new_tokens {args.max_new_tokens}); "
        f"medians of {args.runs} runs; a search over {args.timeout:.0f} s would count as an error.",
        "",
        "| server | search p50 alone (ms) | p99 alone (ms) | p50 while generating | p99 while generating | "
        "p99 ratio | search errors | answers done / refused (429) / failed |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        alone, busy, load = r["alone"], r["generating"], r["load"]
        lines.append(
            f"| {name} | {alone['p50_ms']:.0f} | {alone['p99_ms']:.0f} | {busy['p50_ms']:.0f} | {busy['p99_ms']:.0f} | "
            f"**{busy['p99_ms'] / alone['p99_ms']:.2f}×** | {alone['errors'] + busy['errors']} | "
            f"{load['answers']} / {load['refused']} / {load['failed']} |"
        )
    append_report("Generation isolation: search latency while answers generate", "\n".join(lines))


if __name__ == "__main__":
    main()
