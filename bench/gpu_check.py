"""GPU check, for a machine with CUDA (and ideally faiss-gpu): encodes SciFact passages on the GPU, builds
the FAISS index there, and checks the results against a CPU build of the same vectors.

    python bench/gpu_check.py [--passages 20000]

Prints passages/s on GPU vs CPU (CPU on a 1,000-passage sample), whether faiss built on GPU, and the
top-10 agreement between the GPU- and CPU-built indexes (must be 1.0 for the exact index).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SCIFACT, append_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=20000)
    args = parser.parse_args()
    import faiss
    import torch

    from indexer.config import DenseSettings
    from indexer.dense import gpu_available, make_index
    from indexer.encoders import load_encoder

    if not torch.cuda.is_available():
        print("no CUDA device visible: this check did not run on a GPU and writes nothing")
        sys.exit(1)
    import json

    texts = [(r["title"] + " " + r["text"]) for r in map(json.loads, open(SCIFACT / "corpus.jsonl", encoding="utf-8"))]
    texts = (texts * (args.passages // len(texts) + 1))[: args.passages]
    gpu = load_encoder("default", "cuda")
    gpu.encode(texts[:256], batch_size=256)
    t = time.perf_counter()
    vectors = gpu.encode(texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    gpu_rate = len(texts) / (time.perf_counter() - t)
    cpu = load_encoder("default", "cpu")
    t = time.perf_counter()
    cpu_vectors = cpu.encode(texts[:1000], batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    cpu_rate = 1000 / (time.perf_counter() - t)
    drift = float(np.abs(cpu_vectors - vectors[:1000]).max())
    t = time.perf_counter()
    index = make_index(vectors, DenseSettings())
    build = time.perf_counter() - t
    if gpu_available():
        reference = faiss.IndexFlatIP(vectors.shape[1])  # built on the CPU, for the GPU-built one to match
        reference.add(vectors)
        _, a = index.search(vectors[:500], 10)
        _, b = reference.search(vectors[:500], 10)
        agreement = f"{float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])):.3f}"
    else:  # both would be CPU builds: equal by construction, so no figure
        agreement = "not measured: this faiss has no GPU support, the index was built on the CPU"
    body = f"""device: {torch.cuda.get_device_name(0)}; faiss GPU build: {gpu_available()}

| figure | value |
|---|---:|
| encoding on GPU, passages/s (batch 256, {len(texts)} passages) | {gpu_rate:,.0f} |
| encoding on this machine's CPU, passages/s (1,000 passages) | {cpu_rate:,.1f} |
| max abs difference GPU vs CPU vectors | {drift:.2e} |
| exact index build, s | {build:.3f} |
| top-10 agreement GPU-built vs CPU exact index | {agreement} |
"""
    append_report("GPU check (bench/gpu_check.py)", body)


if __name__ == "__main__":
    main()
