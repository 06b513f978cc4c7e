#!/usr/bin/env bash
# The device tool's one prepared GPU run (see bench/gpu_train.py). Expects, beside the repository:
#   .whl/  wheels the GPU image lacks (pydantic, pydantic-settings, bm25s, PyStemmer, ir-measures, ...)
#   .gpu/  gzipped training data: scifact/{corpus,queries}.jsonl.gz + qrels/train.tsv, squad/dev-v1.1.json.gz
# Leaves the reader in $OUT (model split in 15 MB parts) and the reranker in /tmp/stash (second call copies it).
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
DATA=/tmp/data; WORK=/tmp/work; mkdir -p $DATA/scifact/qrels $DATA/squad $WORK
gunzip -c .gpu/scifact/corpus.jsonl.gz > $DATA/scifact/corpus.jsonl
gunzip -c .gpu/scifact/queries.jsonl.gz > $DATA/scifact/queries.jsonl
cp .gpu/scifact/qrels/train.tsv $DATA/scifact/qrels/
gunzip -c .gpu/squad/dev-v1.1.json.gz > $DATA/squad/dev-v1.1.json
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/gpu_train.py --data $DATA --work $WORK "$@" 2>&1 | grep -v "Warning\|warn(" | tee $OUT/gpu_train.log
pack() {  # folder -> $2/name.tar (everything but the weights) + name.safetensors.part-XX (15 MB each)
  tar -C "$1" --exclude model.safetensors --exclude 'checkpoint*' -cf "$2/$3.tar" .
  split -b 15M -d "$1/model.safetensors" "$2/$3.safetensors.part-"
}
pack $WORK/reader $OUT reader
cp $WORK/gpu_train.json $OUT/
if [ -d $WORK/reranker ]; then mkdir -p /tmp/stash; pack $WORK/reranker /tmp/stash reranker; fi
ls -la $OUT /tmp/stash 2>/dev/null || true
