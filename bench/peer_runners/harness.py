"""What every runner of `bench/peers.py` shares: read the job, build, search every query, time and report.

Standard library only: it is imported by runners that execute inside each peer's own virtual environment
(var/peers/venv-<peer>/), where neither Sift nor its dependencies are installed.

A runner calls `run(build, search)`:
- `build(documents, job) -> index`: documents are `{"id", "title", "text"}` dicts in corpus order; the
  returned object is whatever `search` needs; its wall time is the build time;
- `search(index, text, rerank_depth) -> [(doc_id, score), ...]`: best first, at most `job["k"]` hits; the
  fused first-stage top `rerank_depth` reranked by the cross-encoder (0: the first stage alone).

The job (a JSON file, first argument) names the corpus and queries files, the models' local paths, the first-stage
and rerank depths, the index folder and the result file. The result (JSON) holds the build's
seconds, the index folder's bytes and the process's peak RSS, and for each configuration of `job["configs"]`
(name → rerank depth): per query the ranked document ids (nDCG@10 and Recall@100 are computed by bench/peers.py
with ir-measures), the latencies at concurrency 1 (every query once, in order, after `warmup` queries),
queries/s at `concurrency` threads over the first `throughput_queries` queries, and the failed searches (an
exception is an error, never a result).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

Hits = list[tuple[str, float]]


def folder_bytes(path: str | Path) -> int:
    """Bytes of every regular file under `path` (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run(build: Callable[[list[dict[str, Any]], dict[str, Any]], Any], search: Callable[[Any, str, int], Hits]) -> None:
    job = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    documents = read_jsonl(job["corpus"])
    queries = read_jsonl(job["queries"])
    result: dict[str, Any] = {"peer": job["peer"], "dataset": job["dataset"], "documents": len(documents)}
    started = time.perf_counter()
    index = build(documents, job)
    result["build_s"] = time.perf_counter() - started
    result["build_peak_rss_mb"] = peak_rss_mb()
    result["index_bytes"] = folder_bytes(job["index_dir"])
    result["configs"] = {name: measure(index, search, queries, job, depth) for name, depth in job["configs"].items()}
    result["peak_rss_mb"] = peak_rss_mb()
    Path(job["result"]).write_text(json.dumps(result), encoding="utf-8")


def measure(
    index: Any, search: Callable[[Any, str, int], Hits], queries: list[dict[str, Any]], job: dict[str, Any], depth: int
) -> dict[str, Any]:
    """One configuration (`depth`: the rerank depth, 0 for the first stage alone): every query once at
    concurrency 1 (its hits and latency), then queries/s at `concurrency` threads."""
    errors: list[str] = []

    def one(text: str) -> tuple[Hits | None, float]:
        t = time.perf_counter()
        try:
            hits = search(index, text, depth)
        except Exception:  # a failed search is counted and reported, never scored as an empty result
            errors.append(traceback.format_exc(limit=3))
            return None, (time.perf_counter() - t) * 1000
        return hits, (time.perf_counter() - t) * 1000

    for query in queries[: job.get("warmup", 3)]:
        one(query["text"])
    errors.clear()
    runs: dict[str, list[str]] = {}
    latencies = []
    for query in queries:
        hits, ms = one(query["text"])
        latencies.append(ms)
        if hits is not None:
            runs[query["id"]] = [doc for doc, _ in hits[: job["k"]]]
    texts = [q["text"] for q in queries[: job.get("throughput_queries", 64)]]
    concurrency = int(job.get("concurrency", 8))
    with ThreadPoolExecutor(concurrency) as pool:
        t = time.perf_counter()
        outcomes = list(pool.map(one, texts))
        seconds = time.perf_counter() - t
    failed = sum(1 for hits, _ in outcomes if hits is None)
    out = {
        "rerank_depth": depth,
        "runs": runs,
        "latency_ms": {"p50": statistics.median(latencies), "p95": percentile(latencies, 95), "n": len(latencies)},
        "throughput": {
            "concurrency": concurrency,
            "queries": len(texts),
            "qps": (len(texts) - failed) / seconds if seconds > 0 else 0.0,
        },
        "errors": len(errors),
        "error_samples": errors[:3],
    }
    print(
        f"{job['peer']} {job['dataset']} depth {depth}: p50 {out['latency_ms']['p50']:.1f} ms, "
        f"{out['throughput']['qps']:.2f} q/s at {concurrency}, {len(errors)} errors",
        flush=True,
    )
    return out


def rerank_head(hits: Hits, head: Hits) -> Hits:
    """`head` (the reranked top, best first) followed by the rest of `hits` in first-stage order, each of the
    rest scored below the head's lowest so that one ranked list results (the depth-k reranking every pipeline
    here runs: the reranker sees the fused top `rerank_depth`, the first stage orders the tail)."""
    seen = {doc for doc, _ in head}
    floor = min((score for _, score in head), default=0.0)
    tail = [(doc, floor - 1.0 - i) for i, (doc, _) in enumerate(d for d in hits if d[0] not in seen)]
    return list(head) + tail
