"""Issue 30, item 3: would a bi-encoder trained on data Sift may ship beat the shipped all-MiniLM-L6-v2?

    python bench/shipped_encoder.py [--minutes 32] [--train-args "..."] [--encoder PATH] [--skip-test]

1. Train: `sift encoder train --beir <scifact> --squad <dev> --squad-articles 0-7` (SciFact train qrels and
   the SQuAD dev questions of articles 0–7, BM25 and dense negatives, the second stage as teacher; 5% of the
   groups held out choose the kept step). `--encoder PATH` reuses a trained model instead.
2. Validation (the choice is made here): nDCG@10 and MRR@10 of bm25, dense, hybrid and the default second stage
   for the shipped and the trained encoder on
   - SQuAD dev articles 8–23 (500 questions, none trained on; corpus: the paragraphs of articles 0–23),
   - the label-free out-of-domain set (500 sentences cut out of the Python standard library's docstrings),
   each built with configs/default.yaml and `SIFT_INDEX__DENSE__MODEL`, scored by `sift eval retrieval`.
   SciFact train is not a validation set here: its queries are trained on (the held-out groups stand in).
3. Test (reported only): the same on SciFact test and Cranfield.

Writes a section of docs/benchmarks.md and configs/regression/shipped_encoder.yaml (the README's table is
tested against it). Work goes to var/bench/shipped-encoder/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, append_report  # noqa: E402
from bench.encoder_adaptation import build_and_eval, sift  # noqa: E402

WORK = ROOT / "var" / "bench" / "shipped-encoder"
PINS = ROOT / "configs" / "regression" / "shipped_encoder.yaml"
PIPELINES = ("bm25", "dense", "hybrid", "hybrid+rerank")
SHARED = ROOT.parent / "shared" / "data"
TRAIN_ARTICLES = "0-7"
VALIDATION_ARTICLES = range(8, 24)


def validation_set(folder: Path, queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> Path:
    """Complete `folder` (its corpus.jsonl written already) as a BEIR folder whose judgments are the
    `validation` split, so that `sift eval retrieval --split validation` scores it."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()), encoding="utf-8"
    )
    lines = [f"{q}\t{d}\t{r}" for q, docs in qrels.items() for d, r in docs.items()]
    (folder / "qrels" / "validation.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(lines) + "\n")
    return folder


def validation_sets() -> dict[str, Path]:
    """SQuAD dev articles 8–23 (500 questions over the paragraphs of articles 0–23) and the label-free
    out-of-domain set of the second stage's selection (`app.training.second_stage.dataset_queries`)."""
    from app.eval.qa import load_squad, paragraphs_corpus, sample
    from app.training.second_stage import dataset_queries

    squad = SHARED / "squad" / "dev-v1.1.json"
    folder = WORK / "data" / "squad-a8-23"
    if not (folder / "qrels" / "validation.tsv").exists():
        questions = sample(load_squad(squad, VALIDATION_ARTICLES), 500)
        folder.mkdir(parents=True, exist_ok=True)
        corpus = paragraphs_corpus(squad, range(0, 24))
        (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus), encoding="utf-8")
        validation_set(folder, {q.id: q.question for q in questions}, {q.id: {q.paragraph_id: 1} for q in questions})
    queries, qrels, corpus_file = dataset_queries("pydocs-ict", SHARED.parent, WORK / "data")
    return {"squad-a8-23": folder, "pydocs-ict": validation_set(corpus_file.parent, queries, qrels)}


def evaluate(name: str, dataset: Path, split: str, label: str, encoder: Path | None) -> dict[str, dict[str, float]]:
    """`dataset` built with `encoder` (None: the shipped one) under WORK/<label>/<name> and scored
    (`bench.encoder_adaptation.build_and_eval`; a score already there is reused)."""
    work = WORK / label / name
    saved = work / f"eval-{split}" / "results.json"
    if saved.exists():
        result = json.loads(saved.read_text())["pipelines"]
    else:
        result = build_and_eval(dataset, work, split, encoder, rebuild=False)
    return {p: {m: round(result[p][m], 4) for m in ("ndcg@10", "mrr@10")} for p in PIPELINES}


def role_and_metric(split: str) -> tuple[str, str]:
    """(role, metric) of a set scored on `split`: validation sets have one relevant passage a query (MRR@10),
    the BEIR test sets graded judgments (nDCG@10) and are reported only."""
    return ("validation", "mrr@10") if split == "validation" else ("test (report only)", "ndcg@10")


def write_pins(path: Path, header: str, training: dict, results: dict) -> None:
    """A bench's pins: `header` (comment lines) then its training run and its per-set results."""
    import yaml

    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump({"training": training, "sets": results}, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=32.0, help="time budget of the training run")
    parser.add_argument("--train-args", default="--validate-every 40", help="extra `sift encoder train` options")
    parser.add_argument("--encoder", type=Path, help="a trained model to evaluate (skips training)")
    parser.add_argument("--skip-test", action="store_true", help="validation only")
    args = parser.parse_args()

    encoder = args.encoder or WORK / "encoder"
    if args.encoder is None and not (encoder / "training_log.json").exists():
        sift("encoder", "train", "--beir", str(SHARED / "scifact"), "--squad", str(SHARED / "squad" / "dev-v1.1.json"),
             "--squad-articles", TRAIN_ARTICLES, "--out", str(encoder), "--max-minutes", str(args.minutes),
             *shlex.split(args.train_args))  # fmt: skip
    log = json.loads((encoder / "training_log.json").read_text())
    history = log["history"]
    kept = max(history, key=lambda h: h["mrr@10"])

    sets = {name: (folder, "validation") for name, folder in validation_sets().items()}
    if not args.skip_test:
        sets |= {"scifact": (SHARED / "scifact", "test"), "cranfield": (SHARED / "cranfield", "test")}
    results: dict[str, dict[str, dict]] = {}
    for name, (folder, split) in sets.items():
        results[name] = {
            "shipped": evaluate(name, folder, split, "shipped", None),
            "trained": evaluate(name, folder, split, "trained", encoder),
        }

    rows, summary = [], []
    for name, both in results.items():
        kind, m = role_and_metric(sets[name][1])
        for label in ("shipped", "trained"):
            r = both[label]
            rows.append(f"| {name} ({kind}, {m}) | {label} | " + " | ".join(f"{r[p][m]:.4f}" for p in PIPELINES) + " |")
        s, t = both["shipped"], both["trained"]
        summary.append(
            {
                "claim": f"encoder trained on SciFact train + SQuAD 0–7 vs shipped ({name}, {m}: dense / default)",
                "figure": f"{t['dense'][m]:.4f} / {t['hybrid+rerank'][m]:.4f} vs "
                f"{s['dense'][m]:.4f} / {s['hybrid+rerank'][m]:.4f}",
                "target": "above the shipped encoder's",
                "holds": "yes" if t["hybrid+rerank"][m] > s["hybrid+rerank"][m] else "no",
            }
        )
    body = (
        "A general bi-encoder trained on data Sift may ship: `sift encoder train --beir scifact --squad dev-v1.1.json "
        f"--squad-articles {TRAIN_ARTICLES} --max-minutes {args.minutes:g} {args.train_args}` from all-MiniLM-L6-v2 "
        f"({log['train_groups']} groups trained, {log['validation_groups']} held out; {log['step']} steps in "
        f"{log['seconds'] / 60:.1f} min, {log['pairs_per_s']:.1f} pairs/s; held-out MRR@10 {history[0]['mrr@10']:.3f} "
        f"→ {kept['mrr@10']:.3f} at step {kept['step']}). Every set is built with configs/default.yaml and "
        "`SIFT_INDEX__DENSE__MODEL`, then scored by `sift eval retrieval` (default = hybrid + the second stage). "
        "The shipping decision reads the validation rows only.\n\n"
        "| set | bi-encoder | bm25 | dense | hybrid | default |\n|---|---|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    append_report("A shipped encoder trained on SciFact train and SQuAD (bench/shipped_encoder.py)", body, summary)
    write_pins(
        PINS,
        "bench/shipped_encoder.py: the shipped all-MiniLM-L6-v2 vs a bi-encoder trained on SciFact train and SQuAD\n"
        "dev articles 0-7 (issue 30, item 3), on validation (squad-a8-23, pydocs-ict) and test sets (scifact,\n"
        "cranfield; report only). Written by the bench; the README's table is tested against it.",
        {
            "steps": log["step"],
            "best_step": log["best_step"],
            "pairs_per_s": round(log["pairs_per_s"], 2),
            "train_minutes": round(log["seconds"] / 60, 1),
        },
        results,
    )


if __name__ == "__main__":
    main()
