"""Perplexity of a given reply under the local generator (`LocalGenerator.continuation_nll`) and the gold answer's
perplexity in `sift eval qa` (`app.eval.qa.gold_perplexity`), with the shipped SmolLM2-135M-Instruct."""

from __future__ import annotations

import math

import pytest

from app.eval.qa import SquadQuestion, gold_perplexity, qa_answerer
from app.generation.base import GenerationOptions, TextScorer
from app.generation.remote import OpenAICompatibleGenerator

ASK = [
    {"role": "system", "content": "Answer with a short phrase taken from the passage."},
    {
        "role": "user",
        "content": "Passage: The Eiffel Tower was completed in 1889 for the World's Fair in Paris.\n"
        "Question: When was the Eiffel Tower completed?",
    },
]


def per_token(scorer: TextScorer, text: str) -> float:
    nll, tokens = scorer.continuation_nll(ASK, text)
    return nll / tokens


def test_a_fitting_reply_is_likelier_than_an_unrelated_one(local_generator):
    nll, tokens = local_generator.continuation_nll(ASK, "1889")
    assert tokens == len(local_generator.tokenizer("1889", add_special_tokens=False)["input_ids"])
    assert nll > 0 and math.isfinite(nll)
    assert per_token(local_generator, "1889") < per_token(local_generator, "purple bicycles of Neptune")
    assert per_token(local_generator, "It was completed in 1889.") < per_token(
        local_generator, "It was completed in Neptune."
    )
    assert local_generator.continuation_nll(ASK, "") == (0.0, 0)


def test_the_greedy_reply_scores_as_its_own_log_likelihood(local_generator):
    """The reply greedy decoding produces, scored back, costs no more per token than the same reply with its
    first word swapped: the scoring sees the very prompt `generate` answers from."""
    reply = local_generator.generate(ASK, GenerationOptions(max_new_tokens=12)).text
    assert reply
    first, _, rest = reply.partition(" ")
    swapped = ("Neptune " + rest) if first != "Neptune" else ("Saturn " + rest)
    assert per_token(local_generator, reply) < per_token(local_generator, swapped)


QUESTIONS = [
    SquadQuestion(
        "q1",
        "When was the Eiffel Tower completed?",
        ("1889",),
        "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
        0,
        "p1",
    ),
    SquadQuestion(
        "q2",
        "What causes ocean tides?",
        ("the Moon's gravity",),
        "Ocean tides are caused mainly by the Moon's gravity pulling on the oceans.",
        0,
        "p2",
    ),
]


@pytest.fixture(scope="module")
def reader():
    from app.generation.reader import ExtractiveReader
    from tests.conftest import ROOT

    return ExtractiveReader.load(str(ROOT / "models" / "sift-reader-minilm-l6"), "cpu")


def test_gold_perplexity_per_mode(example_pipeline, local_generator, reader):
    generative = qa_answerer(example_pipeline, "generative", local_generator)
    scored = gold_perplexity(generative, QUESTIONS, gold=True, progress=False)
    assert scored["gold_ppl_questions"] == 2 and 1.0 < scored["gold_ppl"] < 1e4
    # a wrong "gold" answer is less likely under the same prompts
    wrong = [SquadQuestion(q.id, q.question, ("a purple bicycle",), q.context, 0, q.paragraph_id) for q in QUESTIONS]
    assert gold_perplexity(generative, wrong, gold=True, progress=False)["gold_ppl"] > scored["gold_ppl"]
    # the extractive mode has no language model to score with; neither has a remote generator
    extractive = qa_answerer(example_pipeline, "extractive", None, reader)
    assert gold_perplexity(extractive, QUESTIONS, gold=True, progress=False) == {
        "gold_ppl": None,
        "gold_ppl_questions": 0,
    }
    remote = OpenAICompatibleGenerator(base_url="http://127.0.0.1:9/v1", model="any")
    assert not isinstance(remote, TextScorer)
    assert gold_perplexity(
        qa_answerer(example_pipeline, "generative", remote), QUESTIONS, gold=True, progress=False
    ) == {"gold_ppl": None, "gold_ppl_questions": 0}


def test_extract_then_generate_scores_against_its_span_prompt(example_pipeline, local_generator, reader):
    answerer = qa_answerer(example_pipeline, "extract-then-generate", local_generator, reader)
    messages = answerer.generation_messages(answerer.given(QUESTIONS[0].question, [QUESTIONS_PASSAGE], render=False))
    assert messages is not None and "(Extracted answer:" in messages[-1]["content"]
    scored = gold_perplexity(answerer, QUESTIONS[:1], gold=True, progress=False)
    assert scored["gold_ppl_questions"] == 1 and math.isfinite(scored["gold_ppl"])


QUESTIONS_PASSAGE = {"doc_id": "p1", "passage_id": "p1", "title": "", "text": QUESTIONS[0].context}
