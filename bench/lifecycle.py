"""The live index lifecycle on SciFact, in one run:

1. an incremental update (`update_bundle`: add 1 % new documents, delete 1 %) against a full rebuild of the
   same final corpus (`build_bundle`), timed in the same process, and checked equal (passages, BM25 scores,
   dense scores within 1e-3);
2. peak server RSS while a real `sift serve` hot-reloads onto the updated build, against its steady state.

    python bench/lifecycle.py [--scifact ../shared/data/scifact] [--work var/bench/lifecycle]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, append_report  # noqa: E402


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def compare(a: Path, b: Path, queries: list[str], encoder) -> dict:  # noqa: ANN001
    """Max differences between two builds over the same passages: BM25 scores and dense query scores."""
    import faiss
    import numpy as np

    from indexer.bm25 import BM25Index
    from indexer.bundle import BM25_DIR, DENSE_DIR, DOCSTORE, open_bundle
    from indexer.config import IndexConfig
    from indexer.dense import INDEX_FILE
    from indexer.docstore import Docstore

    out = []
    for root in (a, b):
        info = open_bundle(root)
        store = Docstore(info.path(DOCSTORE))
        rows = store.passage_texts()
        bm25 = BM25Index.load(info.path(BM25_DIR), IndexConfig.model_validate(info.manifest["config"]).bm25)
        scores = np.stack([bm25.scores(q) for q in queries])
        vectors = faiss.read_index(str(info.path(DENSE_DIR) / INDEX_FILE)).reconstruct_n(0, len(rows))
        out.append(({r[0]: i for i, r in enumerate(rows)}, [(r[0], r[2]) for r in rows], scores, vectors))
        store.close()
    (ia, pa, sa, va), (ib, pb, sb, vb) = out
    same_passages = sorted(pa) == sorted(pb)
    order = [ib[pid] for pid in sorted(ia, key=ia.get)]
    q = encoder.encode(queries, normalize_embeddings=True)
    return {
        "same_passages": same_passages,
        "passages": len(pa),
        "bm25_max_abs_diff": float(np.abs(sa - sb[:, order]).max()),
        "dense_max_abs_diff": float(np.abs(q @ va.T - q @ vb[order].T).max()),
    }


def rss_during_reload(parent_out: Path, publish, seconds_after: float = 5.0) -> dict:  # noqa: ANN001
    """Start `sift serve` on `parent_out`, search until steady, run `publish()` and sample RSS every 50 ms
    until the server answers from the new build (plus `seconds_after`)."""
    import psutil
    from sift_client import SiftClient, SiftError

    from tests.servers import sift_server

    env = {
        "SIFT_BUNDLE": str(parent_out),
        "SIFT_GENERATOR__BACKEND": "none",
        "SIFT_RERANKER__MODEL": "none",
        "SIFT_SERVER__RELOAD_INTERVAL_S": "0.5",
    }
    with sift_server(env) as (base, process), SiftClient(base, timeout=30, max_retries=0) as sift:
        proc = psutil.Process(process.pid)
        queries = ["vitamin D and bone density", "statins reduce mortality", "gene expression in tumours"]
        for i in range(60):
            first = sift.search(queries[i % 3], k=10).bundle  # a failure raises: no retry hides one
        steady = max(proc.memory_info().rss for _ in range(20) if not time.sleep(0.05))
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(proc.memory_info().rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        new_id = publish()
        switched_after = None
        started = time.perf_counter()
        errors = 0
        while time.perf_counter() - started < 60:
            try:
                answered_by = sift.search(queries[0], k=10).bundle
            except SiftError:
                errors += 1
                continue
            if answered_by == new_id:
                switched_after = time.perf_counter() - started
                break
        time.sleep(seconds_after)
        stop.set()
        sampler.join()
        after = proc.memory_info().rss
        return {
            "first_build": first,
            "new_build": new_id,
            "switched_after_s": switched_after,
            "errors": errors,
            "steady_rss_mb": steady / 2**20,
            "peak_rss_mb": max(samples) / 2**20,
            "after_rss_mb": after / 2**20,
            "ratio": max(samples) / steady,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scifact", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "bench" / "lifecycle")
    parser.add_argument("--share", type=float, default=0.01, help="share of documents added and deleted")
    args = parser.parse_args()

    from indexer.build import build_bundle
    from indexer.encoders import load_encoder
    from indexer.update import update_bundle

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    docs = [json.loads(line) for line in (args.scifact / "corpus.jsonl").read_text().splitlines()]
    rng = random.Random(13)
    n = max(1, round(len(docs) * args.share))
    held = set(rng.sample(range(len(docs)), 2 * n))
    new_docs = [docs[i] for i in sorted(held)][:n]  # not in the parent: the update adds them
    deleted = [docs[i]["_id"] for i in sorted(held)][n:]  # in the parent: the update deletes them
    parent_docs = [d for i, d in enumerate(docs) if i not in held or docs[i]["_id"] in deleted]
    final_docs = [d for d in parent_docs if d["_id"] not in set(deleted)] + new_docs

    t = time.perf_counter()
    parent = build_bundle(write_jsonl(args.work / "parent.jsonl", parent_docs), args.work / "index", show_progress=True)
    parent_s = time.perf_counter() - t
    write_jsonl(args.work / "add.jsonl", new_docs)
    (args.work / "delete.txt").write_text("\n".join(deleted) + "\n")

    t = time.perf_counter()
    full = build_bundle(write_jsonl(args.work / "final.jsonl", final_docs), args.work / "full", show_progress=True)
    full_s = time.perf_counter() - t

    def publish_update() -> str:
        result = update_bundle(args.work / "index", args.work / "add.jsonl", args.work / "delete.txt")
        publish_update.seconds = result.seconds  # type: ignore[attr-defined]
        publish_update.timings = result.timings  # type: ignore[attr-defined]
        return result.build_id

    t = time.perf_counter()
    reload = rss_during_reload(args.work / "index", publish_update)
    update_s = publish_update.seconds  # type: ignore[attr-defined]
    encoder = load_encoder("sentence-transformers/all-MiniLM-L6-v2", "cpu")
    queries = [json.loads(line)["text"] for line in (args.scifact / "queries.jsonl").read_text().splitlines()][:50]
    check = compare(args.work / "index", args.work / "full", queries, encoder)
    body = f"""SciFact corpus ({len(docs)} abstracts). Parent build: {len(parent_docs)} documents ({parent.passages} passages,
{parent_s:.0f} s). The update adds {n} documents and deletes {n} ({args.share:.0%} each); the baseline is a full
build of the same final corpus ({full.documents} documents, {full.passages} passages), timed in the same run.
The update ran while a real `sift serve` was answering searches on the parent build (it hot-reloaded onto it).

| | seconds | speed-up |
|---|---:|---:|
| full rebuild of the final corpus | {full_s:.1f} | 1.0× |
| `update_bundle` (add {n}, delete {n}) | {update_s:.1f} | **{full_s / update_s:.1f}×** |

Update stages (s): {", ".join(f"{k} {v:.2f}" for k, v in publish_update.timings.items())}.

Update vs full build: same passages **{check["same_passages"]}** ({check["passages"]}); max |BM25 score difference|
{check["bm25_max_abs_diff"]:.2e} over 50 queries × all passages; max |dense score difference| {check["dense_max_abs_diff"]:.2e}
(stored float32 vectors reused; 1e-3 allowed).

Hot reload (server RSS sampled every 50 ms from before the publish until {5:.0f} s after the switch):

| steady RSS | peak RSS during reload | peak / steady | after | switched to the new build | failed searches |
|---:|---:|---:|---:|---:|---:|
| {reload["steady_rss_mb"]:.0f} MB | {reload["peak_rss_mb"]:.0f} MB | **{reload["ratio"]:.2f}×** | {reload["after_rss_mb"]:.0f} MB | {reload["switched_after_s"]:.1f} s after publish | {reload["errors"]} |
"""
    append_report("Index lifecycle: incremental update vs full rebuild, RSS during reload (bench/lifecycle.py)", body)


if __name__ == "__main__":
    main()
