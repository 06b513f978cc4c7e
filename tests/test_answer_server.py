"""Question answering and the OpenAI-compatible chat backend, through a real Sift server (uvicorn on
loopback) with the local SmolLM2 generator; a second real server is the remote for the OpenAI client."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from app.generation.base import GenerationOptions
from app.generation.remote import OpenAICompatibleGenerator
from app.settings import load_settings
from tests.servers import app_client, sift_server

QUESTION = "When was the Eiffel Tower completed?"
STOPWORDS = {"the", "was", "and", "for", "with", "that", "this", "from", "are", "were", "which", "its", "his", "her"}


@pytest.fixture(scope="module")
def rag_server(example_index):
    env = {
        "SIFT_BUNDLE": str(example_index),
        "SIFT_ANSWER__MODE": "generative",  # the local SmolLM2 generator (the shipped default is extractive)
        "SIFT_ANSWER__MAX_NEW_TOKENS": "40",
        "SIFT_RERANKER__MODEL": "none",
        "SIFT_SERVER__MAX_CONCURRENT_GENERATIONS": "8",
    }
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
                events.append((name, json.loads(line[6:])))
    names = [e[0] for e in events]
    # (that tokens reach the client before the answer ends is shown by hold_the_model's holders below)
    assert names[0] == "passages" and names[-1] == "done" and names.count("token") >= 3
    streamed = "".join(d["text"] for n, d in events if n == "token")
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


def test_remote_generator_against_a_real_openai_compatible_server(rag_server, example_index):
    """Sift (this process) uses the other Sift server as its remote generator over the OpenAI protocol."""
    remote = OpenAICompatibleGenerator(f"{rag_server}/v1", "sift-rag", api_key_env=None, timeout_s=120)
    messages = [{"role": "user", "content": QUESTION}]
    result = remote.generate(messages, GenerationOptions(max_new_tokens=40))
    assert "1889" in result.text and result.completion_tokens > 0
    assert "".join(remote.stream(messages, GenerationOptions(max_new_tokens=40))) == result.text
    remote_settings = {"base_url": f"{rag_server}/v1", "model": "sift-rag", "api_key_env": None, "timeout_s": 120}
    settings = load_settings(
        bundle=example_index,
        reranker={"model": None},
        answer={"mode": "generative"},
        generator={"backend": "openai", **remote_settings},  # the same generator, configured
    )
    with app_client(settings) as client:
        data = client.post("/v1/answer", json={"question": QUESTION}).json()
    assert "1889" in data["answer"] and data["model"] == "sift-rag"


def test_answer_without_generator_is_503(example_settings):
    with app_client(example_settings) as client:  # generator.backend: none
        r = client.post("/v1/answer", json={"question": QUESTION})
    assert r.status_code == 503 and "no answer backend is configured" in r.json()["error"]["message"]


# -- isolation, capacity and disconnects (issue: generation must never starve search) -----------------------------

LONG = {
    "question": "Describe the Eiffel Tower: its history, construction, height and visitors.",
    "stream": True,
    # the request limit (answer.max_tokens_limit): a holder must outlast every step a test takes meanwhile, even
    # on a slow, loaded machine (at 800 tokens it ended on its own once while a second server started)
    "generation": {"max_new_tokens": 2048, "temperature": 1.6, "seed": 3},
}


def generations_active(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return float(re.search(r"^sift_generations_active (\S+)$", text, re.M).group(1))


class Streamer:
    """A client streaming one answer over a plain socket, on its own thread; `ready` is set once it has read
    `tokens` token events (0: once the response has started). `close()` shuts the socket at once (a
    disconnect), whatever the reading thread is doing."""

    def __init__(self, base: str, body: dict, tokens: int = 1) -> None:
        import socket
        import threading
        from urllib.parse import urlparse

        url = urlparse(base)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=120)
        payload = json.dumps(body).encode()
        head = (
            f"POST /v1/answer HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + payload)
        self.ready = threading.Event()
        self.status: int | None = None
        self.received = b""
        self.thread = threading.Thread(target=self._run, args=(tokens,), daemon=True)
        self.thread.start()

    @property
    def tokens(self) -> int:
        """Token events received so far."""
        return self.received.count(b"event: token")

    @property
    def finished(self) -> bool:
        """The answer ran to its end (its `done` event came)."""
        return b"event: done" in self.received

    def _run(self, tokens: int) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
                if self.status is None and b"\r\n" in self.received:
                    self.status = int(self.received.split(b" ", 2)[1])
                if b"event: " in self.received and self.tokens >= tokens:
                    self.ready.set()
        except OSError:
            pass  # closed by close()
        finally:
            self.ready.set()

    def close(self) -> None:
        import socket

        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(30)


def wait_until(condition, what: str, timeout: float = 120, state=None) -> None:
    """Poll `condition` until it holds. The deadline only catches a hang (it is no claim about speed);
    `state()`, when given, says what was seen instead."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            seen = f" (seen: {state()})" if state is not None else ""
            pytest.fail(f"still waiting for {what} after {timeout} s{seen}")
        time.sleep(0.05)


def searches_succeed(base: str, n: int = 20) -> None:
    with httpx.Client(timeout=120) as client:
        for i in range(n):
            r = client.post(f"{base}/v1/search", json={"query": f"how do stars form {i}", "k": 5})
            assert r.status_code == 200, r.text


def hold_the_model(base: str) -> Streamer:
    """A streamed answer that has its first token, so it holds the model (the local generator runs one
    generation at a time) until the test closes it: an answer admitted after it cannot run to its end
    before it. LONG runs far longer than any step the tests take meanwhile."""
    holder = Streamer(base, LONG, tokens=1)
    assert holder.ready.wait(300) and holder.status == 200 and holder.tokens >= 1
    return holder


def test_generations_are_isolated_capped_and_stop_when_their_clients_leave(rag_server):
    streams = [Streamer(rag_server, LONG, tokens=0) for _ in range(8)]
    try:
        for s in streams:
            assert s.ready.wait(120) and s.status == 200
        assert generations_active(rag_server) == 8
        # the model runs one generation at a time: one stream has it, the other seven wait for it
        wait_until(lambda: any(s.tokens for s in streams), "a first token")
        # a ninth answer is refused at once, not queued: it comes back while all 8 still hold their slots
        refused = httpx.post(f"{rag_server}/v1/answer", json={"question": QUESTION}, timeout=120)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["type"] == "generation_busy" and "server.max_concurrent_generations" in error["message"]
        assert not any(s.finished for s in streams) and generations_active(rag_server) == 8
        # search is not blocked by generation: all 20 searches complete while the 8 generations hold their slots
        searches_succeed(rag_server)
        assert not any(s.finished for s in streams) and generations_active(rag_server) == 8
        # four clients waiting for the model leave: their slots free while the one generating still holds the
        # model, so they were cancelled (running to their end would have needed the model)
        holder = next(s for s in streams if s.tokens and not s.finished)
        leaving = [s for s in streams if s is not holder][:4]
        for s in leaving:
            s.close()
        wait_until(lambda: generations_active(rag_server) == 4, "the four slots of the clients that left")
        assert not holder.finished, "the generating answer ended on its own first: nothing shown (raise LONG)"
        # the rest leave, the generating one included (that the model stops within a token of a cancel is
        # counted in tests/test_generation.py)
        for s in streams:
            s.close()
        wait_until(lambda: generations_active(rag_server) == 0, "every slot to free")
    finally:
        for s in streams:
            s.close()
    # the model is free again: a short answer comes back
    assert httpx.post(f"{rag_server}/v1/answer", json={"question": QUESTION}, timeout=300).status_code == 200


def test_a_non_streamed_answer_stops_when_its_client_leaves(rag_server):
    holder = hold_the_model(rag_server)
    try:
        waiting = Streamer(rag_server, {**LONG, "stream": False}, tokens=0)
        wait_until(lambda: generations_active(rag_server) == 2, "the non-streamed answer to be admitted")
        waiting.close()
        # its slot frees while the model is still busy with the holder: it was cancelled, not run to its end
        wait_until(lambda: generations_active(rag_server) == 1, "the slot of the client that left")
        assert not holder.finished, "the holder ended on its own first: nothing shown (raise LONG)"
        assert waiting.status is None  # it never got a response
    finally:
        holder.close()
    wait_until(lambda: generations_active(rag_server) == 0, "the holder's slot")


def test_a_disconnect_stops_the_remote_generation_too(rag_server, example_index):
    """Sift A generates through Sift B (the rag server) over the OpenAI protocol; a client leaving A stops
    A's upstream stream, and B's generation with it. B's model is held by a stream of the test's own, so B's
    generation for A cannot end on its own while the test watches."""
    env = {
        "SIFT_BUNDLE": str(example_index),
        "SIFT_RERANKER__MODEL": "none",
        "SIFT_ANSWER__MODE": "generative",
        "SIFT_GENERATOR__BACKEND": "openai",
        "SIFT_GENERATOR__BASE_URL": f"{rag_server}/v1",
        "SIFT_GENERATOR__MODEL": "sift-rag",
        # no upstream read timeout or deadline ends B's generation while the test watches: only the cancel can
        "SIFT_GENERATOR__TIMEOUT_S": "3600",
        "SIFT_GENERATOR__DEADLINE_S": "3600",
    }
    with sift_server(env) as (front, _):
        # A's first search pays its lazy warm-up before B's model is held, not while the holder's tokens run
        searches_succeed(front, n=2)
        holder = hold_the_model(rag_server)
        try:
            stream = Streamer(front, LONG, tokens=0)
            assert stream.ready.wait(120) and stream.status == 200
            wait_until(
                lambda: generations_active(front) == 1 and generations_active(rag_server) == 2,
                "A's upstream generation to be admitted by B",
            )
            stream.close()
            wait_until(
                lambda: generations_active(front) == 0 and generations_active(rag_server) == 1,
                "A's and B's slots to free",
                state=lambda: f"A active {generations_active(front)}, B active {generations_active(rag_server)}",
            )
            assert not holder.finished, "the holder ended on its own first: nothing shown (raise LONG)"
        finally:
            holder.close()
        wait_until(lambda: generations_active(rag_server) == 0, "the holder's slot")
