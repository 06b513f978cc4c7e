"""The README's adaptation recipe, end to end, on BEIR-layout datasets: build with the shipped encoder, adapt
the bi-encoder to the corpus without labels (`sift encoder train --pseudo <bundle>`), rebuild with the adapted
model, and score both builds with `sift eval retrieval` (the labels are read only there, to report).

    python bench/encoder_adaptation.py [--dataset ../shared/data/scifact --dataset ../shared/data/cranfield]
        [--minutes 40] [--train-args "--pseudo-limit 2500"] [--split test]

Per dataset: nDCG@10 of bm25, dense, hybrid and the default (hybrid + second stage) for both builds, the
default's gain over hybrid, and the training cost (wall time of `sift encoder train`, its training pairs per
second, groups, held-out pseudo-query MRR@10 before and at the kept step). Work goes to var/bench/adapt/<name>/
(the adapted encoder stays there: `SIFT_INDEX__DENSE__MODEL=var/bench/adapt/<name>/encoder` builds with it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, append_report  # noqa: E402

PIPELINES = "bm25,dense,hybrid,hybrid+rerank"
PINS = ROOT / "configs" / "regression" / "encoder_adaptation.yaml"


def sift(*args: str, env: dict[str, str] | None = None) -> float:
    """Run the CLI (its output streams to this terminal); returns its wall time in seconds."""
    print("$", "sift", shlex.join(args), flush=True)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", *args], cwd=ROOT, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        sys.exit(f"sift {' '.join(args)} failed with exit status {done.returncode}")
    return time.perf_counter() - started


def build_and_eval(dataset: Path, folder: Path, split: str, encoder: Path | None, rebuild: bool) -> dict:
    env = {"SIFT_INDEX__DENSE__MODEL": str(encoder)} if encoder else {}
    if rebuild or not (folder / "index" / "current").exists():
        sift("index", "build", "--input", str(dataset / "corpus.jsonl"), "--out", str(folder / "index"), env=env)
    out = folder / f"eval-{split}"
    sift("eval", "retrieval", "--dataset", str(dataset), "--split", split, "--bundle", str(folder / "index"),
         "--pipelines", PIPELINES, "--out", str(out))  # fmt: skip
    return json.loads((out / "results.json").read_text())["pipelines"]


def write_pins(names: list[str], split: str) -> None:
    """configs/regression/encoder_adaptation.yaml from the runs' own files (results.json of both builds and the
    adapted encoder's training_log.json): the README's adaptation table is tested against it."""
    import yaml

    pins = {}
    for name in names:
        work = ROOT / "var" / "bench" / "adapt" / name
        both = {
            label: json.loads((work / label / f"eval-{split}" / "results.json").read_text())["pipelines"]
            for label in ("base", "adapted")
        }
        log = json.loads((work / "encoder" / "training_log.json").read_text())
        pins[name] = {
            "split": split,
            **{
                label: {p: round(result[p]["ndcg@10"], 4) for p in ("bm25", "dense", "hybrid", "hybrid+rerank")}
                for label, result in both.items()
            },
            "training": {
                "pairs_per_s": round(log["pairs_per_s"], 2),
                "train_minutes": round(log["seconds"] / 60, 1),
                "steps": log["step"],
                "best_step": log["best_step"],
            },
        }
    PINS.write_text(
        "# nDCG@10 of the README's adaptation recipe (bench/encoder_adaptation.py): each dataset built with the\n"
        "# shipped encoder (base) and with the encoder adapted to it without labels (adapted); README's table is\n"
        "# tested against these (tests/test_readme_tables.py). Written by the bench from its runs' own files.\n"
        + yaml.safe_dump(pins, sort_keys=False)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = ROOT.parent / "shared" / "data"
    parser.add_argument("--dataset", type=Path, action="append", help="BEIR folder (repeatable)")
    parser.add_argument("--split", default="test", help="qrels split reported (nothing is chosen on it)")
    parser.add_argument("--minutes", type=float, default=40.0, help="time budget of each training run")
    parser.add_argument("--train-args", default="", help="extra `sift encoder train` options")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the base bundles (else reused)")
    parser.add_argument("--pins-only", action="store_true", help="only rewrite the pins from the last runs' files")
    args = parser.parse_args()
    datasets = args.dataset or [shared / "scifact", shared / "cranfield"]
    if args.pins_only:
        write_pins([d.resolve().name for d in datasets], args.split)
        return

    rows, cost, summary = [], [], []
    for dataset in datasets:
        name = dataset.resolve().name
        work = ROOT / "var" / "bench" / "adapt" / name
        base = build_and_eval(dataset, work / "base", args.split, None, args.rebuild)
        encoder = work / "encoder"
        train_args = ["--pseudo", str(work / "base" / "index"), "--out", str(encoder)]
        train_args += ["--max-minutes", str(args.minutes), *shlex.split(args.train_args)]
        wall = sift("encoder", "train", *train_args)
        log = json.loads((encoder / "training_log.json").read_text())
        adapted = build_and_eval(dataset, work / "adapted", args.split, encoder, True)
        for label, result in (("shipped all-MiniLM-L6-v2", base), ("adapted to the corpus", adapted)):
            n = {p: result[p]["ndcg@10"] for p in result}
            rows.append(
                f"| {name} | {label} | {n['bm25']:.4f} | {n['dense']:.4f} | {n['hybrid']:.4f} | "
                f"**{n['hybrid+rerank']:.4f}** | {n['hybrid+rerank'] - n['hybrid']:+.4f} |"
            )
        history = log["history"]
        kept = max(history, key=lambda h: h["mrr@10"])
        cost.append(
            f"| {name} | {wall / 60:.1f} | {log['seconds'] / 60:.1f} | {log['step']} | {log['pairs']} | "
            f"**{log['pairs_per_s']:.1f}** | {log['train_groups']} / {log['validation_groups']} | "
            f"{history[0]['mrr@10']:.3f} → {kept['mrr@10']:.3f} (step {kept['step']}) |"
        )
        a = {p: adapted[p]["ndcg@10"] for p in adapted}
        b = {p: base[p]["ndcg@10"] for p in base}
        summary.append(
            {
                "claim": f"adapted encoder ({name} {args.split}): default vs shipped encoder",
                "figure": f"{a['hybrid+rerank']:.4f} vs {b['hybrid+rerank']:.4f} (dense {a['dense']:.4f} vs "
                f"{b['dense']:.4f})",
                "target": "default above the shipped encoder's",
                "holds": "yes" if a["hybrid+rerank"] > b["hybrid+rerank"] else "no",
            }
        )
    body = (
        "The README's recipe on each dataset, labels read only to report: `sift index build` with the shipped "
        "encoder, `sift encoder train --pseudo <that bundle>` (pseudo-queries cut from its passages, BM25 and "
        "dense negatives, the second stage as teacher, held-out pseudo-queries choosing the kept step), then "
        "`SIFT_INDEX__DENSE__MODEL=<adapted> sift index build` and `sift eval retrieval` on both builds. "
        f"Training options: `--max-minutes {args.minutes:g} {args.train_args}`.\n\n"
        f"nDCG@10 ({args.split} qrels):\n\n"
        "| dataset | bi-encoder | bm25 | dense | hybrid | default (hybrid + second stage) | default − hybrid |\n"
        "|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\nTraining cost on this CPU (`sift encoder "
        "train`, from its training_log.json):\n\n"
        "| dataset | wall min (mining, teacher, training) | training min | steps | training pairs | pairs/s | "
        "groups trained / held out | held-out pseudo-query MRR@10 |\n|---|---:|---:|---:|---:|---:|---|---|\n"
        + "\n".join(cost)
        + "\n\nA training pair is a query with one of its passages (its positive or a mined negative) in a step's "
        "loss; every passage of the batch is also an in-batch negative of every other query."
    )
    append_report("Adapting the bi-encoder to a corpus without labels (bench/encoder_adaptation.py)", body, summary)
    write_pins([d.resolve().name for d in datasets], args.split)


if __name__ == "__main__":
    main()
