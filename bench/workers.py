"""One server process vs several pre-forked workers (`server.workers`): memory and hybrid `/v1/search`
throughput, same run, same machine.

    python bench/workers.py [--bundle DIR] [--workers 2] [--concurrency 16] [--requests 300] [--runs 3]

Each server is a real `sift serve` with configs/default.yaml (so the generator and reader are loaded too),
the query-embedding cache off (the load repeats its queries). Memory is read after the load from
/proc/<pid>/smaps_rollup for the master and every worker: PSS (each shared page split between the processes
sharing it) summed over the process tree is the memory the server really costs; the summed RSS, which
counts shared pages once per process, is shown beside it.

CPU: during each run, the CPU seconds of the server's process tree and of the load generator (this process)
are divided by the wall time: the cores each used, and the server's CPU per query. Those bound what workers
can add on this machine: at the workers' own CPU per query, the cores left by the load generator serve at most
(cores − load generator's cores) ÷ (CPU per query) queries/s, reported as a multiple of one worker's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SCIFACT, append_report, cpu_seconds, process_tree, progress, start_server  # noqa: E402
from bench.http_load import run_load  # noqa: E402


def tree_memory(pid: int) -> dict[str, float]:
    """PSS, USS and RSS in MB, summed over the process and its children, and the process count."""
    processes = process_tree(pid)
    infos = [p.memory_full_info() for p in processes]
    mb = 1024 * 1024
    return {
        "processes": len(processes),
        "pss": sum(i.pss for i in infos) / mb,
        "uss": sum(i.uss for i in infos) / mb,
        "rss": sum(i.rss for i in infos) / mb,
    }


def measure(bundle: Path, workers: int, queries: list[str], concurrency: int, runs: int) -> dict:
    env = {"SIFT_SERVER__WORKERS": str(workers), "SIFT_RUNTIME__QUERY_CACHE_SIZE": "0"}
    process, base = start_server(bundle, None, env=env)
    try:
        asyncio.run(run_load(base, queries[:40], concurrency))  # warm-up: every worker encodes and searches
        qps, p50s, errors, server_cores, client_cores = [], [], 0, [], []
        bar = progress(runs, f"{workers} worker(s), c={concurrency}")
        for _ in range(runs):
            server, client = process_tree(process.pid), [psutil.Process()]  # the server: this process's child
            server0, client0, wall0 = cpu_seconds(server), cpu_seconds(client), time.perf_counter()
            rate, latencies, errs = asyncio.run(run_load(base, queries, concurrency))
            wall = time.perf_counter() - wall0
            server_cores.append((cpu_seconds(server) - server0) / wall)
            client_cores.append((cpu_seconds(client) - client0) / wall)
            qps.append(rate)
            p50s.append(statistics.median(latencies))
            errors += errs
            bar.update()
        bar.close()
        memory = tree_memory(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    row = {
        "workers": workers,
        "qps": statistics.median(qps),
        "p50": statistics.median(p50s),
        "errors": errors,
        "server_cores": statistics.median(server_cores),
        "client_cores": statistics.median(client_cores),
    }
    row["cpu_ms_per_query"] = row["server_cores"] / row["qps"] * 1000
    row.update(memory)
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "var" / "eval" / "scifact")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    queries = [json.loads(line)["text"] for line in open(SCIFACT / "queries.jsonl", encoding="utf-8")][: args.requests]
    one = measure(args.bundle, 1, queries, args.concurrency, args.runs)
    many = measure(args.bundle, args.workers, queries, args.concurrency, args.runs)
    memory_ratio = many["pss"] / one["pss"]
    speed_ratio = many["qps"] / one["qps"]
    lines = [
        f"`sift serve` with configs/default.yaml (generator and reader loaded), bundle `{args.bundle.name}`, query "
        f"cache off; hybrid `POST /v1/search` k=10 at concurrency {args.concurrency}, {len(queries)} SciFact claims "
        f"× {args.runs} runs, median; load generator on the same 2-core machine. Memory after the load, summed over "
        "the master and its workers (PSS splits shared pages between the processes sharing them; summed RSS "
        "counts them once per process).",
        "",
        "| server | processes | queries/s | p50 ms | errors | PSS MB | USS MB | summed RSS MB | server cores "
        "| load-generator cores | server CPU ms/query |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (one, many):
        label = "1 worker (uvicorn)" if r["workers"] == 1 else f"{r['workers']} workers (pre-forked)"
        lines.append(
            f"| {label} | {r['processes']} | {r['qps']:.1f} | {r['p50']:.1f} | {r['errors']} | {r['pss']:.0f} | "
            f"{r['uss']:.0f} | {r['rss']:.0f} | {r['server_cores']:.2f} | {r['client_cores']:.2f} "
            f"| {r['cpu_ms_per_query']:.1f} |"
        )
    cores = os.cpu_count() or 1
    bound = (cores - many["client_cores"]) / (many["cpu_ms_per_query"] / 1000)
    ceiling = bound / one["qps"]
    lines += [
        "",
        f"{args.workers} workers ÷ 1: memory (PSS) **{memory_ratio:.2f}×**, queries/s **{speed_ratio:.2f}×**.",
        "",
        f"Headroom on this {cores}-core machine: the {args.workers} workers used {many['server_cores']:.2f} cores "
        f"and the load generator {many['client_cores']:.2f}. At the workers' {many['cpu_ms_per_query']:.1f} ms of "
        f"CPU per query, all {cores} cores less the load generator's serve at most {bound:.0f} queries/s: "
        f"**{ceiling:.2f}×** one worker's.",
    ]
    errors = one["errors"] + many["errors"]
    summary = [
        {
            "claim": f"server memory (PSS), {args.workers} workers ÷ 1",
            "figure": f"{many['pss']:.0f} vs {one['pss']:.0f} MB ({memory_ratio:.2f}×)",
            "target": "≤ 1.3×",
            "holds": "yes" if memory_ratio <= 1.3 else "no",
        },
        {
            "claim": f"hybrid queries/s at c={args.concurrency}, {args.workers} workers ÷ 1",
            "figure": f"{many['qps']:.1f} vs {one['qps']:.1f} ({speed_ratio:.2f}×; ceiling on {cores} cores "
            f"{ceiling:.2f}×)",
            "target": "≥ 1.5×",
            "holds": "yes" if speed_ratio >= 1.5 and errors == 0 else "no",
        },
    ]
    append_report("Worker processes: memory and throughput (bench/workers.py)", "\n".join(lines), summary)


if __name__ == "__main__":
    main()
