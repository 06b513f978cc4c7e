"""`sift encoder train`: label-free adaptation of the bi-encoder. A few CPU steps on the example corpus raise
the held-out pseudo-query score; the teacher's margins point the right way; a build made with the adapted
model records it, and the server encodes queries with it."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from app.training.encoder import Scored, Teacher, score_groups, split_validation, validate, validation_pool
from app.training.reranker import Group, Mining, pseudo_query_groups
from tests.conftest import EXAMPLES, ROOT, SCIFACT, needs_scifact

SIFT = [sys.executable, "-m", "app.cli"]


def sift(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [*SIFT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


SLICE = 400  # SciFact abstracts the short run adapts to (the example corpus, 147 notes, is too small to learn from)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A short adaptation run through the CLI on the first SLICE SciFact abstracts, label free (teacher on: the
    shipped cross-encoder and MaxSim), validating every 4 steps on 40 held-out pseudo-queries."""
    folder = tmp_path_factory.mktemp("encoder")
    corpus = folder / "corpus.jsonl"
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as source:
        corpus.write_text("".join(line for _, line in zip(range(SLICE), source)))
    out = folder / "adapted"
    done = sift(
        "encoder", "train", "--pseudo", str(corpus), "--out", str(out), "--pseudo-limit", "160",
        "--max-length", "128", "--batch-size", "8", "--lr", "5e-5", "--validation", "0.25",
        "--validation-pool", str(SLICE), "--validate-every", "4", "--seed", "3", "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "training_log.json").read_text()), done.stdout


@needs_scifact
def test_a_few_steps_raise_the_held_out_pseudo_query_score(adapted):
    out, report, stdout = adapted
    history = report["history"]
    assert [h["step"] for h in history] == [0, 4, 8, 12, 15], history
    base, best = history[0]["mrr@10"], max(h["mrr@10"] for h in history)
    assert best > base + 0.01, history
    assert report["best_step"] > 0 and report["best"] == pytest.approx(best)
    assert report["train_groups"] == 120 and report["validation_groups"] == 40
    assert (
        report["validation_pool"] <= SLICE and report["pairs"] == 120 * 3
    )  # a query with its positive and 2 negatives
    assert report["pairs_per_s"] > 0 and report["train_s"] > 0
    assert report["teacher"]["weights"] == {"cross_encoder": 0.45, "maxsim": 0.3}
    assert "saved the best model" in stdout and "SIFT_INDEX__DENSE__MODEL" in stdout
    assert not (out / "checkpoint").exists(), "a finished run leaves no checkpoint behind"


@needs_scifact
def test_the_kept_model_is_a_complete_sentence_transformer(adapted):
    """The saved folder loads on its own, keeps the training length and gives unit vectors."""
    from sentence_transformers import SentenceTransformer

    out, _, _ = adapted
    model = SentenceTransformer(str(out), device="cpu")
    assert model.max_seq_length == 128
    vectors = model.encode(["Stars form inside cold, dense clouds of molecular hydrogen."], normalize_embeddings=True)
    assert vectors.shape == (1, 384) and abs(float(np.linalg.norm(vectors[0])) - 1.0) < 1e-4


def test_held_out_queries_and_their_positives_never_train():
    groups = [Group(f"q{i}", f"p{i}", [f"n{i}"], "pseudo" if i % 2 else "beir:x") for i in range(40)]
    held, rest = split_validation(groups, 0.25, random.Random(0))
    assert len(held) == 5 and all(g.source == "pseudo" for g in held)
    assert not {g.positive for g in held} & {g.positive for g in rest}
    assert len(rest) == 35
    pool = validation_pool(held, [f"c{i}" for i in range(100)], 30, random.Random(0))
    assert len(pool) == 30 and len(set(pool)) == 30
    assert {g.positive for g in held} <= set(pool) and {n for g in held for n in g.negatives} <= set(pool)


def test_teacher_margins_favour_the_positive_on_the_cosine_scale():
    """Sift's second stage prefers a group's true passage to a random one: positive margins, sized like the
    base model's cosine differences (z-units times the cosine spread), never hundreds of logits."""
    from indexer.encoders import load_encoder

    encoder = load_encoder("sentence-transformers/all-MiniLM-L6-v2", "cpu")
    groups = pseudo_query_groups(EXAMPLES, Mining(hard=0, easy=1), random.Random(5), 12)
    teacher = Teacher("models/sift-reranker-minilm-l6", encoder, {"cross_encoder": 0.45, "maxsim": 0.3}, 128, "cpu")
    scored = score_groups(groups, teacher, encoder, progress=False)
    margins = [m for s in scored for m in s.margins]
    assert len(margins) == 12 and np.mean([m > 0 for m in margins]) >= 0.9, margins
    assert 0 < float(np.median(margins)) < 2.0
    assert [s.margins for s in score_groups(groups, None, encoder, progress=False)] == [[]] * 12
    with pytest.raises(ValueError, match="teacher needs"):
        Teacher(None, encoder, {"cross_encoder": 1.0}, 128)
    # validation ranks every held-out positive: a model that puts it first scores 1
    perfect = validate(
        encoder, [Group("Stars form in clouds.", "Stars form in clouds.", [])], ["Stars form in clouds.", "Pasta"]
    )
    assert perfect == {"mrr@10": 1.0, "recall@10": 1.0}
    assert isinstance(scored[0], Scored)


def test_no_data_and_missing_paths_are_clear_errors(tmp_path):
    done = sift("encoder", "train", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "no training data" in done.stderr
    done = sift("encoder", "train", "--pseudo", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "does not exist" in done.stderr


@needs_scifact
def test_a_build_records_the_adapted_encoder_and_serves_with_it(adapted, tmp_path):
    """`SIFT_INDEX__DENSE__MODEL=<adapted> sift index build`: the manifest names the adapted model, and dense
    search over that build ranks with it (its query vectors equal the adapted model's)."""
    from sentence_transformers import SentenceTransformer

    from app.services import load_pipeline
    from app.settings import load_settings
    from indexer.encoders import load_encoder

    out, _, _ = adapted
    index = tmp_path / "index"
    env = {"SIFT_INDEX__DENSE__MODEL": str(out), "SIFT_INDEX__DENSE__TOKEN_VECTORS": "int8"}
    done = sift("index", "build", "--input", str(EXAMPLES), "--out", str(index), "--no-progress", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((index / "current" / "manifest.json").read_text())
    assert manifest["dense"]["model"] == str(out)
    pipeline = load_pipeline(load_settings(None, bundle=index))
    assert pipeline.dense is not None
    query = "how do stars form"
    served = pipeline.dense.encode([query])[0]
    expected = SentenceTransformer(str(out), device="cpu").encode([query], normalize_embeddings=True)[0]
    base = load_encoder("sentence-transformers/all-MiniLM-L6-v2", "cpu").encode([query], normalize_embeddings=True)[0]
    assert np.allclose(served, expected, atol=1e-4)
    assert not np.allclose(served, base, atol=1e-3), "the build serves the base model, not the adapted one"


def test_a_lower_cased_corpus_still_yields_pseudo_queries():
    """Cranfield is lower-cased: its sentences end before a small letter, which a cased text never splits on."""
    from app.eval.pseudo import sentences

    lower = "the flow separates near the leading edge of the wing. pressure rises sharply behind the shock wave here."
    assert sentences(lower) == [
        "the flow separates near the leading edge of the wing.",
        "pressure rises sharply behind the shock wave here.",
    ]
    cased = "Dr. smith measured the flow near the leading edge. The pressure rose sharply behind the shock."
    assert sentences(cased) == [
        "Dr. smith measured the flow near the leading edge.",
        "The pressure rose sharply behind the shock.",
    ]
