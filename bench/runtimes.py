"""Model runtimes (torch fp32, torch bf16, ONNX Runtime fp32, ONNX Runtime dynamic int8): speed and SciFact
quality, one run.

    python bench/runtimes.py [--bundle var/eval/scifact] [--runs 3] [--skip quality]

1. Throughput, median of --runs after a warm-up, every runtime in this process:
   - bi-encoder passages/s: 512 SciFact abstracts (title + text) at batch 32, as a build encodes them;
   - one query at a time: p50 ms over the 300 SciFact test claims;
   - cross-encoder pairs/s: 256 claim–abstract pairs at max length 128 (the shipped reranker's setting).
2. Quality, every runtime, on SciFact train (809 claims: where defaults are chosen) and test (300 claims:
   reported, never used to choose):
   - passages *and* queries encoded with it (the whole corpus re-encoded: its wall time gives corpus passages/s);
   - queries only (passages as built by torch), dense and hybrid nDCG@10;
   - hybrid top 20 reranked by the cross-encoder under each runtime (interpolation 0.5), nDCG@10 (the first
     --rerank-claims claims of each split: 300, i.e. all of test).
Writes a section to docs/benchmarks.md and docs/runtimes.png.
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

RUNTIMES = ("torch", "torch-bf16", "onnx", "onnx-int8")
RERANKER = "models/sift-reranker-minilm-l6"


def rate(fn, n: int, runs: int, desc: str) -> float:  # noqa: ANN001
    """Median items/s of `runs` calls of `fn` (which handles `n` items) after one warm-up call."""
    fn()
    rates = []
    for _ in progress_range(runs, desc):
        started = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - started))
    return statistics.median(rates)


def query_p50(encoder, claims: list[str]) -> float:  # noqa: ANN001
    """p50 ms to encode one claim the way the server does (`DirectEncoder` on ONNX runtimes, else the
    wrapper)."""
    from app.retrieval.queries import DirectEncoder

    direct = DirectEncoder.of(encoder)
    encode = direct.encode if direct is not None else (lambda texts: encoder.encode(texts, normalize_embeddings=True))
    for claim in claims[:10]:
        encode([claim])
    times = []
    for claim in claims:
        started = time.perf_counter()
        encode([claim])
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def runtime_plot(speed: dict, rows: dict, reranked: dict, out: Path) -> None:
    """docs/runtimes.png: speed-up over torch (passages, pairs) and SciFact test nDCG@10 drift per runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(speed)
    x = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for offset, key, label in ((-0.2, "passages", "passages/s"), (0.2, "pairs", "cross-encoder pairs/s")):
        left.bar(x + offset, [speed[n][key] / speed["torch"][key] for n in names], 0.4, label=label)
    left.axhline(1.5, linestyle="--", color="gray", label="1.5× target")
    left.set_xticks(x, names)
    left.set_ylabel("× torch float32")
    left.set_title("Throughput on this CPU")
    left.legend(loc="upper left", fontsize=8)
    drifts = {
        "hybrid": [rows[n]["test", "hybrid"] - rows["torch"]["test", "hybrid"] for n in names],
        "dense": [rows[n]["test", "dense"] - rows["torch"]["test", "dense"] for n in names],
        "reranked": [reranked["test", n] - reranked["test", "torch"] for n in names],
    }
    for offset, (label, values) in zip((-0.27, 0, 0.27), drifts.items()):
        right.bar(x + offset, values, 0.27, label=label)
    for bound in (-0.003, 0.003):
        right.axhline(bound, linestyle="--", color="gray")
    right.set_xticks(x, names)
    right.set_ylabel("Δ nDCG@10 vs torch (SciFact test)")
    right.set_title("Quality drift (dashed: ±0.003)")
    right.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def dense_pipeline(base, encoder, vectors: np.ndarray):  # noqa: ANN001, ANN201
    """`base` (BM25 + docstore of the bundle) with a dense searcher over `vectors` encoded by `encoder`."""
    import faiss

    from app.pipeline import Pipeline
    from app.retrieval.dense import DenseSearcher
    from app.retrieval.queries import QueryEncoder

    old = base.searchers["dense"]
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    queries = QueryEncoder(encoder, old.settings.model, old.settings.normalize)
    dense = DenseSearcher(queries, index, old.settings, old.passage_ids, old.doc_ids)
    return Pipeline(base.bundle, base.docstore, {**base.searchers, "dense": dense}, None, base.settings)


def ndcg(pipeline, qids: list[str], claims: list[str], qrels, mode: str) -> tuple[float, list]:  # noqa: ANN001
    from app.eval.retrieval import document_run, evaluate

    options = pipeline.options(mode=mode, k=100, candidates=100, rerank=False)
    ranked = []
    for start in range(0, len(claims), 50):
        hits, _ = pipeline.coarse(claims[start : start + 50], options)
        ranked.extend(hits)
    return evaluate(qrels, document_run(qids, ranked))["ndcg@10"], ranked


def rerank_rows(base, rerankers: dict, splits: dict, claims_per_split: int) -> dict[tuple[str, str], float]:  # noqa: ANN001
    """nDCG@10 of the bundle's hybrid top 20 reranked by each runtime's cross-encoder (interpolation 0.5), over
    the first `claims_per_split` claims of each split; the qrels are cut to those claims, so the mean is over
    the claims actually reranked."""
    from app.eval.retrieval import document_run, evaluate
    from bench.rerank import rerank_prefix

    out: dict[tuple[str, str], float] = {}
    for split, data in splits.items():
        q_ids = list(data.queries)[:claims_per_split]
        texts = [data.queries[q] for q in q_ids]
        qrels = {q: data.qrels[q] for q in q_ids}
        _, ranked = ndcg(base, q_ids, texts, qrels, "hybrid")
        for rt, reranker in rerankers.items():
            reranked = []
            for claim, hits in progress_iter(list(zip(texts, ranked)), f"rerank {split} {rt}"):
                pairs, _ = base.rerank_pairs([claim], [hits[:20]])
                reranked.append(rerank_prefix(hits, reranker.score(pairs), 20, 0.5))
            out[split, rt] = evaluate(qrels, document_run(q_ids, reranked))["ndcg@10"]
            print(split, rt, out[split, rt], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "var" / "eval" / "scifact", help="SciFact bundle")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "quality"])
    parser.add_argument(
        "--only-rerank", action="store_true", help="only the reranked nDCG@10 rows (the bundle's own torch vectors)"
    )
    parser.add_argument("--rerank-claims", type=int, default=300, help="claims per split in the rerank rows")
    parser.add_argument("--cache-dir", default=None, help="ONNX export cache (default: ~/.cache/sift/runtimes)")
    args = parser.parse_args()

    from app.eval.retrieval import load_beir
    from app.retrieval.reranker import Reranker
    from app.services import load_pipeline
    from app.settings import load_settings, project_path
    from indexer.encoders import encode_passages, load_encoder
    from indexer.runtime import cpu_isa

    dataset = load_beir(SCIFACT, "test")
    qids, claims = list(dataset.queries), list(dataset.queries.values())
    abstracts = [json.loads(line) for line in open(SCIFACT / "corpus.jsonl", encoding="utf-8")]
    texts = [f"{a['title']} {a['text']}" for a in abstracts[:512]]
    reranker_path = str(project_path(RERANKER))
    encoders = (
        {}
        if args.only_rerank
        else {rt: load_encoder("default", "cpu", rt, cache_dir=args.cache_dir) for rt in RUNTIMES}
    )
    rerankers = {rt: Reranker.load(reranker_path, 128, "cpu", runtime=rt, cache_dir=args.cache_dir) for rt in RUNTIMES}
    by_id = {str(a["_id"]): f"{a['title']} {a['text']}" for a in abstracts}
    pairs = [(claims[i], by_id[d]) for i, q in enumerate(qids[:64]) for d in list(dataset.qrels[q])[:1]]
    pairs += [(claims[i], by_id[str(abstracts[i]["_id"])]) for i in range(256 - len(pairs))]

    body = [
        f"CPU instruction set used for int8: `{cpu_isa()}`. Bi-encoder all-MiniLM-L6-v2; cross-encoder "
        f"`{RERANKER}` (max length 128). Every runtime is loaded in this one process and verified against "
        "torch at load (agreement column: mean cosine of pooled vectors, or centred cosine of scores).",
        "",
    ]
    speed: dict[str, dict[str, float]] = {}
    if args.only_rerank:
        base = load_pipeline(load_settings(bundle=args.bundle, reranker={"model": None}))
        splits = {split: load_beir(SCIFACT, split) for split in ("train", "test")}
        scores = rerank_rows(base, rerankers, splits, args.rerank_claims)
        body += [
            f"Hybrid top 20 (torch) reranked by `{RERANKER}` under each runtime, interpolation 0.5; the first "
            f"{args.rerank_claims} claims of each split (train: where defaults are chosen; test: reported only).",
            "",
            "| runtime | train nDCG@10 | Δ vs torch | test nDCG@10 | Δ vs torch |",
            "|---|---:|---:|---:|---:|",
        ]
        for rt in RUNTIMES:
            body.append(
                f"| {rt} | {scores['train', rt]:.4f} | {scores['train', rt] - scores['train', 'torch']:+.4f} "
                f"| {scores['test', rt]:.4f} | {scores['test', rt] - scores['test', 'torch']:+.4f} |"
            )
        summary = [
            {
                "claim": f"reranked SciFact test nDCG@10, {rt} vs torch (train Δ where chosen)",
                "figure": f"{scores['test', rt]:.4f} vs {scores['test', 'torch']:.4f} "
                f"(train Δ {scores['train', rt] - scores['train', 'torch']:+.4f})",
                "target": "within 0.003",
                "holds": "yes" if abs(scores["test", rt] - scores["test", "torch"]) <= 0.003 else "no",
            }
            for rt in RUNTIMES[1:]
        ]
        append_report("Model runtimes: reranked nDCG@10 per cross-encoder runtime", "\n".join(body), summary)
        return
    if "throughput" not in args.skip:
        settings = load_settings().index.dense
        for rt in RUNTIMES:
            enc, ce = encoders[rt], rerankers[rt]
            speed[rt] = {
                "passages": rate(
                    lambda e=enc: encode_passages(e, texts, settings), len(texts), args.runs, f"{rt} passages"
                ),
                "query_ms": query_p50(enc, claims),
                "pairs": rate(lambda c=ce: c.score(pairs), len(pairs), args.runs, f"{rt} pairs"),
            }
            print(rt, speed[rt], flush=True)
        base = speed["torch"]
        body += [
            f"### Throughput (median of {args.runs} after a warm-up; 512 abstracts at batch 32, 300 single "
            "claims, 256 pairs at 128 tokens)",
            "",
            "| runtime | agreement (bi / cross) | passages/s | × torch | one query p50 ms | pairs/s | × torch |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for rt in RUNTIMES:
            s = speed[rt]
            agree = [getattr(m[0].model, "agreement", 1.0) for m in (encoders[rt], rerankers[rt].model)]
            body.append(
                f"| {rt} | {agree[0]:.4f} / {agree[1]:.4f} | {s['passages']:.1f} | {s['passages'] / base['passages']:.2f} "
                f"| {s['query_ms']:.2f} | {s['pairs']:.1f} | {s['pairs'] / base['pairs']:.2f} |"
            )
        body.append("")

    if "quality" not in args.skip:
        from indexer.models import passage_index_text

        base = load_pipeline(load_settings(bundle=args.bundle, reranker={"model": None}))
        passages = [passage_index_text(title, text) for _, title, text in base.docstore.passage_texts()]
        settings = base.searchers["dense"].settings
        splits = {split: load_beir(SCIFACT, split) for split in ("train", "test")}
        torch_vectors = None
        rows: dict[str, dict] = {}
        for rt in RUNTIMES:
            started = time.perf_counter()
            vectors = encode_passages(encoders[rt], passages, settings, progress=True)
            row = {"passages/s": len(passages) / (time.perf_counter() - started)}
            if rt == "torch":
                torch_vectors = vectors
            both = dense_pipeline(base, encoders[rt], vectors)
            queries_only = dense_pipeline(base, encoders[rt], torch_vectors)
            for split, data in splits.items():
                q_ids, texts_ = list(data.queries), list(data.queries.values())
                row[split, "dense"], _ = ndcg(both, q_ids, texts_, data.qrels, "dense")
                row[split, "hybrid"], _ = ndcg(both, q_ids, texts_, data.qrels, "hybrid")
                row[split, "dense-q"], _ = ndcg(queries_only, q_ids, texts_, data.qrels, "dense")
                row[split, "hybrid-q"], _ = ndcg(queries_only, q_ids, texts_, data.qrels, "hybrid")
            rows[rt] = row
            print(rt, row, flush=True)
        reranked_ndcg = rerank_rows(base, rerankers, splits, args.rerank_claims)
        for split in ("train", "test"):
            n = len(splits[split].queries)
            t = rows["torch"]
            body += [
                f"### SciFact {split} nDCG@10 per runtime ({len(passages)} passages, {n} claims"
                + ("; defaults are chosen on this split)" if split == "train" else "; reported only)"),
                "",
                "| runtime | dense | hybrid | Δ hybrid | dense, queries only | hybrid, queries only | Δ hybrid "
                f"| reranked top 20 (w 0.5, {min(n, args.rerank_claims)} claims) | Δ reranked |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for rt in RUNTIMES:
                r = rows[rt]
                body.append(
                    f"| {rt} | {r[split, 'dense']:.4f} | {r[split, 'hybrid']:.4f} "
                    f"| {r[split, 'hybrid'] - t[split, 'hybrid']:+.4f} | {r[split, 'dense-q']:.4f} "
                    f"| {r[split, 'hybrid-q']:.4f} | {r[split, 'hybrid-q'] - t[split, 'hybrid']:+.4f} "
                    f"| {reranked_ndcg[split, rt]:.4f} | {reranked_ndcg[split, rt] - reranked_ndcg[split, 'torch']:+.4f} |"
                )
            body.append("")
        body += [
            "Corpus encoding (passages/s, whole corpus, batch 32): "
            + ", ".join(f"{rt} {rows[rt]['passages/s']:.1f}" for rt in RUNTIMES),
            "",
        ]
    summary = []
    if speed and "quality" not in args.skip:
        t = rows["torch"]
        for rt in RUNTIMES[1:]:
            r = rows[rt]
            drift = max(abs(r["test", m] - t["test", m]) for m in ("dense", "hybrid"))
            ok = drift <= 0.003
            ratio = speed[rt]["passages"] / speed["torch"]["passages"]
            summary.append(
                {
                    "claim": f"passage encoding, {rt} vs torch fp32 (SciFact test nDCG@10 drift dense/hybrid)",
                    "figure": f"{ratio:.2f}× (drift {drift:.4f})",
                    "target": "≥ 1.5×, drift ≤ 0.003",
                    "holds": "yes" if ratio >= 1.5 and ok else "no",
                }
            )
            ce_ratio = speed[rt]["pairs"] / speed["torch"]["pairs"]
            ce_drift = abs(reranked_ndcg["test", rt] - reranked_ndcg["test", "torch"])
            summary.append(
                {
                    "claim": f"cross-encoder pairs/s, {rt} vs torch fp32 (reranked SciFact test nDCG@10 drift)",
                    "figure": f"{ce_ratio:.2f}× (drift {ce_drift:.4f})",
                    "target": "≥ 1.5×, drift ≤ 0.003",
                    "holds": "yes" if ce_ratio >= 1.5 and ce_drift <= 0.003 else "no",
                }
            )
        summary.append(
            {
                "claim": "one query encoded, p50 ms: " + ", ".join(RUNTIMES),
                "figure": " / ".join(f"{speed[rt]['query_ms']:.1f}" for rt in RUNTIMES),
                "target": "–",
                "holds": "–",
            }
        )
        runtime_plot(speed, rows, reranked_ndcg, ROOT / "docs" / "runtimes.png")
        body += ["![runtimes](runtimes.png)", ""]
    append_report("Model runtimes: torch vs ONNX Runtime fp32 vs dynamic int8", "\n".join(body), summary)


if __name__ == "__main__":
    main()
