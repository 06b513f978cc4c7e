"""SQuAD scoring: the official normalisation, EM and F1, and the fixed held-out split and sample."""

from __future__ import annotations

import pytest

from app.eval.qa import (
    EVAL_ARTICLES,
    clean_prediction,
    exact_match,
    f1,
    load_squad,
    normalize_answer,
    qa_scores,
    sample,
)
from tests.conftest import SHARED_DATA, SHARED_DATA_WORKER

pytestmark = SHARED_DATA_WORKER

SQUAD = SHARED_DATA / "squad" / "dev-v1.1.json"


def test_official_normalisation_em_and_f1():
    assert normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match("the Denver Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    assert exact_match("Broncos team", ["Denver Broncos"]) == 0.0
    assert f1("Denver Broncos team", ["Denver Broncos"]) == pytest.approx(0.8)
    assert f1("nothing shared", ["Denver Broncos"]) == 0.0
    assert clean_prediction("  the 1970s.\nmore text") == "the 1970s"


def test_generation_scores_are_perfect_for_exact_answers_and_zero_for_wrong():
    from app.eval.qa import SquadQuestion

    qs = [SquadQuestion("1", "q", ("Paris",), "c", 24, "p"), SquadQuestion("2", "q", ("in 1889", "1889"), "c", 24, "p")]
    perfect = qa_scores(["Paris", "1889"], qs)
    assert perfect["exact_match"] == 100.0 and perfect["f1"] == 100.0 and perfect["rouge_l"] == 100.0
    wrong = qa_scores(["London", "1900"], qs)
    assert wrong["exact_match"] == wrong["f1"] == wrong["rouge_l"] == 0.0


@pytest.mark.skipif(not SQUAD.exists(), reason=f"SQuAD dev not found at {SQUAD} (../shared/data is provided in CI)")
def test_sample_is_fixed_and_from_held_out_articles_only():
    questions = load_squad(SQUAD)
    assert len(questions) == 4874 and {q.article for q in questions} == set(EVAL_ARTICLES)
    first, second = sample(questions, 500), sample(questions, 500)
    assert [q.id for q in first] == [q.id for q in second] and len({q.id for q in first}) == 500
    train = load_squad(SQUAD, range(0, 24))
    assert not {q.id for q in train} & {q.id for q in first}
