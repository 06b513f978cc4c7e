"""Index-build and BM25 query speed on SciFact: Sift (bm25s) against rank-bm25, measured in the same run.

    python bench/index_build.py [--runs 5] [--dense-sample 512]

Times (median of --runs after a warm-up):
- BM25 build: tokenise + index every SciFact passage, Sift vs rank-bm25 (same tokeniser for both);
- BM25 queries: the 300 test claims, tokenise + score + top-100, Sift's `BM25Searcher` path vs rank-bm25;
- dense build: encode a sample of passages with all-MiniLM-L6-v2 on this machine + build the exact FAISS index.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SCIFACT, append_report, median_time  # noqa: E402


def load_passages() -> list[str]:
    from indexer.chunking import Chunker
    from indexer.encoders import load_encoder
    from indexer.models import passage_index_text
    from indexer.sources import read_documents

    encoder = load_encoder("default", "cpu")
    chunker = Chunker(encoder.tokenizer)
    texts = []
    for document, passages in chunker.chunk(read_documents(SCIFACT / "corpus.jsonl")):
        texts.extend(passage_index_text(document.title, p.text) for p in passages)
    return texts


def compare_words(ratio: float) -> str:
    """How a speed ratio (Sift ÷ rank-bm25) reads: within 10 % either way is "about as fast"."""
    if ratio >= 1.1:
        return f"{ratio:.2f}× as fast as"
    if ratio <= 1 / 1.1:
        return f"at {ratio:.2f}× the speed of"
    return f"about as fast as ({ratio:.2f}×)"


def build_conclusion(build_ratio: float, query_ratio: float) -> str:
    """The summary sentence, written from the measured ratios (never a fixed conclusion)."""
    return (
        f"In this run, Sift's BM25 (bm25s) built the index {compare_words(build_ratio)} rank-bm25 and answered "
        f"queries {compare_words(query_ratio)} rank-bm25. bm25s computes every BM25 weight at index time (eager "
        "sparse scoring), so a query is a sparse-matrix slice; both use the same tokeniser."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dense-sample", type=int, default=512)
    args = parser.parse_args()

    from rank_bm25 import BM25Okapi

    from indexer.bm25 import index_bm25, tokenize, top_k
    from indexer.config import BM25Settings, DenseSettings
    from indexer.dense import make_index
    from indexer.encoders import load_encoder

    settings = BM25Settings()
    texts = load_passages()
    queries = [json.loads(line)["text"] for line in open(SCIFACT / "queries.jsonl", encoding="utf-8")]
    test_ids = {line.split("\t")[0] for line in open(SCIFACT / "qrels" / "test.tsv", encoding="utf-8")}
    queries = [
        json.loads(line)["text"]
        for line in open(SCIFACT / "queries.jsonl", encoding="utf-8")
        if json.loads(line)["_id"] in test_ids
    ]
    n = len(texts)

    def build_sift():
        return index_bm25(texts, settings)

    def build_rank():
        return BM25Okapi(tokenize(texts, settings), k1=settings.k1, b=settings.b)

    sift_build, _ = median_time(build_sift, args.runs)
    rank_build, _ = median_time(build_rank, args.runs)
    sift_model, rank_model = build_sift(), build_rank()
    vocab = sift_model.vocab_dict

    def query_sift():
        for q in queries:
            tokens = [t for t in tokenize([q], settings)[0] if t in vocab]
            top_k(np.asarray(sift_model.get_scores(tokens)), 100)

    def query_rank():
        for q in queries:
            scores = rank_model.get_scores(tokenize([q], settings)[0])
            np.argsort(-scores)[:100]

    sift_query, _ = median_time(query_sift, args.runs)
    rank_query, _ = median_time(query_rank, max(3, args.runs))

    encoder = load_encoder("default", "cpu")
    sample = texts[: args.dense_sample]

    def encode():
        return encoder.encode(sample, batch_size=32, normalize_embeddings=True, show_progress_bar=False)

    encode_time, _ = median_time(encode, args.runs)
    vectors = np.asarray(encode(), dtype=np.float32)
    all_vectors = np.tile(vectors, (n // len(vectors) + 1, 1))[:n]
    faiss_time, _ = median_time(lambda: make_index(all_vectors, DenseSettings()), args.runs)

    qps_sift, qps_rank = len(queries) / sift_query, len(queries) / rank_query
    conclusion = build_conclusion(rank_build / sift_build, qps_sift / qps_rank)
    body = f"""SciFact: {n} passages (5,183 abstracts, 256-token windows), {len(queries)} test queries; median of {args.runs} runs.

| stage | Sift | rank-bm25 | speed-up (Sift ÷ rank-bm25) |
|---|---:|---:|---:|
| BM25 build, passages/s (tokenise + index) | {n / sift_build:,.0f} | {n / rank_build:,.0f} | {rank_build / sift_build:.2f}× |
| BM25 queries/s (tokenise + score + top-100) | {qps_sift:,.0f} | {qps_rank:,.1f} | {qps_sift / qps_rank:.0f}× |

| dense stage (all-MiniLM-L6-v2, CPU) | figure |
|---|---:|
| encoding, passages/s (sample of {len(sample)}, batch 32) | {len(sample) / encode_time:.1f} |
| exact FAISS index build over {n} vectors, s | {faiss_time:.3f} |
| estimated full dense build, s (encode all + index) | {n / (len(sample) / encode_time) + faiss_time:.0f} |

{conclusion}
"""
    append_report("Index build and BM25 queries (bench/index_build.py)", body)


if __name__ == "__main__":
    main()
