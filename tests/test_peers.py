"""bench/peers.py's harness on a tiny corpus with Sift alone (no peer: installing one takes minutes and the
package registry): the runner protocol, the scoring with ir-measures and the report's rows; a peer that fails
is shown with its error. The peers themselves run in `python bench/peers.py` (docs/benchmarks.md)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, ROOT

sys.path.insert(0, str(ROOT))

from bench import peers  # noqa: E402

QUERIES = {  # a query each, judged against the example corpus's one document about it
    "q1": ("how do stars form inside gas clouds", "astro-001"),
    "q2": ("why is the planet Mars red", "astro-007"),
    "q3": ("how do vaccines train the immune system", "bio-003"),
    "q4": ("how does a hash table look up a key", "comp-003"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("beir")
    folder = data / "examples"
    (folder / "qrels").mkdir(parents=True)
    shutil.copy(EXAMPLES, folder / "corpus.jsonl")
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, (t, _) in QUERIES.items())
    )
    qrels = "".join(f"{q}\t{doc}\t1\n" for q, (_, doc) in QUERIES.items())
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return data


def test_the_harness_measures_sift_on_a_tiny_corpus(tiny, tmp_path, capsys) -> None:
    [sift] = peers.main(
        [
            "--peers",
            "",
            "--datasets",
            "examples",
            "--data",
            str(tiny),
            "--work",
            str(tmp_path),
            "--no-report",
            "--no-serving",
            "--throughput-queries",
            "4",
            "--concurrency",
            "2",
        ]
    )
    assert sift.system == "sift" and sift.error is None and sift.result is not None
    result = sift.result
    assert result["documents"] == 147
    assert result["build_s"] > 0 and result["index_bytes"] > 100_000 and result["build_peak_rss_mb"] > 100
    assert set(result["configs"]) == {"first stage", "reranked"}
    for name, config in result["configs"].items():
        assert config["errors"] == 0, config["error_samples"]
        assert config["latency_ms"]["n"] == len(QUERIES) and config["latency_ms"]["p50"] > 0
        assert config["throughput"]["queries"] == 4 and config["throughput"]["qps"] > 0
        assert set(config["runs"]) == set(QUERIES)
        # every query's judged document is found, at or near the top
        assert sift.metrics[name]["recall@100"] == 1.0
        assert sift.metrics[name]["ndcg@10"] >= 0.9, sift.metrics
    assert result["configs"]["reranked"]["rerank_depth"] == 12
    assert result["configs"]["first stage"]["rerank_depth"] == 0
    printed = capsys.readouterr().out
    assert "| sift | reranked (depth 12) | " in printed and "| sift | first stage (depth 0) | " in printed


def test_a_failed_peer_is_reported_with_its_error_and_fails_the_goal() -> None:
    runs = {q: [doc] for q, (_, doc) in QUERIES.items()}
    config = {
        "rerank_depth": 12,
        "runs": runs,
        "latency_ms": {"p50": 100.0, "p95": 120.0, "n": 4},
        "throughput": {"qps": 5.0, "queries": 4, "concurrency": 2},
        "errors": 0,
        "error_samples": [],
    }
    result = {"configs": {"reranked": config}, "build_s": 10.0, "index_bytes": 1e6, "build_peak_rss_mb": 900.0}
    sift = peers.Outcome("sift", "examples", result, None, {"reranked": {"ndcg@10": 1.0, "recall@100": 1.0}})
    broken = peers.Outcome(
        "txtai", "examples", None, "install: `pip install txtai==9.14.0` failed: no matching distribution"
    )
    lines = peers.table([sift, broken], "examples")
    assert any(line.startswith("| txtai | failed: install: `pip install txtai==9.14.0` failed") for line in lines)
    rows = peers.goals([sift, broken], ["examples"])
    assert [row["holds"] for row in rows] == ["no", "no"]  # a peer that did not run is not beaten
    assert "txtai failed" in rows[0]["figure"]


def _outcome(system: str, ndcg: float, recall: float, p50: float, build_s: float) -> peers.Outcome:
    config = {
        "rerank_depth": 12,
        "runs": {},
        "latency_ms": {"p50": p50, "p95": p50, "n": 4},
        "throughput": {"qps": 1000 / p50, "queries": 4, "concurrency": 2},
        "errors": 0,
        "error_samples": [],
    }
    result = {"configs": {"reranked": config}, "build_s": build_s, "index_bytes": 2e6, "build_peak_rss_mb": 900.0}
    return peers.Outcome(system, "examples", result, None, {"reranked": {"ndcg@10": ndcg, "recall@100": recall}})


def test_the_section_names_each_column_a_peer_wins_and_why() -> None:
    sift = _outcome("sift", 0.73, 0.94, 80.0, 370.0)
    faster_build = _outcome("lancedb", 0.72, 0.955, 200.0, 185.0)  # wins Recall@100 and build time only
    behind = _outcome("haystack", 0.68, 0.90, 360.0, 400.0)  # wins nothing
    lines = peers.wins([sift, faster_build, behind], ["examples"])
    assert lines == [
        f"- examples, Recall@100: lancedb 0.9550 vs Sift 0.9400. Why: {peers.WHY['Recall@100']}.",
        f"- examples, build s: lancedb 185.0 vs Sift 370.0. Why: {peers.WHY['build s']}.",
    ]
    assert peers.wins([sift, behind], ["examples"]) == []


def test_paired_comparison_tells_a_real_lead_from_noise() -> None:
    queries = [f"q{i}" for i in range(200)]
    base = {q: (i % 10) / 10 for i, q in enumerate(queries)}
    lead = {q: v + 0.05 for q, v in base.items()}  # better on every query
    real = peers.paired(lead, base)
    assert real["better"] == 200 and real["worse"] == 0 and real["mean_diff"] == pytest.approx(0.05)
    assert real["p"] < 0.001 and real["low"] == pytest.approx(0.05) and real["high"] == pytest.approx(0.05)
    swapped = {q: base[queries[(i + 1) % 200]] for i, q in enumerate(queries)}  # same mean, other queries
    noise = peers.paired(swapped, base)
    assert noise["mean_diff"] == pytest.approx(0.0) and noise["p"] > 0.5
    assert noise["low"] < 0 < noise["high"] and noise["better"] + noise["worse"] == 200


def test_the_quality_profile_names_the_goal_and_its_significance() -> None:
    queries = [f"q{i}" for i in range(100)]
    sift = _outcome("sift", 0.5, 0.9, 80.0, 300.0)
    peer = _outcome("lancedb", 0.51, 0.9, 200.0, 200.0)
    sift.per_query["reranked"] = {q: (0.6 if i % 2 else 0.4) for i, q in enumerate(queries)}
    peer.per_query["reranked"] = {q: (0.4 if i % 2 else 0.62) for i, q in enumerate(queries)}
    [line] = peers.profile([sift, peer], ["examples"])
    assert line.startswith("- examples, goal does not hold: Sift's default 0.5000 vs lancedb reranked 0.5100.")
    assert "Sift ranks better on 50, worse on 50; mean difference -0.0100" in line
    assert "within query-sampling noise" in line


def test_a_peer_without_a_reranker_is_compared_on_quality_only() -> None:
    sift = _outcome("sift", 0.73, 0.94, 80.0, 370.0)
    reranking = _outcome("lancedb", 0.72, 0.95, 200.0, 185.0)
    first_only = _outcome("pyserini", 0.70, 0.96, 20.0, 60.0)
    first_only.result["configs"] = {"first stage": {**first_only.result["configs"]["reranked"], "rerank_depth": 0}}
    first_only.metrics = {"first stage": first_only.metrics["reranked"]}
    quality, latency = peers.goals([sift, reranking, first_only], ["examples"])
    assert quality["figure"] == "0.7300 vs lancedb 0.7200, pyserini 0.7000" and quality["holds"] == "yes"
    assert latency["figure"] == "80 ms vs lancedb 200" and latency["holds"] == "yes"
    assert not peers.PEERS["pyserini"].reranks and all(p.reranks for n, p in peers.PEERS.items() if n != "pyserini")
