"""One prepared GPU run (device tool): train the extractive reader and continue the cross-encoder.

Run from the repository root on a CUDA machine, with the training data unpacked under DATA (see
`bench/gpu_train.sh`, which also installs the few wheels the GPU image lacks). Everything is chosen on
validation data only: the reader on held-out paragraphs of SQuAD v1.1 dev articles 0–23, the reranker on
held-out training groups. Nothing here reads SciFact test qrels or SQuAD articles 24–47.

    python bench/gpu_train.py --data /tmp/data --work /tmp/work --reader-seconds 150 --reranker-seconds 200

Writes WORK/reader (best reader), WORK/reranker (best cross-encoder) and WORK/gpu_train.json (every
validation figure, the choice made and timings).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--base", default="models/sift-reranker-minilm-l6")
    parser.add_argument("--reader-lrs", default="1e-4,2e-4")
    parser.add_argument("--reader-epochs", type=int, default=6)
    parser.add_argument("--reader-seconds", type=float, default=150)
    parser.add_argument("--reranker-seconds", type=float, default=200)
    parser.add_argument("--skip-reranker", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, default=None, help="smoke test: at most N questions / groups per source")
    args = parser.parse_args()

    import torch

    report: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "reader": {}}
    args.work.mkdir(parents=True, exist_ok=True)

    # -- reader: a small learning-rate sweep, each run keeping its best epoch on validation ---------------
    from app.training.reader import ReaderTrainConfig, load_examples, split_by_paragraph, train

    examples = load_examples(args.data / "squad" / "dev-v1.1.json", range(0, 24))
    train_set, val_set = split_by_paragraph(examples, 0.05, 13)
    if args.limit:
        train_set, val_set = train_set[: args.limit], val_set[: args.limit // 4]
    lrs = [float(x) for x in args.reader_lrs.split(",")]
    best_name, best_f1 = None, -1.0
    for lr in lrs:
        name = f"reader-lr{lr:g}"
        t = time.perf_counter()
        config = ReaderTrainConfig(
            base=args.base,
            out=args.work / name,
            max_length=384,
            stride=128,
            epochs=args.reader_epochs,
            batch_size=32,
            lr=lr,
            warmup=0.1,
            seed=13,
            checkpoint_every=0,
            device=args.device,
            max_seconds=args.reader_seconds / len(lrs),
        )
        state = train(train_set, config, progress=False, validation=val_set)
        report["reader"][name] = {
            "lr": lr,
            "history": state["history"],
            "best": state.get("best"),
            "seconds": round(time.perf_counter() - t, 1),
            "stopped": state.get("stopped"),
            "train_questions": len(train_set),
            "validation_questions": len(val_set),
        }
        print(name, json.dumps(report["reader"][name]["best"]), flush=True)
        if state["best_f1"] > best_f1:
            best_name, best_f1 = name, state["best_f1"]
    shutil.copytree(args.work / best_name, args.work / "reader", dirs_exist_ok=True)
    report["reader_choice"] = {"run": best_name, "validation_f1": best_f1}

    # -- reranker: continue the shipped cross-encoder with more pseudo-queries per document ----------------
    if not args.skip_reranker:
        from app.training.reranker import (
            Mining,
            TrainConfig,
            beir_groups,
            pseudo_query_groups,
            save_half_precision,
            squad_groups,
        )
        from app.training.reranker import train as train_reranker

        t = time.perf_counter()
        rng = random.Random(13)
        mining = Mining(hard=2, easy=1)
        groups = beir_groups(args.data / "scifact", "train", mining, rng)[: args.limit]
        groups += squad_groups(args.data / "squad" / "dev-v1.1.json", range(0, 24), mining, rng, args.limit)
        groups += pseudo_query_groups(args.data / "scifact" / "corpus.jsonl", mining, rng, args.limit, 4)
        mined = time.perf_counter() - t
        config = TrainConfig(
            base=args.base,
            out=args.work / "reranker",
            loss="listwise",
            max_length=128,
            epochs=3,
            batch_size=32,
            lr=2e-5,
            warmup=0.05,
            seed=13,
            validation=0.05,
            checkpoint_every=0,
            validate_every=250,
            device=args.device,
            max_seconds=args.reranker_seconds,
        )
        state = train_reranker(groups, config, progress=False)
        save_half_precision(args.work / "reranker")
        report["reranker"] = {
            "groups": {src: sum(g.source == src for g in groups) for src in sorted({g.source for g in groups})},
            "mining_seconds": round(mined, 1),
            "train_seconds": round(state["seconds"], 1),
            "history": state["history"],
            "best_ndcg@10": state["best"],
            "stopped": state.get("stopped"),
        }
        print("reranker", json.dumps(report["reranker"]["history"][-3:]), flush=True)
    (args.work / "gpu_train.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
