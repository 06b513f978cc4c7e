"""The cross-encoder second stage: its speed on this machine and what each rerank depth buys.

    python bench/rerank.py [--model PATH_OR_ID] [--bundle DIR] [--interpolation W] [--runs 3]

1. Throughput: pairs/s of `Reranker.score` at max lengths 128 / 256 / 512 on real SciFact pairs (test claims
   with whole abstracts, so the longer limits are actually used), median of --runs after a warm-up.
2. Depth sweep on SciFact test (300 claims): the hybrid top-100 passages of each claim are scored once;
   reranking the first d of them (d = 10…100) is then exact for every d, because a pair's score does not
   depend on the other pairs. nDCG@10 / MRR@10 per depth (documents = best passage, as in the API) and the
   measured p50 latency of scoring d pairs for --latency-queries claims, plus the first stage's p50.
   Plot: docs/rerank_tradeoff.png.
3. SQuAD v1.1 dev articles 24–47 as retrieval (their paragraphs are the corpus, the 500 sampled questions of
   `sift eval qa` the queries, the gold paragraph the one relevant passage): MRR@10 of hybrid vs reranked.

Defaults come from configs/default.yaml (`reranker.model`, `reranker.interpolation`, `reranker.max_length`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SCIFACT, append_report, progress_iter, progress_range  # noqa: E402

SQUAD = ROOT.parent / "shared" / "data" / "squad" / "dev-v1.1.json"
DEPTHS = (10, 20, 30, 50, 75, 100)
# horizontal lines on the plot: the bar a shipped cross-encoder has to clear, and the training-free MaxSim
# reranker measured on the same bundle (docs/benchmarks.md, "Training-free MaxSim reranking")
REFERENCES = {"target: 0.725 and hybrid + 0.010": 0.725, "MaxSim, top 20, w=0.5 (0.732)": 0.7322}


def throughput(reranker, pairs: list[tuple[str, str]], runs: int) -> list[str]:  # noqa: ANN001
    """pairs/s at max lengths 128 / 256 / 512 (the same loaded model, re-truncated), then restored."""
    configured = reranker.model.max_seq_length
    lines = ["| max length | mean tokens per pair | pairs/s (median) | runs |", "|---:|---:|---:|---:|"]
    for max_length in (128, 256, 512):
        reranker.model.max_seq_length = max_length
        tokens = reranker.model.tokenizer(
            [q for q, _ in pairs], [p for _, p in pairs], truncation="longest_first", max_length=max_length
        )["input_ids"]
        reranker.score(pairs[:32])  # warm-up
        rates = []
        for _ in progress_range(runs, f"pairs/s at {max_length} tokens"):
            started = time.perf_counter()
            reranker.score(pairs)
            rates.append(len(pairs) / (time.perf_counter() - started))
        lines.append(
            f"| {max_length} | {np.mean([len(t) for t in tokens]):.0f} | {statistics.median(rates):.1f} | {runs} |"
        )
        print(lines[-1], flush=True)
    reranker.model.max_seq_length = configured
    return lines


def rerank_prefix(hits, scores: np.ndarray, depth: int, interpolation: float):  # noqa: ANN001, ANN201
    """What the pipeline returns when reranking the first `depth` hits (scores cover at least that many)."""
    from app.retrieval.reranker import apply_rerank

    head = hits[:depth]
    return apply_rerank(head, scores[: len(head)], interpolation) + hits[len(head) :]


def score_candidates(pipeline, reranker, queries: list[str], depth: int):  # noqa: ANN001, ANN201
    """Hybrid top-`depth` passages per query (as `Pipeline.coarse` ranks them) and their reranker scores."""
    options = pipeline.options(mode="hybrid", k=100, candidates=100, rerank=False)
    ranked, coarse_ms = [], []
    for query in progress_iter(queries, "first stage"):
        started = time.perf_counter()
        hits, _ = pipeline.coarse([query], options)
        coarse_ms.append((time.perf_counter() - started) * 1000)
        ranked.append(hits[0])
    scores = []
    for query, hits in progress_iter(list(zip(queries, ranked)), "rerank"):
        pairs, _ = pipeline.rerank_pairs([query], [hits[:depth]])
        scores.append(reranker.score(pairs))
    return ranked, scores, coarse_ms


def depth_latency(pipeline, reranker, queries: list[str], ranked, depth: int) -> float:  # noqa: ANN001
    """p50 ms to fetch and score the first `depth` candidates of each query."""
    times = []
    for query, hits in progress_iter(list(zip(queries, ranked)), f"latency at depth {depth}"):
        started = time.perf_counter()
        reranker.score(pipeline.rerank_pairs([query], [hits[:depth]])[0])
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def evaluate_depths(qids, qrels, ranked, scores, interpolation: float, depths=DEPTHS) -> dict[int, dict]:  # noqa: ANN001
    from app.eval.retrieval import document_run, evaluate

    out = {0: evaluate(qrels, document_run(qids, ranked))}
    for depth in depths:
        reranked = [rerank_prefix(h, s, depth, interpolation) for h, s in zip(ranked, scores)]
        out[depth] = evaluate(qrels, document_run(qids, reranked))
    return out


def plot(points: list[tuple[int, float, float]], hybrid: tuple[float, float], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    ax.plot([p[2] for p in points], [p[1] for p in points], marker="o", label="hybrid + cross-encoder")
    for depth, ndcg, latency in points:
        ax.annotate(f"d={depth}", (latency, ndcg), textcoords="offset points", xytext=(4, -12))
    ax.scatter([hybrid[1]], [hybrid[0]], color="gray", marker="s", label=f"hybrid, no rerank ({hybrid[0]:.3f})")
    for (label, value), style in zip(REFERENCES.items(), ("--", ":")):
        ax.axhline(value, linestyle=style, color="gray", label=label)
    ax.set_xlabel("p50 latency per query on this CPU (ms): first stage + reranking d passages")
    ax.set_ylabel("nDCG@10 (SciFact test)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def squad_mrr(reranker, interpolation: float, depth: int, index_dir: Path) -> list[str]:  # noqa: ANN001
    from app.eval.qa import load_squad, sample, squad_bundle
    from app.services import load_pipeline
    from app.settings import load_settings

    settings = load_settings(bundle=index_dir, reranker={"model": None})
    squad_bundle(SQUAD, index_dir, settings.index)
    pipeline = load_pipeline(settings)
    questions = sample(load_squad(SQUAD), 500)
    qids = [q.id for q in questions]
    qrels = {q.id: {q.paragraph_id: 1} for q in questions}
    ranked, scores, _ = score_candidates(pipeline, reranker, [q.question for q in questions], depth)
    results = evaluate_depths(qids, qrels, ranked, scores, interpolation, depths=(depth,))
    return [
        "| SQuAD articles 24–47 (500 questions) | nDCG@10 | MRR@10 | Recall@100 |",
        "|---|---:|---:|---:|",
        f"| hybrid | {results[0]['ndcg@10']:.4f} | {results[0]['mrr@10']:.4f} | {results[0]['recall@100']:.4f} |",
        f"| hybrid + rerank top {depth} | {results[depth]['ndcg@10']:.4f} | {results[depth]['mrr@10']:.4f} "
        f"| {results[depth]['recall@100']:.4f} |",
    ]


def main() -> None:
    from app.settings import load_settings

    defaults = load_settings().reranker
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=defaults.model, help="CrossEncoder path or hub id (default: configs)")
    parser.add_argument("--bundle", type=Path, default=ROOT / "var" / "eval" / "scifact", help="SciFact bundle")
    parser.add_argument("--interpolation", type=float, default=defaults.interpolation)
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="for the depth sweep")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency-queries", type=int, default=30)
    parser.add_argument("--squad-depth", type=int, default=20)
    parser.add_argument("--depths", type=int, nargs="*", default=list(DEPTHS), help="rerank depths to sweep")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "sweep", "squad"])
    args = parser.parse_args()
    from app.retrieval.maxsim import is_maxsim

    if not args.model or is_maxsim(args.model):
        parser.error("--model must name a CrossEncoder (configs/default.yaml has none)")

    from app.eval.retrieval import load_beir
    from app.retrieval.reranker import Reranker
    from app.services import load_pipeline

    dataset = load_beir(SCIFACT, "test")
    qids, claims = list(dataset.queries), list(dataset.queries.values())
    reranker = Reranker.load(args.model, max_length=args.max_length, device="cpu")
    body = [f"Model `{args.model}`, interpolation {args.interpolation} (final = w·z(CE) + (1−w)·z(RRF)).", ""]
    if "throughput" not in args.skip:
        abstracts = [json.loads(line) for line in open(SCIFACT / "corpus.jsonl", encoding="utf-8")]
        by_id = {str(a["_id"]): f"{a['title']} {a['text']}" for a in abstracts}
        pairs = [(claims[i], by_id[d]) for i, q in enumerate(qids[:64]) for d in list(dataset.qrels[q])[:1]]
        pairs += [(claims[i], by_id[str(abstracts[i]["_id"])]) for i in range(256 - len(pairs))]
        body += [
            "### Throughput (CPU, batch 32, 256 claim–abstract pairs)",
            "",
            *throughput(reranker, pairs, args.runs),
            "",
        ]
    if "sweep" not in args.skip:
        pipeline = load_pipeline(load_settings(bundle=args.bundle, reranker={"model": None}))
        depths = sorted(args.depths)
        ranked, scores, coarse_ms = score_candidates(pipeline, reranker, claims, max(depths))
        results = evaluate_depths(qids, dataset.qrels, ranked, scores, args.interpolation, depths)
        n = args.latency_queries
        latency = {d: depth_latency(pipeline, reranker, claims[:n], ranked[:n], d) for d in depths}
        first = statistics.median(coarse_ms)
        body += [
            f"### Rerank depth sweep, SciFact test (300 claims), max length {args.max_length}",
            "",
            f"Latency: p50 over the first {n} claims of fetching and scoring d passages, plus the first stage "
            f"(p50 {first:.1f} ms over all 300).",
            "",
            "| pipeline | nDCG@10 | MRR@10 | Recall@100 | p50 ms/query |",
            "|---|---:|---:|---:|---:|",
            f"| hybrid (no rerank) | {results[0]['ndcg@10']:.4f} | {results[0]['mrr@10']:.4f} "
            f"| {results[0]['recall@100']:.4f} | {first:.1f} |",
        ]
        for d in depths:
            r = results[d]
            body.append(
                f"| hybrid + rerank top {d} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | {r['recall@100']:.4f} "
                f"| {first + latency[d]:.1f} |"
            )
        alone = evaluate_depths(qids, dataset.qrels, ranked, scores, 1.0, depths)
        body += [
            "",
            f"Cross-encoder alone (interpolation 1.0), nDCG@10 at depth {' / '.join(map(str, depths))}: "
            + " / ".join(f"{alone[d]['ndcg@10']:.4f}" for d in depths),
            "",
        ]
        points = [(d, results[d]["ndcg@10"], first + latency[d]) for d in depths]
        plot(
            points,
            (results[0]["ndcg@10"], first),
            ROOT / "docs" / "rerank_tradeoff.png",
            f"SciFact test: rerank depth vs latency ({Path(args.model).name}, w={args.interpolation})",
        )
        body.append("![rerank tradeoff](rerank_tradeoff.png)")
        body.append("")
    if "squad" not in args.skip:
        index_dir = ROOT / "var" / "eval" / "squad-dev-a24-47"
        body += [
            "### SQuAD as retrieval",
            "",
            *squad_mrr(reranker, args.interpolation, args.squad_depth, index_dir),
            "",
        ]
    append_report("Cross-encoder reranking (bench/rerank.py)", "\n".join(body))


if __name__ == "__main__":
    main()
