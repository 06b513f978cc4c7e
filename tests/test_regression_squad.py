"""Pinned open-domain QA numbers for the local generator (SmolLM2-135M-Instruct) on the fixed SQuAD sample.
The full 500-question figures (from `sift eval qa`) and the CI subset's are in configs/regression/squad_qa.yaml."""

from __future__ import annotations

import pytest
import yaml

from app.eval.qa import (
    answer_questions,
    load_squad,
    qa_answerer,
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
from tests.conftest import ROOT, SHARED_DATA, SHARED_DATA_WORKER

SQUAD = SHARED_DATA / "squad" / "dev-v1.1.json"
PINNED = yaml.safe_load((ROOT / "configs" / "regression" / "squad_qa.yaml").read_text())
pytestmark = [
    SHARED_DATA_WORKER,
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


@pytest.mark.heavy
def test_local_generator_em_f1_on_ci_subset(squad_pipeline, questions, local_generator):
    subset = questions[: PINNED["ci_subset"]["questions"]]
    options = GenerationOptions(max_new_tokens=24, stop=["\n"])
    answerer = qa_answerer(squad_pipeline, "generative", generator=local_generator, passages=2)
    gold = qa_scores(answer_questions(answerer, subset, options, gold=True, progress=False)[0], subset)
    end_to_end = qa_scores(answer_questions(answerer, subset, options, gold=False, k=5, progress=False)[0], subset)
    print({"gold_context": gold, "end_to_end": end_to_end})
    close({k: gold[k] for k in ("exact_match", "f1")}, PINNED["ci_subset"]["gold_context"])
    close({k: end_to_end[k] for k in ("exact_match", "f1")}, PINNED["ci_subset"]["end_to_end"])


def test_shipped_extractive_reader_em_f1(squad_pipeline, questions):
    """The shipped reader (models/sift-reader-minilm-l6): gold paragraph on the full 500-question sample,
    end to end (hybrid top 5, best 3 passages read) on the CI subset."""
    from app.generation.reader import ExtractiveReader

    pins = PINNED["extractive"]
    reader = ExtractiveReader.load(str(ROOT / "models" / "sift-reader-minilm-l6"), "cpu")
    answerer = qa_answerer(squad_pipeline, "extractive", reader=reader, passages=pins["passages"])
    options = GenerationOptions()
    gold, _ = answer_questions(answerer, questions, options, gold=True, progress=False)
    close({k: v for k, v in qa_scores(gold, questions).items() if k in ("exact_match", "f1")}, pins["gold_context"])
    subset = questions[: pins["ci_subset"]["questions"]]
    end_to_end, _ = answer_questions(answerer, subset, options, gold=False, k=5, progress=False)
    scores = qa_scores(end_to_end, subset)
    close({k: scores[k] for k in ("exact_match", "f1")}, pins["ci_subset"]["end_to_end"])
