"""The README's questions, answered by a server with the shipped configuration (configs/default.yaml, nothing
overridden but the bundle): extractive answers that read as a sentence, with the reader's exact span and its
offsets in the citation, through /v1/answer, its stream and the official openai client."""

from __future__ import annotations

import json

import httpx
import pysbd
import pytest

from app.answering import sentence_bounds
from tests.servers import sift_server

TIDES = "What causes tides?"
EIFFEL = "When was the Eiffel Tower completed?"


@pytest.fixture(scope="module")
def shipped_server(example_index):
    with sift_server({"SIFT_BUNDLE": str(example_index)}, ready_timeout=300) as (base, _):
        yield base


def test_sentence_bounds_hold_the_span_and_stop_at_sentence_ends():
    segmenter = pysbd.Segmenter(language="en", clean=False, char_span=True)
    text = (
        "The tower was built for the 1889 World's Fair, e.g. as its entrance arch. It was completed in 1889 "
        "after two years. Dr. Smith measured 3.5 m of sway in 2.1 s gusts. It stands 330 m tall."
    )
    for span in ("completed in 1889", "3.5 m", "330 m", "World's Fair"):
        start = text.index(span)
        left, right = sentence_bounds(segmenter, text, start, start + len(span))
        sentence = text[left:right]
        assert left <= start and start + len(span) <= right
        assert sentence[0].isupper() and sentence.endswith("."), sentence
        assert sentence.count(". ") == 0 or "e.g." in sentence or "Dr." in sentence, sentence
    start = text.index("completed")
    assert (
        text[slice(*sentence_bounds(segmenter, text, start, start + 9))] == "It was completed in 1889 after two years."
    )
    # a span across a sentence end takes both sentences
    start = text.index("years. Dr.")
    left, right = sentence_bounds(segmenter, text, start, start + 10)
    assert text[left:right].startswith("It was completed") and text[left:right].endswith("2.1 s gusts.")


def test_shipped_default_answers_with_the_sentence_that_holds_the_span(shipped_server):
    info = httpx.get(f"{shipped_server}/v1/info", timeout=30).json()
    assert info["settings"]["reranker"]["model"]  # the second stage is on, as shipped
    data = httpx.post(f"{shipped_server}/v1/answer", json={"question": TIDES}, timeout=120).json()
    assert data["answered"] and data["mode"] == "extractive", data  # the shipped default (chosen on validation)
    assert "Moon's gravity" in data["answer"] and data["answer"].endswith("."), data["answer"]
    [citation] = data["citations"]
    assert citation["doc_id"] == "earth-013" and citation["inferred"] is False
    span = data["span"]
    assert citation["text"][citation["start"] : citation["end"]] == span["text"]
    assert span["text"] in data["answer"] and len(span["text"]) < len(data["answer"])
    assert data["answer"] in citation["text"]  # the sentence is the passage's own text
    eiffel = httpx.post(f"{shipped_server}/v1/answer", json={"question": EIFFEL}, timeout=120).json()
    assert "1889" in eiffel["answer"] and [c["doc_id"] for c in eiffel["citations"]] == ["hist-013"]


def test_openai_chat_and_stream_give_the_same_sentence(shipped_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{shipped_server}/v1", api_key="unused")
    reply = client.chat.completions.create(model="sift-rag", messages=[{"role": "user", "content": TIDES}])
    text = reply.choices[0].message.content
    citations = reply.model_extra["citations"]
    assert "Moon's gravity" in text and [c["doc_id"] for c in citations] == ["earth-013"]
    assert citations[0]["text"][citations[0]["start"] : citations[0]["end"]] in text
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="sift-rag", messages=[{"role": "user", "content": TIDES}], stream=True
        )
        if chunk.choices
    )
    assert streamed == text
    # the README's other question: a sentence, said once (no repeated sentence as the small generator did)
    stars = (
        client.chat.completions.create(model="sift-rag", messages=[{"role": "user", "content": "How do stars form?"}])
        .choices[0]
        .message.content
    )
    sentences = [s for s in stars.split(". ") if s]
    assert stars and len(sentences) == len(set(sentences)), stars
    events = []
    with httpx.stream(
        "POST", f"{shipped_server}/v1/answer", json={"question": EIFFEL, "stream": True}, timeout=120
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["answer"].count("1889") >= 1 and events[-1]["citations"][0]["doc_id"] == "hist-013"
