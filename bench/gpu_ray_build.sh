#!/usr/bin/env bash
# The prepared GPU check of issue 14 (run with the device tool when a GPU is lent; not run otherwise):
# the same SciFact corpus built (1) locally on the CPU and (2) with `--engine ray --gpus-per-encoder 1` and
# faiss-gpu, in one run; passages/s of each and the agreement of the two bundles go to $OUT/gpu_ray_build.json.
# Expects beside the repository: .whl/ (ray[data,serve], faiss-gpu-cu12 and Sift's other wheels the GPU image
# lacks) and .gpu/scifact/corpus.jsonl.gz (as bench/gpu_train.sh).
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/data && gunzip -c .gpu/scifact/corpus.jsonl.gz > /tmp/data/corpus.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 - <<'PY' 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/gpu_ray_build.log"
import json, os, time
from pathlib import Path
import faiss, numpy as np
from indexer.build import build_bundle
from indexer.config import DenseSettings, IndexConfig
from indexer.dense import INDEX_FILE, gpu_available
from indexer.ray_engine import RayEncoding
corpus = Path("/tmp/data/corpus.jsonl")
figures = {"faiss_gpu": gpu_available()}
runs = {}
for name, device, engine in (("cpu-local", "cpu", None), ("gpu-ray", None, RayEncoding(encoders=1, gpus_per_encoder=1))):
    config = IndexConfig(dense=DenseSettings(device=device, token_vectors="int8"))
    started = time.perf_counter()
    result = build_bundle(corpus, Path(f"/tmp/{name}"), config, show_progress=False, engine=engine)
    runs[name] = result.path
    figures[name] = {"seconds": time.perf_counter() - started, "passages": result.passages,
                     "encode_s": result.timings["encode"], "passages_per_s": result.passages / result.timings["encode"]}
    print(name, figures[name], flush=True)
a, b = (faiss.read_index(str(p / "dense" / INDEX_FILE)) for p in runs.values())
va, vb = a.reconstruct_n(0, a.ntotal), b.reconstruct_n(0, b.ntotal)
figures["max_abs_vector_diff"] = float(np.abs(va - vb).max())
figures["gpu_vs_cpu_passages_per_s"] = figures["gpu-ray"]["passages_per_s"] / figures["cpu-local"]["passages_per_s"]
Path(os.environ["OUT"], "gpu_ray_build.json").write_text(json.dumps(figures, indent=2))
print(json.dumps(figures, indent=2))
PY
