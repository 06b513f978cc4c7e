"""The extractive reader: training raises the gold span's probability on held-out questions, spans are
always exact slices of the passage (unicode included), low confidence declines, and the answer/chat
endpoints (and the official openai client against a real server) return the span with offset citations."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.generation.reader import Calibration, ExtractiveReader, features
from tests.conftest import ROOT, SHARED_DATA, SHARED_DATA_WORKER
from tests.servers import app_client, sift_server

pytestmark = SHARED_DATA_WORKER

READER = ROOT / "models" / "sift-reader-minilm-l6"
SQUAD = SHARED_DATA / "squad" / "dev-v1.1.json"
needs_squad = pytest.mark.skipif(not SQUAD.exists(), reason=f"SQuAD dev not found at {SQUAD}")


@pytest.fixture(scope="module")
def reader():
    return ExtractiveReader.load(str(READER), "cpu")


def gold_span_probability(model, tokenizer, examples) -> float:  # noqa: ANN001
    """Mean P(start = gold start) · P(end = gold end) under the model, over the examples' answer windows."""
    import torch

    from app.training.reader import training_features

    feats = training_features(tokenizer, examples, 256, 64)
    keep = feats["start_positions"] > 0
    batch = {k: torch.as_tensor(v[keep]) for k, v in feats.items() if k not in ("start_positions", "end_positions")}
    with torch.inference_mode():
        out = model.eval()(**batch)
    s = torch.softmax(out.start_logits.float(), -1)[torch.arange(int(keep.sum())), feats["start_positions"][keep]]
    e = torch.softmax(out.end_logits.float(), -1)[torch.arange(int(keep.sum())), feats["end_positions"][keep]]
    return float((s * e).mean())


@needs_squad
@pytest.mark.heavy
def test_a_few_training_steps_raise_the_gold_span_probability_on_held_out_questions(tmp_path):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from app.training.reader import ReaderTrainConfig, load_examples, split_by_paragraph, train
    from indexer.encoders import resolve_model_path

    with pytest.raises(ValueError, match="held out for evaluation"):
        load_examples(SQUAD, range(20, 30))
    examples = load_examples(SQUAD, range(0, 2))
    training, held_out = split_by_paragraph(examples, 0.2, 13)
    training, held_out = training[:160], held_out[:40]
    assert not {e.paragraph for e in training} & {e.paragraph for e in held_out}
    base = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(base)
    untrained = AutoModelForQuestionAnswering.from_pretrained(base, num_labels=2)
    before = gold_span_probability(untrained, tokenizer, held_out)
    config = ReaderTrainConfig(
        base=base,
        out=tmp_path / "reader",
        max_length=256,
        stride=64,
        epochs=1,
        batch_size=8,
        lr=2e-4,
        checkpoint_every=0,
        device="cpu",
        fp16=False,
    )
    state = train(training, config, progress=False, validation=held_out[:8])
    trained = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "reader")
    after = gold_span_probability(trained, tokenizer, held_out)
    assert state["step"] == 20 and (tmp_path / "reader" / "calibration.json").exists()
    assert after > 10 * before, (before, after)  # measured: 2.1e-05 -> 1.0e-03


def test_spans_are_exact_slices_of_the_passage_including_unicode(reader):
    passages = [
        "Le café Zürich — ouvert en 1897 à Genève — sert un résumé naïf du menu ☕; 東京の支店は2001年に開店した。",
        "The Eiffel Tower in Paris was completed in 1889 and is 330 metres tall.",
        "  Leading spaces, then: the Ångström unit (Å) equals 10⁻¹⁰ metres.  ",
    ]
    questions = ["When was the Eiffel Tower completed?", "When did the café open?", "How much is an ångström?"]
    for question in questions:
        span = reader.read(question, passages)
        assert span is not None
        assert passages[span.passage][span.start : span.end] == span.text and span.text.strip()
        assert 0.0 <= span.confidence <= 1.0
    eiffel = reader.read(questions[0], passages)
    assert eiffel.passage == 1 and "1889" in eiffel.text
    for span in reader.read_many(questions, [passages[::-1]] * 3):
        assert span.text == passages[::-1][span.passage][span.start : span.end]
    assert reader.read("anything?", []) is None and reader.read("anything?", ["   "]) is None


def test_long_passages_are_read_in_windows(reader):
    filler = " ".join(f"Sentence number {i} says nothing about towers." for i in range(120))
    passage = filler + " The Eiffel Tower was completed in 1889. " + filler
    enc, _ = features(reader.tokenizer, ["When was the Eiffel Tower completed?"], [passage], 384, 128)
    assert len(enc["input_ids"]) >= 3, "a passage longer than the window is read in several windows"
    span = reader.read("When was the Eiffel Tower completed?", [passage])
    assert span.text == "1889" and passage[span.start : span.end] == "1889"


def test_calibration_fit_is_monotone_and_matches_rates():
    rng = np.random.default_rng(0)
    scores = rng.normal(8, 4, 2000)
    correct = (rng.random(2000) < 1 / (1 + np.exp(-(0.5 * scores - 4)))).astype(float)
    fitted = Calibration.fit(scores, correct)
    assert fitted.a == pytest.approx(0.5, abs=0.1) and fitted.b == pytest.approx(-4, abs=0.6)
    assert fitted(2.0) < fitted(8.0) < fitted(14.0)


@pytest.fixture(scope="module")
def extractive_client(example_index):
    from app.settings import load_settings

    # the bare span as the answer text (answer.extractive_text: span); the shipped sentence answers are tested in
    # tests/test_shipped_answers.py
    settings = load_settings(
        bundle=example_index,
        reranker={"model": None},
        generator={"backend": "none"},
        answer={"mode": "extractive", "extractive_text": "span", "reader": str(READER)},  # the `reader` fixture's
    )
    with app_client(settings) as client:
        yield client


def test_extractive_answer_returns_the_span_with_offset_citation(extractive_client):
    data = extractive_client.post("/v1/answer", json={"question": "When was the Eiffel Tower completed?"}).json()
    assert data["mode"] == "extractive" and data["answered"] and data["answer"] == "1889"
    citation = data["citations"][0]
    assert citation["doc_id"] == "hist-013" and citation["text"][citation["start"] : citation["end"]] == "1889"
    assert data["span"]["passage_id"] == citation["passage_id"] and data["span"]["confidence"] >= 0.42
    events = []
    with extractive_client.stream(
        "POST", "/v1/answer", json={"question": "When was the Eiffel Tower completed?", "stream": True}
    ) as r:
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    assert [n for n, _ in events] == ["passages", "token", "done"]
    assert events[1][1]["text"] == "1889" and events[2][1]["citations"] == data["citations"]


def test_extractive_mode_declines_when_no_passage_answers(extractive_client):
    data = extractive_client.post("/v1/answer", json={"question": "Who won the 1994 FIFA World Cup final?"}).json()
    assert data["answered"] is False and data["citations"] == []
    assert data["span"]["confidence"] < 0.42, data["span"]
    chat = extractive_client.post(
        "/v1/chat/completions",
        json={"model": "sift-rag", "messages": [{"role": "user", "content": "Who won the 1994 FIFA World Cup final?"}]},
    ).json()
    assert chat["citations"] == [] and chat["choices"][0]["message"]["content"] == data["answer"]


def test_openai_client_gets_the_span_and_offsets_from_a_real_server(example_index):
    from openai import OpenAI

    env = {
        "SIFT_BUNDLE": str(example_index),
        "SIFT_ANSWER__MODE": "extractive",
        "SIFT_ANSWER__EXTRACTIVE_TEXT": "span",
        "SIFT_GENERATOR__BACKEND": "none",
        "SIFT_RERANKER__MODEL": "none",
    }
    with sift_server(env) as (base, _):
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        messages = [{"role": "user", "content": "When was the Eiffel Tower completed?"}]
        reply = client.chat.completions.create(model="sift-rag", messages=messages)
        citations = reply.model_extra["citations"]
        assert reply.choices[0].message.content == "1889"
        assert citations[0]["text"][citations[0]["start"] : citations[0]["end"]] == "1889"
        stream = client.chat.completions.create(model="sift-rag", messages=messages, stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "1889" and chunks[-1].model_extra["citations"] == citations
        plain = httpx.post(f"{base}/v1/answer", json={"question": "When was the Eiffel Tower completed?"}, timeout=60)
        assert plain.json()["citations"] == citations


def test_shipped_reader_fits_the_size_budget_and_has_a_model_card():
    weights = READER / "model.safetensors"
    assert weights.stat().st_size <= 50_000_000
    config = json.loads((READER / "config.json").read_text())
    assert config["architectures"] == ["BertForQuestionAnswering"] and config["dtype"] == "float16"
    card = (READER / "README.md").read_text()
    for needed in ("articles 0–23", "CC BY-SA 4.0", "H200", "sift reader train", "EM", "F1"):
        assert needed in card, needed
    assert set(json.loads((READER / "calibration.json").read_text())) == {"a", "b"}
    assert Path(READER / "training_log.json").exists()
