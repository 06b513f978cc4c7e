"""Reranker training: data sources respect the held-out splits, and a few steps on a tiny slice learn."""

from __future__ import annotations

import random

import numpy as np
import pytest

from app.training.reranker import (
    Group,
    Mining,
    TrainConfig,
    group_scores,
    load_cross_encoder,
    pseudo_query_groups,
    squad_groups,
    train,
)
from tests.conftest import EXAMPLES, SHARED_DATA, SHARED_DATA_WORKER

pytestmark = SHARED_DATA_WORKER


def test_pseudo_queries_come_from_the_corpus_with_mined_negatives():
    groups = pseudo_query_groups(EXAMPLES, Mining(hard=1, easy=1), rng=random.Random(0), limit=20)
    assert len(groups) == 20
    for g in groups:
        assert g.query not in g.positive and len(g.negatives) == 2 and g.positive not in g.negatives


@pytest.mark.skipif(not (SHARED_DATA / "squad").exists(), reason="SQuAD dev not found under ../shared/data")
def test_squad_held_out_articles_are_refused():
    with pytest.raises(ValueError, match="24–47 are held out"):
        squad_groups(SHARED_DATA / "squad" / "dev-v1.1.json", range(20, 30), Mining(1, 1), random.Random(0), 10)


def test_beir_test_split_is_refused(tmp_path):
    from app.training.reranker import beir_groups

    with pytest.raises(ValueError, match="refusing to train on a test split"):
        beir_groups(tmp_path, "test", Mining(1, 1), random.Random(0))


def wins(model, groups: list[Group]) -> float:
    """Share of (positive, hard negative) pairs the model orders correctly."""
    return float(np.mean([s[0] > s[1] for s in group_scores(model, groups)]))


def tiny_config(out, **overrides) -> TrainConfig:  # noqa: ANN001
    """A few CPU steps on the example corpus: batches of 4 groups, no warm-up, no checkpoints."""
    return TrainConfig(
        **{"out": out, "batch_size": 4, "warmup": 0.0, "checkpoint_every": 0, "device": "cpu", **overrides}
    )


@pytest.mark.heavy
def test_a_few_steps_make_the_loss_fall_and_rank_positives_higher(tmp_path):
    groups = pseudo_query_groups(EXAMPLES, Mining(hard=1, easy=1), rng=random.Random(1), limit=16)
    config = tiny_config(tmp_path / "ce", max_length=64, epochs=5, lr=3e-4, validation=0.0)
    untrained = load_cross_encoder(config.base, config.max_length, "cpu")
    before = wins(untrained, groups)
    state = train(groups, config, progress=False)
    losses = state["losses"]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) * 0.7, (losses[:4], losses[-4:])
    trained = load_cross_encoder(str(tmp_path / "ce"), config.max_length, "cpu")
    after = wins(trained, groups)
    assert after > before and after >= 0.8, (before, after)


def test_several_pseudo_queries_per_document_are_distinct_sentences():
    groups = pseudo_query_groups(EXAMPLES, Mining(hard=1, easy=0), rng=random.Random(2), limit=None, per_document=2)
    single = pseudo_query_groups(EXAMPLES, Mining(hard=1, easy=0), rng=random.Random(2), limit=None, per_document=1)
    assert len(single) < len(groups) <= 2 * len(single)
    assert len({g.query for g in groups}) == len(groups), "a sentence was used twice as a query"


def test_validation_runs_every_n_steps_and_keeps_the_best(tmp_path):
    groups = pseudo_query_groups(EXAMPLES, Mining(hard=1, easy=1), rng=random.Random(3), limit=24)
    config = tiny_config(tmp_path / "ce", max_length=48, epochs=1, lr=2e-4, validation=0.25, validate_every=2)
    state = train(groups, config, progress=False)
    steps = [h["step"] for h in state["history"]]
    assert steps == [0, 2, 4, 5], steps  # 18 training groups / 4 per step = 5 steps; the last one validated too
    assert state["best"] == max(h["ndcg@10"] for h in state["history"][1:])
    assert (tmp_path / "ce" / "model.safetensors").exists()


def test_half_precision_export_halves_the_file_and_loads_in_float32_with_the_same_scores(tmp_path):
    import shutil

    from app.retrieval.reranker import Reranker
    from app.training.reranker import save_half_precision

    full = tmp_path / "fp32"
    load_cross_encoder(TrainConfig().base, 128, "cpu").save(str(full))
    half = tmp_path / "fp16"
    shutil.copytree(full, half)
    before = (half / "model.safetensors").stat().st_size
    after = save_half_precision(half)
    assert 0.45 < after / before < 0.55, (before, after)
    pairs = [("how do stars form?", "Stars form in cold dense clouds of gas."), ("tides", "The moon pulls the sea.")]
    reference = Reranker.load(str(full), 128, "cpu")
    shipped = Reranker.load(str(half), 128, "cpu")
    assert {p.dtype for p in shipped.model.model.parameters()} == {__import__("torch").float32}
    np.testing.assert_allclose(shipped.score(pairs), reference.score(pairs), atol=2e-2)


def test_dense_mining_adds_bi_encoder_negatives_that_are_close_to_the_query(encoder):
    import json

    from app.training.reranker import PassagePool

    records = [json.loads(line) for line in open(EXAMPLES, encoding="utf-8")]
    pool = PassagePool([r["_id"] for r in records], [r["text"] for r in records], encoder)
    query, positive = records[0]["text"].split(". ")[0], records[0]["_id"]
    rng = random.Random(4)
    dense = pool.dense_negatives(query, {positive}, 3, rng)
    assert len(dense) == 3 and records[0]["text"] not in dense
    q = encoder.encode([query], normalize_embeddings=True)[0]
    similarity = pool._embeddings @ q
    texts = [r["text"] for r in records]
    mined = np.mean([similarity[texts.index(t)] for t in dense])
    assert mined > np.median(similarity) + 0.1, (mined, np.median(similarity))  # harder than a typical passage
    mixed = pool.negatives(query, {positive}, Mining(hard=2, dense=2, easy=1), rng)
    assert len(mixed) == 5 and len(set(mixed)) == 5 and records[0]["text"] not in mixed


SHIPPED_RERANKER = "models/sift-reranker-minilm-l6"


def margin_error(model, scored) -> float:  # noqa: ANN001
    """Mean squared gap between the model's logit margins (positive minus each negative) and the teacher's."""
    scores = group_scores(model, [s.group for s in scored])
    gaps = [(s[0] - s[1:]) - np.asarray(t.margins) for s, t in zip(scores, scored)]
    return float(np.mean(np.concatenate(gaps) ** 2))


@pytest.mark.heavy  # two short training runs (~45 s); the command-line test below trains with a teacher in make test
def test_the_teacher_scores_logits_and_its_margins_pull_the_student_towards_it(encoder, tmp_path):
    """`--teacher`: the configured second stage (the shipped cross-encoder and MaxSim) scores every pair in
    logits, its margins are put on the student's logit spread, and the Margin-MSE term keeps the student's
    margins near the teacher's over steps that move them far away without it. Without margins a positive
    weight is refused."""
    from app.settings import load_settings
    from app.training.common import pairs_of
    from app.training.teacher import Teacher, margins_on_scale, z

    groups = pseudo_query_groups(EXAMPLES, Mining(hard=1, easy=1), rng=random.Random(6), limit=16)
    teacher = Teacher.from_settings(load_settings().reranker, encoder, "cpu")
    assert set(teacher.weights) == {"cross_encoder", "maxsim"}
    raw = teacher.stage_scores(pairs_of(groups), progress=False)
    student = load_cross_encoder(SHIPPED_RERANKER, 128, "cpu")
    own = np.concatenate(group_scores(student, groups))
    np.testing.assert_allclose(raw["cross_encoder"], own, atol=1e-3)  # logits, not sigmoid probabilities
    assert own.min() < 0 < own.max()
    scored = margins_on_scale(groups, z(teacher.fuse(raw)), own)
    margins = np.concatenate([s.margins for s in scored])
    assert np.mean(margins > 0) >= 0.8 and abs(float(np.std(margins)) - float(np.std(own))) < float(np.std(own))
    assert 0 < margin_error(student, scored) < float(np.var(own))  # close to the student's own view, not equal
    config = tiny_config(tmp_path / "ce", base=SHIPPED_RERANKER, max_length=128, epochs=4, lr=1e-4, validation=0.0)
    with pytest.raises(ValueError, match="needs a teacher's margins"):
        train(groups, TrainConfig(**{**config.__dict__, "margin_weight": 1.0}), progress=False)
    after = {}
    for weight in (0.0, 1.0):  # the same steps on the same groups, with and without the teacher's term
        out = tmp_path / f"ce-{weight}"
        state = train(scored, TrainConfig(**{**config.__dict__, "out": out, "margin_weight": weight}), progress=False)
        assert state["margin_weight"] == weight and state["pairs_per_s"] > 0
        after[weight] = margin_error(load_cross_encoder(str(out), 128, "cpu"), scored)
    # listwise alone inflates the margins far from the teacher's; the Margin-MSE term holds them near it
    assert after[1.0] < 0.3 * after[0.0], after


def test_reranker_train_with_a_teacher_from_the_command_line(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "ce"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "app.cli", "reranker", "train", "--out", str(out), "--base", SHIPPED_RERANKER),
            *("--pseudo", str(EXAMPLES), "--pseudo-limit", "12", "--hard-negatives", "1", "--easy-negatives", "1"),
            *("--teacher", "--margin-weight", "0.5", "--max-length", "64", "--batch-size", "4", "--validation", "0.25"),
            *("--checkpoint-every", "0", "--device", "cpu"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "teacher: {'cross_encoder': 'models/sift-reranker-minilm-l6'" in done.stdout
    log = json.loads((out / "training_log.json").read_text())
    assert log["margin_weight"] == 0.5 and log["train_groups"] == 9 and log["pairs_per_s"] > 0
    assert [h["step"] for h in log["history"]] == [0, 3]
    assert (out / "model.safetensors").exists() and not (out / "checkpoint").exists()
