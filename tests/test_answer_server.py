"""Question answering and the OpenAI-compatible chat backend, through a real Sift server (uvicorn on
loopback) with the local SmolLM2 generator; a second real server is the remote for the OpenAI client."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.generation.base import GenerationOptions
from app.generation.remote import OpenAICompatibleGenerator
from tests.servers import sift_server

QUESTION = "When was the Eiffel Tower completed?"
STOPWORDS = {"the", "was", "and", "for", "with", "that", "this", "from", "are", "were", "which", "its", "his", "her"}


@pytest.fixture(scope="module")
def rag_server(example_index):
    env = {"SIFT_BUNDLE": str(example_index), "SIFT_ANSWER__MAX_NEW_TOKENS": "40", "SIFT_RERANKER__MODEL": "none"}
    with sift_server(env, ready_timeout=300) as (base, _):
        yield base


def key_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]{3,}", text.lower()) if w not in STOPWORDS}


def test_answer_is_grounded_with_citations(rag_server):
    response = httpx.post(f"{rag_server}/v1/answer", json={"question": QUESTION}, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["answered"] and "1889" in data["answer"]
    assert data["passages"][0]["doc_id"] == "hist-013"
    assert data["citations"], "an answer must cite at least one passage"
    for citation in data["citations"]:
        assert citation["doc_id"] == "hist-013"
        shared = key_words(data["answer"]) & key_words(citation["text"])
        assert {"eiffel", "tower", "completed", "1889"} & shared, shared
    assert {"bm25", "dense", "fusion", "generate", "total"} <= set(data["timings_ms"])


def test_streamed_answer_sends_passages_then_tokens_then_final_and_equals_non_streamed(rag_server):
    plain = httpx.post(f"{rag_server}/v1/answer", json={"question": QUESTION}, timeout=120).json()
    events = []
    with httpx.stream("POST", f"{rag_server}/v1/answer", json={"question": QUESTION, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:]), time.perf_counter()))
    names = [e[0] for e in events]
    assert names[0] == "passages" and names[-1] == "done" and names.count("token") >= 3
    first_token = next(t for n, _, t in events if n == "token")
    assert first_token < events[-1][2]
    streamed = "".join(d["text"] for n, d, _ in events if n == "token")
    assert streamed == plain["answer"] == events[-1][1]["answer"]
    assert events[-1][1]["citations"] == plain["citations"]


def test_question_outside_the_corpus_is_declined(rag_server):
    data = httpx.post(
        f"{rag_server}/v1/answer", json={"question": "Who won the 2018 FIFA World Cup final?"}, timeout=120
    ).json()
    assert data["answered"] is False and data["citations"] == []
    assert data["answer"] == "The indexed documents do not contain an answer to this question."


@pytest.mark.parametrize(
    ("generation", "stream", "field"),
    [
        ({"num_beams": 2, "temperature": 0.5}, False, "generation.num_beams"),
        ({"num_beams": 2}, True, "generation.num_beams"),
        ({"top_p": 0.5}, False, "generation.top_p"),
        ({"max_new_tokens": 0}, False, "generation.max_new_tokens"),
        ({"temperature": 3}, False, "generation.temperature"),
    ],
)
def test_invalid_decoding_options_are_422_saying_why(rag_server, generation, stream, field):
    body = {"question": QUESTION, "generation": generation, "stream": stream}
    response = httpx.post(f"{rag_server}/v1/answer", json=body, timeout=30)
    assert response.status_code == 422
    assert any(f["field"] == field for f in response.json()["error"]["fields"]), response.text


def test_openai_client_chat_and_streamed_chat_receive_citations(rag_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{rag_server}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["sift-rag"]
    completion = client.chat.completions.create(
        model="sift-rag", messages=[{"role": "user", "content": QUESTION}], max_tokens=40
    )
    text = completion.choices[0].message.content
    assert "1889" in text and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.model_extra["citations"][0]["doc_id"] == "hist-013"
    stream = client.chat.completions.create(
        model="sift-rag", messages=[{"role": "user", "content": QUESTION}], max_tokens=40, stream=True
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["citations"][0]["doc_id"] == "hist-013"


def test_chat_errors_follow_openai_shape(rag_server):
    url = f"{rag_server}/v1/chat/completions"
    r = httpx.post(url, json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 404 and "sift-rag" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "sift-rag", "messages": [{"role": "system", "content": "x"}]}, timeout=30)
    assert r.status_code == 422 and "user message" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "sift-rag", "messages": [{"role": "user", "content": "hi"}], "n": 2}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "n"


def test_remote_generator_against_a_real_openai_compatible_server(rag_server, example_pipeline):
    """Sift (this process) uses the other Sift server as its remote generator over the OpenAI protocol."""
    remote = OpenAICompatibleGenerator(f"{rag_server}/v1", "sift-rag", api_key_env=None, timeout_s=120)
    messages = [{"role": "user", "content": QUESTION}]
    result = remote.generate(messages, GenerationOptions(max_new_tokens=40))
    assert "1889" in result.text and result.completion_tokens > 0
    assert "".join(remote.stream(messages, GenerationOptions(max_new_tokens=40))) == result.text
    app = create_app(example_pipeline.settings, pipeline=example_pipeline, generator=remote)
    with TestClient(app) as client:
        data = client.post("/v1/answer", json={"question": QUESTION}).json()
    assert "1889" in data["answer"] and data["model"] == "sift-rag"


def test_answer_without_generator_is_503(example_pipeline):
    with TestClient(create_app(example_pipeline.settings, pipeline=example_pipeline)) as client:
        r = client.post("/v1/answer", json={"question": QUESTION})
    assert r.status_code == 503 and "no answer backend is configured" in r.json()["error"]["message"]
