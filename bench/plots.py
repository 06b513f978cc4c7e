"""Plots for docs/: quality per pipeline on SciFact with published anchors, and latency against nDCG@10 as
the depth of the second stage grows.

    python bench/plots.py [--bundle DIR]

- docs/quality.png: nDCG@10 of each pipeline from `sift eval retrieval` (var/eval/scifact-test/results.json,
  run first) with Anserini BM25 (0.6789) and bge-base-en-v1.5 (0.7408) drawn as reference lines.
- docs/fusion_depth.png: nDCG@10 and p50 latency per query as the fusion candidate depth grows (what a
  hybrid-only deployment can tune). The rerank-depth trade-off (docs/rerank_tradeoff.png) is drawn by
  bench/rerank.py, which scores each candidate once instead of once per depth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SCIFACT, append_report  # noqa: E402

ANCHORS = {"Anserini BM25 flat (0.6789)": 0.6789, "bge-base-en-v1.5 (0.7408)": 0.7408}


def quality_plot(results: Path, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())["pipelines"]
    names = list(data)
    values = [data[n]["ndcg@10"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, values, color="#4C72B0")
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 0.005, f"{v:.3f}", ha="center")
    for (label, value), style in zip(ANCHORS.items(), ("--", ":")):
        ax.axhline(value, linestyle=style, color="gray", label=label)
    ax.set_ylim(0.5, 0.8)
    ax.set_ylabel("nDCG@10")
    ax.set_title("Sift on SciFact (BEIR test, 300 queries)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return ", ".join(f"{n} {v:.4f}" for n, v in zip(names, values))


def fusion_depth_plot(bundle: Path, out: Path) -> tuple[list[str], str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from app.eval.retrieval import load_beir, run_pipelines
    from app.services import load_pipeline
    from app.settings import load_settings

    settings = load_settings(bundle=bundle)
    settings.reranker.model = None
    pipeline = load_pipeline(settings)
    dataset = load_beir(SCIFACT, "test")
    depths = [10, 20, 30, 50, 75, 100]
    points = []
    for depth in depths:
        spec = {"hybrid@depth": {"mode": "hybrid", "rerank": False, "candidates": depth}}
        rows, _ = run_pipelines(pipeline, dataset, ["hybrid@depth"], k=min(100, depth), specs=spec, progress=True)
        points.append((depth, rows[0].metrics["ndcg@10"], rows[0].latency_ms_p50))
        print(points[-1], flush=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[2] for p in points], [p[1] for p in points], marker="o")
    for d, n, lat in points:
        ax.annotate(str(d), (lat, n), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("p50 latency per query (ms)")
    ax.set_ylabel("nDCG@10")
    what = "fusion candidates per retriever (no reranker)"
    ax.set_title(f"SciFact: quality vs latency by {what}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return [f"| {d} | {n:.4f} | {lat:.1f} |" for d, n, lat in points], what


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=ROOT / "var" / "eval" / "scifact-test" / "results.json")
    args = parser.parse_args()
    docs = ROOT / "docs"
    summary = quality_plot(args.results, docs / "quality.png")
    bundle = args.bundle or ROOT / "var" / "eval" / "scifact"
    rows, what = fusion_depth_plot(bundle, docs / "fusion_depth.png")
    body = "\n".join(
        [
            f"![quality](quality.png) ![fusion depth](fusion_depth.png)\n\nQuality plot from `{args.results.relative_to(ROOT)}`: {summary}.",
            "",
            f"Trade-off sweep over {what}:",
            "",
            "| depth | nDCG@10 | p50 ms/query |",
            "|---:|---:|---:|",
            *rows,
        ]
    )
    append_report("Plots (bench/plots.py)", body)


if __name__ == "__main__":
    main()
