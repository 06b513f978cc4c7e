"""Retrieval evaluation on BEIR-layout datasets: load queries and qrels, turn passage hits into a
document run (a document's score is its best passage's score), score it with ir-measures, write TREC runs.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ir_measures
from ir_measures import RR, R, nDCG

from app.retrieval.types import Hit

if TYPE_CHECKING:
    from app.pipeline import Pipeline, SearchOptions

DEFAULT_MEASURES = (nDCG @ 10, R @ 100, RR @ 10)
MEASURE_NAMES = {"nDCG@10": "ndcg@10", "R@100": "recall@100", "RR@10": "mrr@10"}


@dataclass(frozen=True)
class BeirDataset:
    """A BEIR folder: `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`."""

    root: Path
    split: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    @property
    def corpus(self) -> Path:
        return self.root / "corpus.jsonl"


def load_beir(root: Path, split: str = "test") -> BeirDataset:
    """Queries that have judgments in `qrels/<split>.tsv`, with those judgments."""
    root = Path(root)
    qrels_path = root / "qrels" / f"{split}.tsv"
    for needed in (root / "corpus.jsonl", root / "queries.jsonl", qrels_path):
        if not needed.exists():
            raise FileNotFoundError(
                f"{needed} missing; a BEIR folder has corpus.jsonl, queries.jsonl, qrels/{split}.tsv"
            )
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_path, encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t")
        for row in reader:
            if not row or row[0] == "query-id":
                continue
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    queries: dict[str, str] = {}
    with open(root / "queries.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if str(record["_id"]) in qrels:
                queries[str(record["_id"])] = record["text"]
    return BeirDataset(root, split, dict(sorted(queries.items(), key=lambda kv: _natural(kv[0]))), qrels)


def _natural(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 62, key)


def document_run(query_ids: Sequence[str], results: Sequence[Sequence[Hit]]) -> dict[str, dict[str, float]]:
    """qid → {doc_id: score}, scoring each document by its best-ranked passage, ranks preserved."""
    run: dict[str, dict[str, float]] = {}
    for qid, hits in zip(query_ids, results, strict=True):
        docs: dict[str, float] = {}
        for rank, hit in enumerate(hits):
            if hit.doc_id not in docs:
                # rank-derived: served scores fall with rank too (`stack_below`), but first-stage ties would let
                # trec_eval reorder tied documents by id; a rank keeps the pipeline's order exactly
                docs[hit.doc_id] = float(len(hits) - rank)
        run[qid] = docs
    return run


def evaluate(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], measures: Sequence[Any] = DEFAULT_MEASURES
) -> dict[str, float]:  # ir-measures' measures
    """Mean of each measure over the queries in `qrels` (missing queries score 0), via ir-measures."""
    full_run = {qid: run.get(qid, {}) for qid in qrels}
    scores = ir_measures.calc_aggregate(list(measures), qrels, full_run)
    return {MEASURE_NAMES.get(str(m), str(m)): float(scores[m]) for m in measures}


def write_trec_run(run: dict[str, dict[str, float]], path: Path, tag: str) -> None:
    """Standard TREC run file (qid Q0 docid rank score tag), checkable with trec_eval."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for qid, docs in run.items():
            ranked = sorted(docs.items(), key=lambda kv: -kv[1])
            for rank, (doc_id, score) in enumerate(ranked, start=1):
                handle.write(f"{qid} Q0 {doc_id} {rank} {score:.6f} {tag}\n")


# -- `sift eval retrieval` -------------------------------------------------------------------------------

# Single retrievers are judged on their own top 1,000 passages; hybrid uses the API default of 100 candidates
# per retriever. Every pipeline returns the top 100 documents (best passage each).
PIPELINES: dict[str, dict[str, object]] = {
    "bm25": {"mode": "bm25", "rerank": False, "candidates": 1000},
    "dense": {"mode": "dense", "rerank": False, "candidates": 1000},
    "hybrid": {"mode": "hybrid", "rerank": False, "candidates": 100},
    "hybrid+rerank": {"mode": "hybrid", "rerank": True, "candidates": 100},
}


@dataclass
class PipelineScores:
    """One row of the evaluation table."""

    name: str
    metrics: dict[str, float]
    latency_ms_p50: float
    latency_ms_p95: float
    queries: int


def run_pipelines(
    pipeline: Pipeline,
    dataset: BeirDataset,
    names: Sequence[str],
    k: int = 100,
    rerank_depth: int | None = None,
    specs: dict[str, dict[str, object]] | None = None,
    progress: bool = False,
) -> tuple[list[PipelineScores], dict[str, dict[str, dict[str, float]]]]:
    """Run each named pipeline (from `specs`, default `PIPELINES`) query by query through `Engine.search`
    (what the API calls), timing each query; returns (rows, runs) where runs[name] is the document run.
    `progress` shows a bar with ETA per pipeline."""
    import asyncio
    import time

    from app.engine import Engine

    engine = Engine(pipeline)

    import numpy as np
    from tqdm.auto import tqdm

    rows: list[PipelineScores] = []
    runs: dict[str, dict[str, dict[str, float]]] = {}
    qids, texts = list(dataset.queries), list(dataset.queries.values())

    async def evaluate_one(options: SearchOptions, name: str) -> tuple[list[float], list[list[Hit]]]:
        latencies, results = [], []
        for text in tqdm(texts, desc=name, unit="query", disable=not progress):
            started = time.perf_counter()
            result = await engine.search(text, options)
            latencies.append((time.perf_counter() - started) * 1000)
            results.append(result.hits)
        return latencies, results

    for name in names:
        spec = (specs or PIPELINES)[name]
        overrides = {"k": k, "collapse": True, **spec}
        if rerank_depth:
            overrides["rerank_depth"] = rerank_depth
        options = engine.options(**overrides)
        asyncio.run(engine.search(texts[0], options))  # warm-up
        latencies, results = asyncio.run(evaluate_one(options, name))
        runs[name] = document_run(qids, results)
        rows.append(
            PipelineScores(
                name,
                evaluate(dataset.qrels, runs[name]),
                float(np.percentile(latencies, 50)),
                float(np.percentile(latencies, 95)),
                len(qids),
            )
        )
    return rows, runs


def markdown_table(rows: Sequence[PipelineScores]) -> str:
    lines = [
        "| pipeline | nDCG@10 | Recall@100 | MRR@10 | p50 ms/query | p95 ms/query |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r.metrics
        lines.append(
            f"| {r.name} | {m['ndcg@10']:.4f} | {m['recall@100']:.4f} | {m['mrr@10']:.4f} "
            f"| {r.latency_ms_p50:.1f} | {r.latency_ms_p95:.1f} |"
        )
    return "\n".join(lines)
