"""FAISS index types compared: exact inner product vs HNSW vs IVF-PQ — build time, queries/s and Recall@10
against exact search — on SciFact passage vectors and on a synthetic set of the same dimension.

    python bench/dense_ann.py [--synthetic 1000000] [--runs 5]

SciFact vectors come from a built SciFact bundle (`.cache/scifact-*` from the tests, or --bundle), queried
with the 300 SciFact test claims encoded by the bundle's bi-encoder; the synthetic set is random unit vectors clustered around 1,000 centres (dimension 384), queries drawn likewise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SCIFACT, append_report, median_time  # noqa: E402


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    data = centres[rng.integers(0, 1000, n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    queries = centres[rng.integers(0, 1000, 1000)] + 0.7 * rng.standard_normal((1000, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return data, queries


def compare(name: str, vectors: np.ndarray, queries: np.ndarray, runs: int, hnsw_ef_construction: int) -> list[str]:
    import faiss

    from indexer.config import DenseSettings
    from indexer.dense import make_index

    rows = []
    exact = None
    for kind in ("flat", "hnsw", "ivfpq"):
        settings = DenseSettings(index_type=kind, hnsw_ef_construction=hnsw_ef_construction)
        build_runs = 1 if len(vectors) > 100_000 and kind != "flat" else runs
        builds = []
        for _ in range(build_runs):  # the median of exactly `build_runs` builds
            started = time.perf_counter()
            index = make_index(vectors, settings)
            builds.append(time.perf_counter() - started)
        build = statistics.median(builds)
        search_time, _ = median_time(lambda i=index: i.search(queries, 10), runs)
        _, ids = index.search(queries, 10)
        if kind == "flat":
            exact = ids
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
        size = faiss.serialize_index(index).nbytes
        raw = vectors.nbytes
        rows.append(
            f"| {name} | {kind} | {len(vectors):,} | {build:.2f} ({build_runs}) | {len(queries) / search_time:,.0f} | {recall:.3f} | {size / raw:.2f}× |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--hnsw-ef-construction", type=int, default=40)
    args = parser.parse_args()

    import faiss

    rows = []
    bundle = args.bundle or next(iter(sorted((ROOT / ".cache").glob("scifact-*"))), None)
    if bundle is not None:
        from indexer.bundle import open_bundle

        info = open_bundle(bundle, verify=False)
        flat = faiss.read_index(str(info.path("dense/index.faiss")))
        vectors = flat.reconstruct_n(0, flat.ntotal)
        # the real SciFact test claims, encoded as the server encodes queries (not perturbed stored vectors:
        # near-duplicates of indexed points make HNSW look better than it is)
        from app.eval.retrieval import load_beir
        from indexer.encoders import load_encoder

        claims = list(load_beir(SCIFACT, "test").queries.values())
        encoder = load_encoder(info.manifest["dense"]["model"], "cpu")
        queries = np.ascontiguousarray(encoder.encode(claims, normalize_embeddings=True), dtype=np.float32)
        rows += compare("SciFact passages, SciFact test claims", vectors, queries, args.runs, 200)
    data, queries = synthetic(args.synthetic, 384)
    rows += compare("synthetic", data, queries, args.runs, args.hnsw_ef_construction)
    body = "\n".join(
        [
            f"FAISS on this CPU (threads: {faiss.omp_get_max_threads()}); k=10; Recall@10 against the exact index; "
            f"HNSW M=32, efSearch=128, efConstruction 200 (SciFact) / {args.hnsw_ef_construction} (synthetic); "
            "IVF-PQ nlist≈4√n, 48 sub-quantisers × 8 bits, nprobe 16. Build time in s (number of runs, median); "
            f"queries/s median of {args.runs} batched runs. Size = serialised index / raw float32 vectors.",
            "",
            "| vectors | index | n | build s (runs) | queries/s | Recall@10 | size vs raw |",
            "|---|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    append_report("Dense index types (bench/dense_ann.py)", body)


if __name__ == "__main__":
    main()
