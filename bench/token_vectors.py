"""Compressed token vectors for MaxSim: which form, chosen on validation, and what it costs and gives.

    python bench/token_vectors.py [--forms int8,pq16,pq24,pq32,pq48] [--queries 200] [--runs 5]

1. Features: `app.training.second_stage` scores the hybrid top-100 of SciFact train (validation), SciFact test,
   Cranfield and SQuAD dev articles 24–47 (test) once with the cross-encoder and with MaxSim over int8 token
   vectors (cached under var/second_stage/; bundles with the shipped index config but int8 token vectors).
2. Each form: the int8 store of each bundle is converted with the converter `sift index convert` runs
   (`TokenWriter.add_stored`: the stored int8 rows and scales are what a pq writer spills, so they are copied
   and the codebook trains on them, the one a fresh build of the bundle trains; other forms decode them; the
   model never runs), cached under var/token_vectors/. Its MaxSim over the same candidates
   replaces the int8 one, and the default second stage (configs/default.yaml's depth and weights) is scored.
3. Selection on SciFact train only: the smallest form whose nDCG@10 is within 0.002 of int8's there. Test
   sets are reported, never chosen on; for the chosen form, the figures the README and
   configs/regression/scifact.yaml would quote with it (the default second stage, MaxSim alone at depth 20).
4. Cost: token-vector bytes per passage (files on disk / passages) and the MaxSim stage's latency in process
   (`TokenStore.maxsim` of the query's token vectors against the default depth's head of candidates, the first
   `--queries` SciFact train claims, forms interleaved, the median over `--runs` passes of each pass's p50).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, append_report  # noqa: E402

FEATURES = ROOT / "var" / "second_stage"
OUT = ROOT / "var" / "token_vectors"
VALIDATION = "scifact-train"
DATASETS = ("scifact-train", "cranfield", "scifact-test", "squad-a24-47")
MAX_DELTA = 0.002


def bundle_of(name: str) -> Path:
    """Where `app.training.second_stage.collect_all` keeps a dataset's bundle."""
    if name.startswith("squad"):
        return FEATURES / name / "index"
    return FEATURES / "bundles" / ("cranfield" if name == "cranfield" else "scifact")


def form_of(name: str) -> object:
    from indexer.tokens import TokenForm

    if name.startswith("opq"):
        return TokenForm("pq", int(name[3:]), rotate=True)
    if name.startswith("pq"):
        return TokenForm("pq", int(name[2:]), rotate=False)
    return TokenForm(name)  # type: ignore[arg-type]


def converted(bundle: Path, name: str) -> tuple[object, float]:
    """The bundle's token store in form `name` (int8: the bundle's own), and the seconds converting took."""
    from indexer.bundle import DENSE_DIR, open_bundle
    from indexer.tokens import TokenStore, TokenWriter

    info = open_bundle(bundle, verify=False)
    source = TokenStore.open(info.path(DENSE_DIR))
    if name == source.dtype:
        return source, 0.0
    folder = OUT / bundle.name / info.build_id / name
    seconds_file = folder / "seconds.txt"
    if not seconds_file.exists():
        t = time.perf_counter()
        with TokenWriter(folder, form_of(name)) as writer:  # type: ignore[arg-type]
            writer.add_stored(source, range(len(source.offsets) - 1))
            writer.close()
        seconds_file.write_text(f"{time.perf_counter() - t:.3f}\n")
    return TokenStore.open(folder, len(source.offsets) - 1), float(seconds_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forms", default="int8,pq32,opq32,pq48,opq48")
    parser.add_argument("--queries", type=int, default=200, help="SciFact train claims timed")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    forms = args.forms.split(",")
    if forms[0] != "int8":
        raise SystemExit("--forms must start with int8 (the baseline)")

    from app.services import Models, load_pipeline
    from app.settings import load_settings
    from app.training import second_stage as ss
    from indexer.tokens import TokenForm

    ss.collect_all(FEATURES, ROOT.parent / "shared", list(DATASETS))
    features = ss.load_features(FEATURES, list(DATASETS))
    shipped = load_settings()
    depth = shipped.reranker.depth
    weights = shipped.reranker.stage_weights(cross_encoder=True, maxsim=True)
    settings = load_settings(reranker={"maxsim": True, "model": "maxsim"}, runtime={"query_cache_size": 0})
    models = Models()
    metrics = {**ss.VALIDATION, **ss.TEST}

    quality: dict[str, dict[str, float]] = {name: {} for name in DATASETS}
    scored: dict[tuple[str, str], object] = {}  # (dataset, form) → features with that form's MaxSim
    sizes: dict[str, float] = {}
    conversion: dict[str, float] = {}
    timing: dict[str, list[float]] = {form: [] for form in forms}
    for name in DATASETS:
        bundle = bundle_of(name)
        pipeline = load_pipeline(settings, bundle, models, verify=False)
        assert pipeline.late is not None and pipeline.late.dense is not None
        f = features[name]
        questions = ss.dataset_queries(name, ROOT.parent / "shared", FEATURES)[0]
        texts = [questions[q] for q in f.qids]
        queries = pipeline.late.dense.query_tokens(texts)
        for form in forms:
            store, seconds = converted(bundle, form)
            if name == VALIDATION:
                sizes[form] = store.nbytes / (len(store.offsets) - 1)  # type: ignore[attr-defined]
                conversion[form] = seconds
            maxsim = [
                store.maxsim(q, [h.idx for h in hits[: ss.MAX_DEPTH]])  # type: ignore[attr-defined]
                for q, hits in zip(queries, f.ranked, strict=True)
            ]
            scored[(name, form)] = replace(f, maxsim=maxsim)
            quality[name][form] = ss.score(replace(f, maxsim=maxsim), depth, weights)[metrics[name]]
            print(f"{name} {form}: {metrics[name]} {quality[name][form]:.4f}", flush=True)
        if name == VALIDATION:
            stores = {form: converted(bundle, form)[0] for form in forms}
            heads = [[h.idx for h in hits[:depth]] for hits in f.ranked[: args.queries]]
            for _ in range(args.runs):
                for form in forms:
                    times = []
                    for q, rows in zip(queries, heads, strict=False):
                        t = time.perf_counter()
                        stores[form].maxsim(q, rows)  # type: ignore[attr-defined]
                        times.append((time.perf_counter() - t) * 1000)
                    timing[form].append(statistics.median(times))
        del pipeline

    base = {name: quality[name]["int8"] for name in DATASETS}
    within = [form for form in forms[1:] if abs(quality[VALIDATION][form] - base[VALIDATION]) <= MAX_DELTA]
    chosen = min(within, key=lambda form: sizes[form]) if within else None
    p50 = {form: statistics.median(v) for form, v in timing.items()}

    lines = [
        f"Token-vector forms for the default second stage (depth {depth}, weights "
        f"{', '.join(f'{k} {v:g}' for k, v in weights.items())}): each form's MaxSim replaces int8's over the "
        "same hybrid candidates, scored with the same cross-encoder scores. Selection on SciFact train only: the "
        f"smallest form within {MAX_DELTA} nDCG@10 of int8 there. Test sets (SciFact test, Cranfield, SQuAD dev "
        "articles 24–47) reported, never chosen on. pq<m>: product quantisation, m one-byte codes per token "
        f"(faiss k-means, 256 centroids per sub-space, trained on up to {TokenForm('pq').sample:,} tokens spread over the bundle); "
        "opq<m>: the same after a learned orthonormal rotation (faiss OPQ); both scored by table look-up. Bytes "
        "per passage: every token-vector file of the SciFact bundle (codes or vectors, scales, offsets, codebook, "
        "rotation) over its passages.",
        "",
        "| form | bytes/passage (SciFact) | × smaller than int8 | SciFact train nDCG@10 (Δ) | Cranfield nDCG@10 (Δ) "
        "| SciFact test nDCG@10 (Δ) | SQuAD 24–47 MRR@10 (Δ) | MaxSim p50 ms (× int8) | conversion s (SciFact) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for form in forms:
        cells = [f"{quality[n][form]:.4f} ({quality[n][form] - base[n]:+.4f})" for n in DATASETS]
        lines.append(
            f"| {form}{' (chosen)' if form == chosen else ''} | {sizes[form]:,.0f} | "
            f"{sizes['int8'] / sizes[form]:.1f} | {' | '.join(cells)} | {p50[form]:.2f} "
            f"({p50[form] / p50['int8']:.2f}) | {conversion[form]:.1f} |"
        )
    lines += [
        "",
        f"MaxSim p50: `TokenStore.maxsim` over the top {depth} candidates of the first {args.queries} SciFact train "
        f"claims, in process, forms interleaved, median of {args.runs} passes (pass p50s: "
        + "; ".join(f"{form} {', '.join(f'{v:.2f}' for v in timing[form])}" for form in forms)
        + ").",
    ]
    summary = []
    if chosen is not None:
        test = scored[("scifact-test", chosen)]
        readme = {
            "default": ss.score(test, depth, weights)["ndcg@10"],  # type: ignore[arg-type]
            "maxsim_0.5_top20": ss.score(test, 20, {"first_stage": 0.5, "maxsim": 0.5})["ndcg@10"],  # type: ignore[arg-type]
        }
        hybrid = {n: ss.score(features[n], None, None)[metrics[n]] for n in ("cranfield", "squad-a24-47")}
        lines += [
            "",
            f"With {chosen} (what the README's MaxSim rows and its SQuAD and Cranfield figures would read with it): "
            "SciFact test "
            f"default {readme['default']:.4f}, MaxSim alone (top 20, 50/50) {readme['maxsim_0.5_top20']:.4f}; "
            f"hybrid → default: SQuAD dev articles 24–47 MRR@10 {hybrid['squad-a24-47']:.3f} → "
            f"{quality['squad-a24-47'][chosen]:.3f}, Cranfield nDCG@10 {hybrid['cranfield']:.4f} → "
            f"{quality['cranfield'][chosen]:.4f}.",
        ]
        ratio = sizes["int8"] / sizes[chosen]
        summary = [
            {
                "claim": f"{chosen} token vectors: bytes per passage vs int8 (SciFact)",
                "figure": f"{ratio:.1f}× smaller",
                "target": "≥ 8×",
                "holds": "yes" if ratio >= 8 else "no",
            },
            {
                "claim": f"{chosen} token vectors: default second stage nDCG@10 vs int8 (SciFact train / Cranfield)",
                "figure": f"{quality['scifact-train'][chosen] - base['scifact-train']:+.4f} / "
                f"{quality['cranfield'][chosen] - base['cranfield']:+.4f}",
                "target": f"within {MAX_DELTA}",
                "holds": "yes"
                if all(abs(quality[n][chosen] - base[n]) <= MAX_DELTA for n in ("scifact-train", "cranfield"))
                else "no",
            },
            {
                "claim": f"{chosen} token vectors: MaxSim stage p50 in process vs int8",
                "figure": f"{p50[chosen]:.2f} vs {p50['int8']:.2f} ms",
                "target": "not slower",
                "holds": "yes" if p50[chosen] <= p50["int8"] else "no",
            },
        ]
    append_report("Compressed token vectors (MaxSim)", "\n".join(lines), summary)
    print(f"chosen: {chosen}")


if __name__ == "__main__":
    main()
