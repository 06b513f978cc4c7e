"""Generators: decoding options, stop sequences, the local SmolLM2 model, and the remote client's retries."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from app.generation.base import GenerationOptions, StopTrimmer, trim_at_stop
from app.generation.remote import OpenAICompatibleGenerator, RemoteGenerationError

MESSAGES = [
    {"role": "system", "content": "Answer using only the passage."},
    {
        "role": "user",
        "content": "Passage: The Eiffel Tower was completed in 1889 for the World's Fair in Paris.\n\nQuestion: When was the Eiffel Tower completed?",
    },
]


@pytest.mark.parametrize(
    ("options", "stream", "field"),
    [
        ({"num_beams": 3, "temperature": 0.7}, False, "num_beams"),
        ({"num_beams": 2}, True, "num_beams"),
        ({"top_p": 0.9}, False, "top_p"),
        ({"top_k": 40}, False, "top_k"),
        ({"stop": [""]}, False, "stop"),
    ],
)
def test_invalid_combinations_name_the_field(options, stream, field):
    problems = GenerationOptions(**options).problems(stream=stream)
    assert problems and problems[0][0] == field


def test_valid_combinations_have_no_problems():
    assert GenerationOptions().problems() == []
    assert GenerationOptions(temperature=0.8, top_k=40, top_p=0.9, seed=1).problems(stream=True) == []
    assert GenerationOptions(num_beams=4).problems() == []


def test_stop_trimmer_holds_back_partial_stop_sequences():
    trimmer = StopTrimmer(["END", "\n\n"])
    out = "".join(trimmer.feed(p) for p in ["The ans", "wer is 4", "2.", " E", "N", "D and more"])
    assert out == "The answer is 42. " and trimmer.stopped
    assert trim_at_stop("no stop here E", ["END"]) == ("no stop here E", False)
    assert trim_at_stop("a\n\nb", ["\n\n"]) == ("a", True)


def test_local_greedy_answer_stream_equals_generate(local_generator):
    options = GenerationOptions(max_new_tokens=24)
    result = local_generator.generate(MESSAGES, options)
    assert "1889" in result.text and result.prompt_tokens > 20 and 0 < result.completion_tokens <= 24
    pieces = list(local_generator.stream(MESSAGES, options))
    assert len(pieces) > 3 and "".join(pieces) == result.text


def test_local_sampling_is_reproducible_with_seed_and_beam_search_runs(local_generator):
    sampled = GenerationOptions(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=11)
    assert local_generator.generate(MESSAGES, sampled).text == local_generator.generate(MESSAGES, sampled).text
    beams = local_generator.generate(MESSAGES, GenerationOptions(max_new_tokens=16, num_beams=3))
    assert "1889" in beams.text


def test_local_stop_sequence_and_length_limit(local_generator):
    stopped = local_generator.generate(MESSAGES, GenerationOptions(max_new_tokens=24, stop=["1889"]))
    assert "1889" not in stopped.text and stopped.finish_reason == "stop"
    short = local_generator.generate(MESSAGES, GenerationOptions(max_new_tokens=3))
    assert short.completion_tokens == 3 and short.finish_reason == "length"


def test_local_generation_waiting_for_the_model_gives_up_once_cancelled(local_generator):
    """A generation waiting for the model (another holds it: one generation at a time) ends once cancelled,
    streamed or not, without ever running the model. The join's deadline only catches a hang."""
    import threading

    from app.generation.base import Cancel

    def run(stream: bool, cancel: Cancel, out: list) -> None:
        if stream:
            out.append(list(local_generator.stream(MESSAGES, GenerationOptions(), cancel)))
        else:
            out.append(local_generator.generate(MESSAGES, GenerationOptions(), cancel))

    passes = []
    hook = local_generator.model.register_forward_hook(lambda *args: passes.append(1))
    local_generator._lock.acquire()  # another generation holds the model
    try:
        for stream in (False, True):
            cancel, out = Cancel(), []
            waiter = threading.Thread(target=run, args=(stream, cancel, out))
            waiter.start()
            cancel.set()
            waiter.join(60)
            assert not waiter.is_alive(), f"a cancelled generation (stream={stream}) kept waiting for the model"
            if stream:
                assert out == [[]]
            else:
                assert out[0].finish_reason == "cancelled" and out[0].completion_tokens == 0
    finally:
        local_generator._lock.release()
        hook.remove()
    assert passes == []


def _completion(text: str) -> dict:
    return {
        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2},
    }


def test_remote_retries_transient_errors_with_backoff_then_succeeds(monkeypatch):
    """A test double for the remote server's failures; the protocol itself is tested against a real
    server in tests/test_answer_server.py."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        if len(calls) < 3:
            return httpx.Response(503, json={"error": "busy"})
        return httpx.Response(200, json=_completion("ok"))

    sleeps = []
    monkeypatch.setattr("app.generation.remote.time.sleep", sleeps.append)
    monkeypatch.setenv("TEST_KEY", "secret")
    generator = OpenAICompatibleGenerator(
        "http://remote/v1",
        "m",
        api_key_env="TEST_KEY",
        max_retries=2,
        backoff_s=0.1,
        transport=httpx.MockTransport(handler),
    )
    result = generator.generate(
        MESSAGES, GenerationOptions(max_new_tokens=5, temperature=0.5, top_p=0.9, seed=3, stop=["x"])
    )
    assert result.text == "ok" and len(calls) == 3 and sleeps == [0.1, 0.2]
    assert (
        calls[0]["max_tokens"] == 5 and calls[0]["top_p"] == 0.9 and calls[0]["seed"] == 3 and calls[0]["stop"] == ["x"]
    )
    assert generator.client.headers["authorization"] == "Bearer secret"


def test_remote_gives_up_after_bounded_retries_and_does_not_retry_client_errors(monkeypatch):
    monkeypatch.setattr("app.generation.remote.time.sleep", lambda s: None)
    attempts = []

    def busy(request):
        attempts.append(1)
        return httpx.Response(503)

    generator = OpenAICompatibleGenerator("http://r/v1", "m", max_retries=2, transport=httpx.MockTransport(busy))
    with pytest.raises(RemoteGenerationError, match=r"generator backend failed \(HTTP 503\)") as failed:
        generator.generate(MESSAGES, GenerationOptions())
    assert len(attempts) == 3 and failed.value.detail == "HTTP 503 after 3 attempts"
    bad = OpenAICompatibleGenerator(
        "http://r/v1", "m", transport=httpx.MockTransport(lambda r: httpx.Response(400, text="bad model"))
    )
    with pytest.raises(RemoteGenerationError) as refused:
        bad.generate(MESSAGES, GenerationOptions())
    # what a client sees names neither the upstream URL nor its body; the log gets both
    assert "HTTP 400: bad model" in refused.value.detail
    assert "bad model" not in str(refused.value) and "http://r" not in str(refused.value)
    with pytest.raises(ValueError, match="num_beams"):
        bad.generate(MESSAGES, GenerationOptions(num_beams=2))


def test_remote_has_a_total_deadline_across_attempts(monkeypatch):
    """Each attempt stalls 0.4 s, then times out; the deadline stops the whole call, not max_retries. The
    generator's clock is virtual (stalls and backoffs advance it), so nothing here depends on real time."""
    clock = [0.0]

    class VirtualTime:
        @staticmethod
        def monotonic() -> float:
            return clock[0]

        @staticmethod
        def sleep(seconds: float) -> None:
            clock[0] += seconds

    monkeypatch.setattr("app.generation.remote.time", VirtualTime)
    timeouts = []

    def stall(request):
        timeouts.append(request.extensions["timeout"]["read"])
        clock[0] += 0.4
        raise httpx.ReadTimeout("stalled", request=request)

    generator = OpenAICompatibleGenerator(
        "http://r/v1", "m", max_retries=10, backoff_s=0.05, deadline_s=1.0, transport=httpx.MockTransport(stall)
    )
    with pytest.raises(RemoteGenerationError, match=r"generator backend failed \(ReadTimeout\)") as failed:
        generator.generate(MESSAGES, GenerationOptions())
    # attempts at 0, 0.45 (after 0.05 backoff) and 0.95 (after 0.1): the third ends past the 1.0 s deadline
    assert failed.value.detail == "ReadTimeout: stalled after 3 attempts"
    # no attempt may wait past the deadline: each one's timeout is what is left of it
    assert timeouts == pytest.approx([1.0, 0.55, 0.05])


def test_local_generation_stops_within_a_token_of_a_cancel(local_generator):
    """A cancel (the client left) set while the model is generating stops it at its next token, streamed or
    not. A forward hook counts the model's passes (one per new token) and sets the cancel at the fifth, so the
    count, not a clock, shows where generation stopped (sampled at a high temperature: no early end of text)."""
    from app.generation.base import Cancel

    options = GenerationOptions(max_new_tokens=200, temperature=1.6, seed=3)
    for stream in (False, True):
        cancel, passes = Cancel(), []

        def count(*args, passes=passes, cancel=cancel):
            passes.append(1)
            if len(passes) == 5:
                cancel.set()

        hook = local_generator.model.register_forward_hook(count)
        try:
            if stream:
                pieces = list(local_generator.stream(MESSAGES, options, cancel))  # returns once the model stopped
                assert len(pieces) <= 5
            else:
                result = local_generator.generate(MESSAGES, options, cancel)
                assert result.completion_tokens == 5 and result.finish_reason == "stop"
        finally:
            hook.remove()
        assert len(passes) == 5, (stream, len(passes))
    # the same options run on without a cancel: generation went past 5 tokens on its own
    uncancelled = local_generator.generate(MESSAGES, GenerationOptions(max_new_tokens=12, temperature=1.6, seed=3))
    assert uncancelled.completion_tokens == 12


def test_a_stream_is_retried_only_before_its_first_token():
    """A stream that breaks after sending text fails instead of starting again (which would repeat it)."""
    calls = []

    class Broken(httpx.SyncByteStream):
        def __iter__(self):
            yield b'data: {"choices": [{"delta": {"content": "The answer is"}}]}\n\n'
            raise httpx.ReadError("connection reset")

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(503)  # before any token: retried
        return httpx.Response(200, stream=Broken(), headers={"content-type": "text/event-stream"})

    generator = OpenAICompatibleGenerator(
        "http://r/v1", "m", max_retries=3, backoff_s=0.0, transport=httpx.MockTransport(handler)
    )
    pieces = []
    with pytest.raises(RemoteGenerationError, match="generator backend failed") as broke:
        for piece in generator.stream(MESSAGES, GenerationOptions()):
            pieces.append(piece)
    assert pieces == ["The answer is"] and len(calls) == 2  # one retry before the first token, none after
    assert "connection reset" in broke.value.detail and "connection reset" not in str(broke.value)


class StalledUpstream:
    """A real HTTP server on loopback that answers one chat completion and then stalls: a stream gets its
    headers and one SSE event, a non-streamed call gets nothing (its headers would follow the generation).
    It records when the caller's connection closed: the moment a real upstream would stop generating."""

    def __init__(self) -> None:
        import socket
        import threading

        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/v1"
        self.hung_up = threading.Event()
        self.asked = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        conn.settimeout(60)
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(65536)
        head, _, body = request.partition(b"\r\n\r\n")
        length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
        while len(body) < length:
            body += conn.recv(65536)
        if json.loads(body)["stream"]:
            event = b'data: {"choices": [{"delta": {"content": "Tides"}}]}\n\n'
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                + f"{len(event):x}\r\n".encode()
                + event
                + b"\r\n"
            )
        self.asked.set()
        try:
            while conn.recv(65536):  # the caller sends nothing more: recv returns b"" once it hangs up
                pass
            self.hung_up.set()
        except OSError:
            pass
        finally:
            conn.close()
            self.server.close()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "generate"])
def test_a_cancel_hangs_up_on_a_stalled_upstream(stream):
    """A cancel set on another thread (the client left) closes the upstream connection at once, whether the
    call is reading a stream or still waiting for the upstream's headers, and the call ends without a retry.
    Closing the response alone leaves the read blocked and the connection open: the upstream (another Sift, a
    vLLM) would generate on for nobody (tests/test_answer_server.py shows it end to end)."""
    import threading

    from app.generation.base import Cancel, GenerationError

    upstream = StalledUpstream()
    generator = OpenAICompatibleGenerator(upstream.url, "m", timeout_s=600, deadline_s=600, max_retries=3)
    cancel, out = Cancel(), []

    def call() -> None:
        try:
            if stream:
                out.append(list(generator.stream(MESSAGES, GenerationOptions(), cancel)))
            else:
                out.append(generator.generate(MESSAGES, GenerationOptions(), cancel))
        except GenerationError as exc:
            out.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    assert upstream.asked.wait(60)
    time.sleep(0.5)  # the call is now blocked reading (the stream's second event, or the headers)
    assert not upstream.hung_up.is_set() and caller.is_alive()
    cancel.set()
    # bounds that only catch a hang: without the hang-up, both wait for the 600 s read timeout
    assert upstream.hung_up.wait(30), "the upstream connection stayed open after the cancel"
    caller.join(30)
    assert not caller.is_alive()
    if stream:
        assert out == [["Tides"]]  # what came before the cancel, then the end
    else:
        assert isinstance(out[0], GenerationError) and "cancelled" in str(out[0])
