"""Documents in over HTTP (issue 34): time to searchable, ingest throughput and search latency while ingesting,
against a full rebuild, on SciFact's corpus, in one run.

    python bench/ingest.py [--base-docs 2000] [--batch 1000] [--batch-runs 3] [--singles 10]
                           [--throughput-docs 1000] [--window-s 30] [--rounds 3] [--rate 5]

1. `sift index build` of the first --base-docs documents (the served index) and, for the comparison, of the
   first base + batch documents (what a full rebuild that adds a batch costs).
2. `sift serve` (the shipped configuration) on the base index:
   - time to searchable of one new document (`wait=true`, --singles times) and of a --batch-document batch
     (--batch-runs times, each a different slice of the corpus), from sending to the answer that says the
     change is served;
   - ingest throughput: --throughput-docs changed documents sent by 4 clients in batches of 100, from the first
     send until the last batch is searchable;
   - search latency (the default search, reranked, concurrency 1, SciFact test claims) over --window-s idle,
     then over --window-s while a writer sends --rate documents/s in 10-document batches (a rate the applier
     keeps up with: below the throughput measured before); --rounds rounds, each idle window after the previous
     round's backlog is applied; the p50 and p99 medians of rounds. Failed or timed-out requests fail the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SCIFACT, append_report, start_server  # noqa: E402

DOCS = "/v1/collections/default/documents"


def corpus() -> list[dict]:
    rows = [json.loads(line) for line in (SCIFACT / "corpus.jsonl").open(encoding="utf-8")]
    return [{"_id": str(r["_id"]), "title": r.get("title") or "", "text": r["text"]} for r in rows]


def claims() -> list[str]:
    test_ids = {line.split("\t")[0] for line in (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    rows = [json.loads(line) for line in (SCIFACT / "queries.jsonl").open(encoding="utf-8")]
    return [r["text"] for r in rows if str(r["_id"]) in test_ids]


def build(docs: list[dict], out: Path) -> float:
    """`sift index build` of `docs` into `out` with the shipped config; returns its wall time."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    started = time.perf_counter()
    cmd = [sys.executable, "-c", "from app.cli import main; main()", "index", "build", "--input", handle.name]
    subprocess.run([*cmd, "--out", str(out), "--no-progress"], cwd=ROOT, check=True, capture_output=True)
    Path(handle.name).unlink()
    return time.perf_counter() - started


def upsert(client: httpx.Client, docs: list[dict], wait: bool) -> tuple[float, dict]:
    started = time.perf_counter()
    response = client.post(f"{DOCS}?wait={'true' if wait else 'false'}", json=docs)
    elapsed = time.perf_counter() - started
    if response.status_code not in (200, 202) or (wait and response.json()["status"] != "searchable"):
        raise RuntimeError(f"upsert failed: {response.status_code} {response.text[:300]}")
    return elapsed, response.json()


def wait_searchable(client: httpx.Client, task: int, timeout_s: float = 1800) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(f"/v1/collections/default/tasks/{task}").json()["status"] != "searchable":
        if time.monotonic() > deadline:
            raise RuntimeError(f"task {task} not searchable in {timeout_s} s")
        time.sleep(0.1)


async def search_window(base: str, queries: list[str], seconds: float) -> tuple[list[float], int]:
    """Closed-loop default searches (concurrency 1) for `seconds`: latencies (ms) and failures."""
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                response = await client.post("/v1/search", json={"query": queries[i % len(queries)], "k": 10})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors += 1
            i += 1
    return latencies, errors


def steady_writer(base: str, docs: list[dict], rate: float, stop: threading.Event, sent: list[int]) -> None:
    """Upsert 10-document batches at `rate` documents/s until `stop`."""
    interval = 10 / rate
    with httpx.Client(base_url=base, timeout=120) as client:
        i = 0
        next_at = time.monotonic()
        while not stop.is_set():
            batch = [{**d, "text": d["text"] + f" (revision {i})"} for d in docs[(i * 10) % len(docs) :][:10]]
            upsert(client, batch, wait=False)
            sent[0] += len(batch)
            i += 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))


def drained(client: httpx.Client, timeout_s: float = 1800) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        ingest = client.get("/v1/collections").json()["collections"][0]["ingest"]
        if ingest["backlog_documents"] == 0 and ingest["served_seq"] == ingest["applied_seq"]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the backlog did not drain in {timeout_s} s: {ingest}")
        time.sleep(0.5)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-docs", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--batch-runs", type=int, default=3)
    parser.add_argument("--singles", type=int, default=10)
    parser.add_argument("--throughput-docs", type=int, default=1000)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=5.0, help="documents/s while searching (below throughput)")
    args = parser.parse_args()

    docs = corpus()
    need = args.base_docs + args.batch * args.batch_runs + args.singles
    if len(docs) < need:
        raise SystemExit(f"SciFact has {len(docs)} documents; these settings need {need}")
    base_docs, rest = docs[: args.base_docs], docs[args.base_docs :]
    batches = [rest[i * args.batch : (i + 1) * args.batch] for i in range(args.batch_runs)]
    singles = rest[args.batch * args.batch_runs :][: args.singles]
    queries = claims()
    work = Path(tempfile.mkdtemp(prefix="sift-bench-ingest-"))
    try:
        print(f"building {len(base_docs)} documents (the served index) ...", flush=True)
        base_build_s = build(base_docs, work / "base")
        print(f"building {len(base_docs) + args.batch} documents (a full rebuild with one batch more) ...", flush=True)
        rebuild_s = build(base_docs + batches[0], work / "rebuild")
        shutil.rmtree(work / "rebuild")
        process, base = start_server(work / "base")
        try:
            client = httpx.Client(base_url=base, timeout=1800)
            upsert(client, [{"_id": "warm-up", "text": "A first document warms the applier."}], wait=True)
            single_s = [upsert(client, [doc], wait=True)[0] for doc in singles]
            print(f"single documents: {[round(s, 2) for s in single_s]}", flush=True)
            batch_s = []
            for batch in batches:  # sent, then polled: a large batch may take longer than ingest.wait_timeout_s
                started = time.perf_counter()
                wait_searchable(client, upsert(client, batch, wait=False)[1]["task"])
                batch_s.append(time.perf_counter() - started)
            print(f"{args.batch}-document batches: {[round(s, 1) for s in batch_s]}", flush=True)

            # throughput: changed base documents from 4 clients, batches of 100
            changed = [{**d, "text": d["text"] + " (second edition)"} for d in base_docs[: args.throughput_docs]]
            chunks = [changed[i : i + 100] for i in range(0, len(changed), 100)]
            tasks: list[int] = []
            started = time.perf_counter()

            def send(part: list[list[dict]]) -> None:
                with httpx.Client(base_url=base, timeout=600) as own:
                    for chunk in part:
                        while True:
                            response = own.post(DOCS, json=chunk)
                            if response.status_code == 429:
                                time.sleep(float(response.headers.get("Retry-After", "1")))
                                continue
                            if response.status_code != 202:
                                raise RuntimeError(f"upsert failed: {response.status_code} {response.text[:300]}")
                            tasks.append(response.json()["task"])
                            break

            senders = [threading.Thread(target=send, args=(chunks[n::4],)) for n in range(4)]
            for thread in senders:
                thread.start()
            for thread in senders:
                thread.join()
            accepted_s = time.perf_counter() - started
            wait_searchable(client, max(tasks))
            throughput_s = time.perf_counter() - started
            print(
                f"throughput: {len(changed)} documents accepted in {accepted_s:.1f} s, searchable after {throughput_s:.1f} s",
                flush=True,
            )

            # search latency idle and while ingesting at a steady rate
            rounds = []
            for r in range(args.rounds):
                drained(client)  # idle means idle: no backlog left from the previous round
                idle, idle_errors = asyncio.run(search_window(base, queries, args.window_s))
                stop, sent = threading.Event(), [0]
                writer = threading.Thread(target=steady_writer, args=(base, base_docs, args.rate, stop, sent))
                writer.start()
                busy, busy_errors = asyncio.run(search_window(base, queries, args.window_s))
                stop.set()
                writer.join()
                if idle_errors or busy_errors:
                    raise RuntimeError(f"round {r}: {idle_errors} + {busy_errors} failed searches")
                rounds.append(
                    {
                        "idle_p50": pct(idle, 50),
                        "idle_p99": pct(idle, 99),
                        "busy_p50": pct(busy, 50),
                        "busy_p99": pct(busy, 99),
                        "searches": len(idle) + len(busy),
                        "written": sent[0],
                    }
                )
                print(f"round {r + 1}: {rounds[-1]}", flush=True)
            backlog = client.get("/v1/collections").json()["collections"][0]["ingest"]
        finally:
            process.terminate()
            process.wait(timeout=60)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    ratio = med["busy_p99"] / med["idle_p99"]
    single_p50, single_p95 = pct(single_s, 50), pct(single_s, 95)
    batch_p50, batch_p95 = pct(batch_s, 50), pct(batch_s, 95)
    body = f"""SciFact's corpus: the served index holds its first {args.base_docs:,} documents (built in {base_build_s:.0f} s);
the server runs the shipped configuration (`configs/default.yaml`: hybrid retrieval, the second stage, the ingest
applier with `apply_interval_s` 1.0). Time to searchable is from sending a request to the answer that says the
change is served (`wait=true` for one document; a batch is sent, then its task polled).

| what | p50 | p95 | runs | a full rebuild instead |
|---|---|---|---|---|
| one new document searchable | {single_p50:.2f} s | {single_p95:.2f} s | {len(single_s)} | {rebuild_s:.0f} s ({rebuild_s / single_p50:.0f}× longer) |
| a {args.batch:,}-document batch searchable | {batch_p50:.1f} s | {batch_p95:.1f} s | {len(batch_s)} | {rebuild_s:.0f} s ({rebuild_s / batch_p50:.1f}× longer) |

- a full rebuild: `sift index build` of the first {args.base_docs + args.batch:,} documents, {rebuild_s:.0f} s (what adding one batch costs without ingestion)
- ingest throughput: {len(changed):,} changed documents from 4 clients in batches of 100: accepted in {accepted_s:.1f} s, all searchable after {throughput_s:.1f} s: **{len(changed) / throughput_s:.1f} documents/s** end to end
- search latency, the default search at concurrency 1 ({args.rounds} rounds of {args.window_s:.0f} s each, medians of rounds): idle p50 {med["idle_p50"]:.0f} ms, p99 {med["idle_p99"]:.0f} ms; while ingesting {args.rate:.0f} documents/s: p50 {med["busy_p50"]:.0f} ms, p99 {med["busy_p99"]:.0f} ms (**{ratio:.2f}×** idle p99); 0 failed searches
- after the run: backlog {backlog["backlog_documents"]} documents, {backlog["applies"]["ok"]} applies, {backlog["applies"]["failed"]} failed
"""
    summary = [
        {
            "claim": "ingest: time to searchable, one document / a 1,000-document batch (p50) vs a full rebuild",
            "figure": f"{single_p50:.2f} s / {batch_p50:.1f} s vs {rebuild_s:.0f} s",
            "target": "seconds, not a rebuild",
            "holds": "yes" if batch_p50 < rebuild_s else "no",
        },
        {
            "claim": "ingest: search p99 while ingesting vs idle",
            "figure": f"{ratio:.2f}×",
            "target": "≤ 1.5×",
            "holds": "yes" if ratio <= 1.5 else "no",
        },
    ]
    append_report(
        "Documents in over HTTP: time to searchable, throughput, search while ingesting (bench/ingest.py)",
        body,
        summary,
    )


if __name__ == "__main__":
    main()
