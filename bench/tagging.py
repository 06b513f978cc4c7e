"""Zero-shot tagging: quality on labelled sets (half 1, chosen on half 0) against the cosine baseline, and
its cost on this CPU: per passage, and `sift index build --tag` against a plain build of the example corpus.

    python bench/tagging.py [--squad ../shared/data/squad/dev-v1.1.json] [--runs 3] [--skip-eval]

Runs `sift eval classify` for SQuAD dev (paragraphs → 48 article titles) and the example corpus (10 topics),
then times `sift index build` of examples/corpus.jsonl with and without `--tag`, alternating, `--runs` times
each (the SmolLM2 copy is dequantised once before, so every run loads it as a warm machine does). Writes the
figures to docs/benchmarks.md and the half-1 macro-F1 pins to configs/regression/tagging.yaml (README's table
is tested against them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from bench.common import ROOT, append_report  # noqa: E402

PINS = ROOT / "configs" / "regression" / "tagging.yaml"
# (dataset, field, most prompts an ensemble may have): the topic set is the one `--tag` ships, whose cost line
# (≤ 2× the plain build) allows one prompt; SQuAD's titles may use an ensemble of up to 5 (k model passes)
DATASETS = {
    "squad": ("squad", "article", 5),
    "topics": (f"{ROOT / 'examples' / 'corpus.jsonl'}:topic", "auto_topic", 1),
}


def sift(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", *args], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"sift {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def evaluate(name: str, squad: Path) -> dict:
    dataset, field, prompts = DATASETS[name]
    out = ROOT / "var" / "eval" / "classify" / name
    extra = ["--squad", str(squad)] if name == "squad" else []
    print(f"sift eval classify --dataset {dataset} --max-prompts {prompts} ...", flush=True)
    sift(
        "eval",
        "classify",
        "--dataset",
        dataset,
        "--field",
        field,
        "--max-prompts",
        str(prompts),
        "--out",
        str(out),
        *extra,
    )
    return json.loads((out / "results.json").read_text())


def build_seconds(tag: bool, folder: Path) -> tuple[float, dict]:
    out = folder / f"index-{'tag' if tag else 'plain'}-{time.monotonic_ns()}"
    args = ["index", "build", "--input", str(ROOT / "examples" / "corpus.jsonl"), "--out", str(out), "--no-progress"]
    started = time.perf_counter()
    sift(*args, *(["--tag"] if tag else []))
    seconds = time.perf_counter() - started
    manifest = json.loads((out / "current" / "manifest.json").read_text())
    return seconds, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad", type=Path, default=ROOT.parent / "shared" / "data" / "squad" / "dev-v1.1.json")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-eval", action="store_true", help="reuse var/eval/classify/*/results.json")
    args = parser.parse_args()

    results = {}
    for name in DATASETS:
        path = ROOT / "var" / "eval" / "classify" / name / "results.json"
        results[name] = json.loads(path.read_text()) if args.skip_eval and path.exists() else evaluate(name, args.squad)
        if "verbalizer" not in results[name]:  # results written before the eval recorded it
            results[name]["verbalizer"] = json.loads((path.parent / "label_set.json").read_text())["labels"]
        if "ensemble" not in results[name]:  # results written before the eval recorded it
            results[name]["ensemble"] = json.loads((path.parent / "label_set.json").read_text()).get("ensemble", [])

    from indexer.config import TaggingSettings
    from indexer.lm import cached_smollm2, default_cache_dir

    cached_smollm2(TaggingSettings().cache_dir or default_cache_dir())  # the one-time dequantisation, not timed
    plain, tagged, tag_only, per_passage = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for tag in (False, True):
                seconds, manifest = build_seconds(tag, Path(tmp))
                (tagged if tag else plain).append(seconds)
                if tag:
                    timings = manifest["build"]["timings"]
                    passages = manifest["counts"]["passages"]
                    tag_only.append(timings["tag"] + timings.get("load_tagger", 0.0))
                    per_passage.append(1000 * timings["tag"] / passages)
                print(f"run {run + 1}: {'--tag' if tag else 'plain'} {seconds:.1f} s", flush=True)
    ratio = statistics.median(tagged) / statistics.median(plain)

    rows = []
    for r in results.values():
        rows.append(
            f"| {r['dataset']} | {r['labels']} | {r['chosen_on']} / {r['reported_on']} | "
            f"**{100 * r['tagger']['macro_f1']:.1f}** | "
            + (f"{100 * r['tagger_without_prior']['macro_f1']:.1f}" if r.get("prior") else "–")
            + f" | {100 * r['tagger_names_only']['macro_f1']:.1f} | "
            f"{100 * r['cosine_baseline']['macro_f1']:.1f} | {100 * r['tagger']['accuracy']:.1f} / "
            f"{100 * r['cosine_baseline']['accuracy']:.1f} | `{r['template'][-40:]!r}` + `{r['prefix']}`, "
            f"calibration {r.get('calibration', 1.0)}"
            + "".join(
                f"; + `{p['template'][-40:]!r}` + `{p['prefix']}`, calibration {p['calibration']}"
                for p in r.get("ensemble", [])
            )
            + f" ({r.get('prompts', 1)} prompt{'s' if r.get('prompts', 1) > 1 else ''})"
            + (f"; label prior, strength {r['prior_strength']}" if r.get("prior") else "; no label prior")
            + " |"
        )
    body = (
        "`sift eval classify`: each label's texts alternate between two halves; half 0 chooses the template (5 "
        "tried), the verbalizer (the label's name, or the name plus 1, 2 or 3 words per label found by automatic "
        "verbalizer search among its name's words and its 5 most distinctive words in half 0, judged cross-fitted "
        "across two folds of half 0) and the calibration strength (1, 0.75, 0.5), and for SQuAD also prompt "
        "ensembles (`--max-prompts 5`: the k best templates, each with its best configuration, label scores "
        "averaged; kept only when better on half 0; k model passes per text; the topic set is the one `--tag` "
        "ships, held to one prompt by its cost), and each candidate with a label prior (batch calibration: each label's "
        "probability divided by its mean over the texts, strength 0, 0.5 or 1, judged cross-fitted; the kept "
        "prior measured again, as `sift index prior` does, on a uniform sample of up to 512 texts of half 0 drawn "
        "without their labels); half 1 is reported. Baseline in "
        "the same run: each text's nearest label name by bi-encoder cosine (all-MiniLM-L6-v2). Model: "
        "SmolLM2-135M-Instruct (`index.tagging.runtime`: bfloat16 where the CPU computes it natively, this one "
        "does), each word scored by the probability of all its tokens after the prompt, calibrated against the "
        "empty text.\n\n"
        "| labelled set | labels | texts chosen on / reported on | tagger macro-F1 (half 1) | without its prior "
        "| names-only verbalizer | cosine baseline | accuracy tagger / baseline | chosen prompt |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nCost on this CPU (`sift index build` of examples/corpus.jsonl, "
        f"{args.runs} alternating runs each, SmolLM2's dequantised copy already cached; wall time of the CLI):\n\n"
        "| build | median s | runs |\n|---|---|---|\n"
        f"| plain | {statistics.median(plain):.1f} | {', '.join(f'{s:.1f}' for s in plain)} |\n"
        f"| `--tag` | {statistics.median(tagged):.1f} | {', '.join(f'{s:.1f}' for s in tagged)} |\n\n"
        f"- `--tag` / plain: **{ratio:.2f}×**; the tagging itself (model load + scoring): "
        f"{statistics.median(tag_only):.1f} s; per passage: **{statistics.median(per_passage):.0f} ms**.\n"
        f"- `sift eval classify` scored half 1 at {results['squad']['ms_per_text']:.0f} ms per SQuAD paragraph and "
        f"{results['topics']['ms_per_text']:.0f} ms per example note."
    )
    summary = [
        {
            "claim": f"zero-shot tagging beats the cosine baseline ({results[n]['dataset']}, half 1)",
            "figure": f"{100 * results[n]['tagger']['macro_f1']:.1f} vs {100 * results[n]['cosine_baseline']['macro_f1']:.1f}",
            "target": "macro-F1 above the baseline",
            "holds": "yes" if results[n]["tagger"]["macro_f1"] > results[n]["cosine_baseline"]["macro_f1"] else "no",
        }
        for n in results
    ] + [
        {
            "claim": "`--tag` on the example corpus",
            "figure": f"{ratio:.2f}× the plain build",
            "target": "≤ 2×",
            "holds": "yes" if ratio <= 2.0 else "no",
        }
    ]
    append_report("Zero-shot tagging: quality and cost (bench/tagging.py)", body, summary)
    PINS.write_text(
        "# Zero-shot tagging on half 1 of each labelled set (template and verbalizer chosen on half 0), written by\n"
        "# bench/tagging.py; README's table is tested against these (tests/test_readme_tables.py).\n"
        + yaml.safe_dump(
            {
                name: {
                    "dataset": r["dataset"],
                    "template": r["template"],
                    "prefix": r["prefix"],
                    "labels": r["verbalizer"],
                    "calibration": r.get("calibration", 1.0),
                    "ensemble": r.get("ensemble", []),
                    "prior": {k: round(v, 6) for k, v in r.get("prior", {}).items()},
                    "prior_strength": r.get("prior_strength", 0.0),
                    "tagger_macro_f1": round(r["tagger"]["macro_f1"], 4),
                    "names_only_macro_f1": round(r["tagger_names_only"]["macro_f1"], 4),
                    "without_prior_macro_f1": round(r["tagger_without_prior"]["macro_f1"], 4),
                    "cosine_macro_f1": round(r["cosine_baseline"]["macro_f1"], 4),
                }
                for name, r in results.items()
            },
            sort_keys=False,
            allow_unicode=True,
        )
    )


if __name__ == "__main__":
    main()
