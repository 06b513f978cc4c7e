"""Drop-in endpoints against calling the models directly, same run, same inputs (2-core CPU):

- `/v1/rerank` pairs/s over HTTP (a real `sift serve`, the shipped cross-encoder at max length 128,
  `--concurrency` clients) vs `CrossEncoder.predict` on the same (query, document) pairs in this process;
- `/v1/embeddings` texts/s over HTTP vs `SentenceTransformer.encode` on the same texts.

    python bench/ecosystem.py [--runs 3] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, append_report, progress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--bundle", type=Path, default=ROOT / "var" / "index")
    args = parser.parse_args()

    import httpx
    from sentence_transformers import CrossEncoder

    from indexer.encoders import load_encoder
    from tests.servers import sift_server

    model = ROOT / "models" / "sift-reranker-minilm-l6"
    docs = [json.loads(line) for line in (ROOT / "examples" / "corpus.jsonl").read_text().splitlines()]
    texts = [f"{d['title']} {d['text']}" for d in docs]
    queries = [d["title"] for d in docs[::8]][:16]
    requests = [(q, texts[i * 7 % len(texts) : i * 7 % len(texts) + 20]) for i, q in enumerate(queries)]
    requests = [(q, batch) for q, batch in requests if len(batch) == 20]
    pairs = [(q, t) for q, batch in requests for t in batch]
    env = {
        "SIFT_BUNDLE": str(args.bundle),
        "SIFT_GENERATOR__BACKEND": "none",
        "SIFT_RERANKER__MODEL": str(model),
        "SIFT_RERANKER__MAX_LENGTH": "128",
    }
    with sift_server(env) as (base, _):
        client = httpx.Client(timeout=120)

        def rerank_one(item: tuple[str, list[str]]) -> None:
            r = client.post(f"{base}/v1/rerank", json={"query": item[0], "documents": item[1]})
            r.raise_for_status()  # a failed request is an error, never a success

        def http_rerank() -> None:
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(rerank_one, requests))

        def embed_one(batch: list[str]) -> None:
            r = client.post(f"{base}/v1/embeddings", json={"input": batch, "encoding_format": "base64"})
            r.raise_for_status()

        batches = [texts[i : i + 32] for i in range(0, len(texts), 32)]

        def http_embed() -> None:
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(embed_one, batches))

        cross = CrossEncoder(str(model), max_length=128, device="cpu")
        cross.model.float()
        encoder = load_encoder("sentence-transformers/all-MiniLM-L6-v2", "cpu")

        def direct_rerank() -> None:
            cross.predict([list(p) for p in pairs], batch_size=64, show_progress_bar=False)

        def direct_embed() -> None:
            encoder.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)

        timings: dict[str, list[float]] = {}
        bar = progress(4 * (args.runs + 1), "rerank/embed runs")
        for name, fn in (
            ("http_rerank", http_rerank),
            ("direct_rerank", direct_rerank),
            ("http_embed", http_embed),
            ("direct_embed", direct_embed),
        ):
            fn()  # warm-up
            bar.update()
            runs = []
            for _ in range(args.runs):
                t = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t)
                bar.update()
            timings[name] = runs
    med = {k: statistics.median(v) for k, v in timings.items()}
    body = f"""{len(pairs)} (query, document) pairs ({len(requests)} requests of 20 documents, {args.concurrency} concurrent
clients) and {len(texts)} passages (batches of 32); the shipped cross-encoder at max length 128 and
all-MiniLM-L6-v2. Median of {args.runs} runs after a warm-up; every HTTP request checked for status 200.

| path | seconds | items/s | vs direct |
|---|---:|---:|---:|
| `CrossEncoder.predict` (in process, batch 64) | {med["direct_rerank"]:.2f} | {len(pairs) / med["direct_rerank"]:.1f} pairs/s | 1.00× |
| `POST /v1/rerank` (real server, micro-batched) | {med["http_rerank"]:.2f} | {len(pairs) / med["http_rerank"]:.1f} pairs/s | {med["direct_rerank"] / med["http_rerank"]:.2f}× |
| `SentenceTransformer.encode` (in process, batch 32) | {med["direct_embed"]:.2f} | {len(texts) / med["direct_embed"]:.1f} texts/s | 1.00× |
| `POST /v1/embeddings` (real server, base64) | {med["http_embed"]:.2f} | {len(texts) / med["http_embed"]:.1f} texts/s | {med["direct_embed"] / med["http_embed"]:.2f}× |
"""
    append_report("Drop-in endpoints vs direct model calls (bench/ecosystem.py)", body)


if __name__ == "__main__":
    main()
