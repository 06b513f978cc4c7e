"""The README's quality and QA tables are the pinned figures (configs/regression/*.yaml), so that a hand-copied
number cannot drift from what `make test` checks: each cell must equal its pin at the precision it is shown.
Its "Sift vs peers" table is the latest `python bench/peers.py` section of docs/benchmarks.md, in the same way."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
SCIFACT = yaml.safe_load((ROOT / "configs" / "regression" / "scifact.yaml").read_text())
SQUAD = yaml.safe_load((ROOT / "configs" / "regression" / "squad_qa.yaml").read_text())


def table(header: str) -> dict[str, list[str]]:
    """The README table whose header row starts with `header`: first cell (bold marks dropped) → other cells."""
    lines = README[README.index(f"| {header}") :].splitlines()
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace("**", "") for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def row(rows: dict[str, list[str]], prefix: str) -> list[str]:
    [match] = [cells for name, cells in rows.items() if name.startswith(prefix)]
    return match


def shown(cell: str, pinned: float) -> None:
    """`cell`'s first number equals `pinned` rounded to the decimals the cell shows."""
    number = re.search(r"\d+(?:\.\d+)?", cell.replace(",", "")).group(0)
    decimals = len(number.split(".")[1]) if "." in number else 0
    assert abs(float(number) - pinned) <= 0.5 * 10**-decimals + 1e-9, f"README shows {number}, pinned {pinned}"


@pytest.mark.parametrize(
    ("prefix", "ndcg", "recall"),
    [
        ("BM25", ("pipelines", "bm25"), ("pipelines", "bm25")),
        ("dense", ("pipelines", "dense"), ("pipelines", "dense")),
        ("hybrid (RRF", ("pipelines", "hybrid"), ("pipelines", "hybrid")),
        # reranking the top 12 leaves Recall@100 to the first stage
        ("default: hybrid + second stage", ("second_stage", "default"), ("pipelines", "hybrid")),
        ("hybrid + MaxSim only", ("second_stage", "maxsim_0.5_top20"), ("pipelines", "hybrid")),
        ("hybrid + shipped cross-encoder only", ("second_stage", "cross_encoder_0.5_top20"), ("pipelines", "hybrid")),
    ],
)
def test_quality_table_is_the_scifact_pins(prefix, ndcg, recall):
    cells = row(table("pipeline | nDCG@10"), prefix)
    section, name = ndcg
    pinned = SCIFACT["pipelines"][name]["ndcg@10"]["pinned"] if section == "pipelines" else None
    shown(cells[0], pinned if pinned is not None else SCIFACT[section]["pinned"][name]["ndcg@10"])
    shown(cells[1], SCIFACT["pipelines"][recall[1]]["recall@100"]["pinned"])


@pytest.mark.parametrize("mode", ["generative", "extractive", "extract-then-generate"])
def test_qa_table_is_the_squad_pins(mode):
    cells = row(table("answer mode"), mode)
    pins = SQUAD["modes"][mode]["full_sample"]
    gold, end_to_end = cells[0].split("/"), cells[1].split("/")
    shown(gold[0], pins["gold_context"]["exact_match"])
    shown(gold[1], pins["gold_context"]["f1"])
    shown(end_to_end[0], pins["end_to_end"]["exact_match"])
    shown(end_to_end[1], pins["end_to_end"]["f1"])
    shown(cells[2], pins["end_to_end"]["latency_ms_p50"])


def test_the_readme_names_the_shipped_answer_mode_and_its_validation_choice():
    validation = SQUAD["validation"]["end_to_end_f1"]
    best = max(validation, key=validation.get)
    assert yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["answer"]["mode"] == best
    assert f"**{best}**" in README


@pytest.mark.parametrize(("prefix", "pin"), [("SQuAD", "squad"), ("example corpus", "topics")])
def test_tagging_table_is_the_tagging_pins(prefix, pin):
    """README's zero-shot tagging table: half-1 macro-F1 of the tagger and of the cosine baseline, as
    bench/tagging.py pinned them (configs/regression/tagging.yaml)."""
    pins = yaml.safe_load((ROOT / "configs" / "regression" / "tagging.yaml").read_text())[pin]
    cells = row(table("labelled set (half 1) | tagger macro-F1"), prefix)
    shown(cells[0], 100 * pins["tagger_macro_f1"])
    shown(cells[1], 100 * pins["cosine_macro_f1"])


def peers_section() -> dict[str, dict[str, dict[str, list[float]]]]:
    """The latest "Sift vs peers" section of docs/benchmarks.md (written by bench/peers.py): dataset → system →
    configuration → [nDCG@10, Recall@100, p50, p95, q/s, errors, build s, index MB, build RSS]."""
    report = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    [*_, section] = [c for c in re.split(r"\n(?=## )", report) if c.startswith("## Sift vs peers (bench/peers.py)")]
    found: dict[str, dict[str, dict[str, list[float]]]] = {}
    parts = re.split(r"\n\*\*(scifact|cranfield)\*\*\n", section)
    for dataset, body in zip(parts[1::2], parts[2::2], strict=True):
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 11 and re.match(r"^(first stage|reranked) \(depth \d+\)$", cells[1]):
                numbers = [float(c.replace(",", "")) for c in cells[2:]]
                found.setdefault(dataset, {}).setdefault(cells[0], {})[cells[1].split(" (")[0]] = numbers
    return found


@pytest.mark.parametrize("peer", ["haystack", "txtai", "lancedb", "pyserini"])
def test_peers_table_is_the_latest_peers_run(peer):
    """Each peer's row of the README's "Sift vs peers" table: Sift's default nDCG@10 minus the peer's best
    configuration's on each set, and the peer's reranked p50 and build time over Sift's on SciFact, as the
    latest `python bench/peers.py` section of docs/benchmarks.md gives them."""
    measured = peers_section()
    names = {"haystack": "Haystack", "txtai": "txtai", "lancedb": "LanceDB", "pyserini": "Pyserini"}
    cells = row(table("peer (best configuration)"), names[peer])
    for column, dataset in enumerate(("scifact", "cranfield")):
        sift = measured[dataset]["sift"]["reranked"][0]
        best = max(config[0] for config in measured[dataset][peer].values())
        number = float(re.search(r"[−+-]\d+\.\d+", cells[column]).group(0).replace("−", "-"))
        assert number == pytest.approx(sift - best, abs=0.0005 + 1e-9), f"{peer} {dataset}: README {number}"
    sift, theirs = measured["scifact"]["sift"], measured["scifact"][peer]
    if "reranked" in theirs:
        shown(cells[2], theirs["reranked"][2] / sift["reranked"][2])
    else:
        assert "no reranker" in cells[2]
    shown(cells[3], theirs["first stage"][6] / sift["first stage"][6])


def test_adaptation_table_is_the_adaptation_pins():
    """The README's "Adapt the bi-encoder" table: each dataset's two rows (shipped encoder, adapted) are what
    bench/encoder_adaptation.py pinned from its runs (configs/regression/encoder_adaptation.yaml)."""
    pins = yaml.safe_load((ROOT / "configs" / "regression" / "encoder_adaptation.yaml").read_text())
    rows = table("corpus (test qrels: read only to report)")
    assert len(rows) == 2 * len(pins)
    for name, pin in pins.items():
        for label, key in (("shipped", "base"), ("adapted", "adapted")):
            cells = row(rows, f"{name}, {label}")
            for cell, pipeline in zip(cells, ("bm25", "dense", "hybrid", "hybrid+rerank"), strict=False):
                shown(cell, pin[key][pipeline])
        shown(row(rows, f"{name}, adapted")[4], pin["training"]["pairs_per_s"])


def test_collection_choice_table_is_its_pins():
    """The README's "Choose the second stage for your collection" table: each collection's hybrid, global
    default and per-collection figures are what bench/collection_second_stage.py pinned from its run
    (configs/regression/collection_second_stage.yaml), and the choice it shows is the one recorded."""
    pins = yaml.safe_load((ROOT / "configs" / "regression" / "collection_second_stage.yaml").read_text())
    rows = table("collection (test qrels: read only to report)")
    assert set(rows) == set(pins)
    for name, pin in pins.items():
        cells = rows[name]
        for cell, key in zip(cells, ("hybrid", "global_default", "chosen"), strict=False):
            shown(cell, pin[key])
        assert f"depth {pin['choice']['depth']}" in cells[3]


def test_shipped_encoder_table_is_its_pins():
    """The README's "A general encoder trained on shippable data" table: each set's rows (the shipped
    all-MiniLM-L6-v2 and the encoder trained on SciFact train + SQuAD 0–7) are what bench/shipped_encoder.py
    pinned from its run (configs/regression/shipped_encoder.yaml), in the metric the row names."""
    pins = yaml.safe_load((ROOT / "configs" / "regression" / "shipped_encoder.yaml").read_text())
    rows = table("set, bi-encoder")
    assert len(rows) == 2 * len(pins["sets"])
    for name, both in pins["sets"].items():
        for label in ("shipped", "trained"):
            role, metric, *cells = row(rows, f"{name}, {label}")
            assert role in ("validation", "test (report only)")
            key = {"MRR@10": "mrr@10", "nDCG@10": "ndcg@10"}[metric]
            for cell, pipeline in zip(cells, ("bm25", "dense", "hybrid", "hybrid+rerank"), strict=True):
                shown(cell, both[label][pipeline][key])


def test_retrained_cross_encoder_table_is_its_pins():
    """The README's "The cross-encoder retrained with a teacher" table: each set's hybrid and default (with the
    shipped and with the retrained cross-encoder) are what bench/reranker_teacher.py pinned from its run
    (configs/regression/reranker_teacher.yaml), in the metric the row names."""
    pins = yaml.safe_load((ROOT / "configs" / "regression" / "reranker_teacher.yaml").read_text())
    rows = table("set, cross-encoder retrained with a teacher")
    assert len(rows) == len(pins["sets"])
    for name, both in pins["sets"].items():
        role, metric, hybrid, shipped, teacher = row(rows, name)
        assert role in ("validation", "test (report only)")
        key = {"MRR@10": "mrr@10", "nDCG@10": "ndcg@10"}[metric]
        assert both["teacher"]["hybrid"] == both["shipped"]["hybrid"]  # the same bundle under both
        shown(hybrid, both["shipped"]["hybrid"][key])
        shown(shipped, both["shipped"]["hybrid+rerank"][key])
        shown(teacher, both["teacher"]["hybrid+rerank"][key])
