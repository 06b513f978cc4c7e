"""Pinned open-domain QA numbers for the local generator (SmolLM2-135M-Instruct) on the fixed SQuAD sample.
The full 500-question figures (from `sift eval qa`) and the CI subset's are in configs/regression/squad_qa.yaml."""

from __future__ import annotations

import pytest
import yaml

from app.answering import PromptTemplate
from app.eval.qa import (
    EXTRACTIVE_TEMPLATE,
    answer_end_to_end,
    answer_with_gold,
    extractive_reader,
    load_squad,
    qa_scores,
    retrieval_qa,
    retrieve_hits,
    sample,
    sample_fingerprint,
    squad_bundle,
)
from app.generation import GenerationOptions
from app.services import load_pipeline
from app.settings import load_settings
from tests.conftest import ROOT, SHARED_DATA

SQUAD = SHARED_DATA / "squad" / "dev-v1.1.json"
PINNED = yaml.safe_load((ROOT / "configs" / "regression" / "squad_qa.yaml").read_text())
pytestmark = [
    pytest.mark.skipif(not SQUAD.exists(), reason=f"SQuAD dev not found at {SQUAD} (../shared/data is provided in CI)"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def questions():
    return sample(load_squad(SQUAD), PINNED["sample"])


@pytest.fixture(scope="module")
def squad_pipeline(tmp_path_factory):
    index = squad_bundle(SQUAD, tmp_path_factory.mktemp("squad") / "index", load_settings().index)
    return load_pipeline(load_settings(bundle=index, reranker={"model": None}))  # pins were measured first-stage


def close(got: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=PINNED["tolerance"]), f"{name}: {got[name]:.2f} vs pinned {value}"


def test_sample_fingerprint_is_pinned(questions):
    assert sample_fingerprint(questions) == PINNED["fingerprint"]


def test_retrieval_only_qa_on_the_full_sample(squad_pipeline, questions):
    hits = retrieve_hits(squad_pipeline, questions, 5, progress=False)
    close(retrieval_qa(questions, hits, (1, 5)), PINNED["retrieval"])


def test_local_generator_em_f1_on_ci_subset(squad_pipeline, questions, local_generator):
    subset = questions[: PINNED["ci_subset"]["questions"]]
    options = GenerationOptions(max_new_tokens=24, stop=["\n"])
    template = PromptTemplate.load(EXTRACTIVE_TEMPLATE)
    gold = qa_scores(answer_with_gold(local_generator, subset, template, options, progress=False), subset)
    reader = extractive_reader(squad_pipeline, local_generator, passages=2)
    end_to_end = qa_scores(answer_end_to_end(reader, subset, 5, options, progress=False), subset)
    print({"gold_context": gold, "end_to_end": end_to_end})
    close({k: gold[k] for k in ("exact_match", "f1")}, PINNED["ci_subset"]["gold_context"])
    close({k: end_to_end[k] for k in ("exact_match", "f1")}, PINNED["ci_subset"]["end_to_end"])
