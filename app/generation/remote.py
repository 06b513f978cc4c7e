"""`OpenAICompatibleGenerator`: chat completions from any OpenAI-compatible server (vLLM, TGI, Ollama,
llama.cpp server, OpenAI, or another Sift) over httpx, with a total deadline, bounded retries with exponential
backoff (before the first token only), cancellation and streaming."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from app.generation.base import (
    Cancel,
    Generation,
    GenerationError,
    GenerationOptions,
    Message,
    StopTrimmer,
    trim_at_stop,
)

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RemoteGenerationError(GenerationError):
    """The remote server failed or refused after the allowed retries (or the deadline passed)."""


class _Upstream:
    """One upstream call's connection, so that a cancel (set on another thread) can hang up at once.

    Closing an httpx response from another thread does not end a read blocked on its socket, and the blocked
    read keeps the connection open: the upstream never sees the client leave and generates on for nobody. So
    `hang_up` shuts the socket down first (which wakes the read, and sends the upstream its FIN), then closes
    the response. The socket is taken from httpcore's trace as the connection opens, before any byte of the
    response, so a call still waiting for the upstream's headers (a non-streamed one) hangs up too."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.response: httpx.Response | None = None
        self.hung_up = False
        self._lock = threading.Lock()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event != "connection.connect_tcp.complete":
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self.sock = sock
            hung_up = self.hung_up
        if hung_up:
            self._shutdown()

    def opened(self, response: httpx.Response) -> bool:
        """Keep the call's response (for `hang_up`); False, with the response closed, when the call was hung
        up before it came back."""
        with self._lock:
            self.response = response
            hung_up = self.hung_up
        if hung_up:
            response.close()
        return not hung_up

    def hang_up(self) -> None:
        with self._lock:
            self.hung_up = True
            response = self.response
        self._shutdown()
        if response is not None:
            response.close()

    def _shutdown(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


class OpenAICompatibleGenerator:
    """Chat completions from a remote server. Every call has a total deadline (`deadline_s`) across its
    attempts; a stream is retried only before its first token (after that a retry would repeat text);
    upstream URLs and bodies go to the log, never into the error clients see."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 2,
        backoff_s: float = 0.5,
        context_window: int = 8192,
        transport: httpx.BaseTransport | None = None,
        deadline_s: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = model
        self.context_window = context_window
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        headers = {"content-type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        # a fresh connection per call (no keep-alive): its socket is seen as it opens, so a cancel can hang up
        # even while the call still waits for the upstream's first byte (`_Upstream`)
        limits = httpx.Limits(max_keepalive_connections=0)
        self.client = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport, limits=limits
        )

    def count_tokens(self, text: str) -> int:
        """Approximate (no remote tokenizer): about four characters per token, rounded up."""
        return max(1, (len(text) + 3) // 4)

    def _body(self, messages: list[Message], options: GenerationOptions, stream: bool) -> dict:
        if options.num_beams > 1:
            raise ValueError(
                "num_beams: the OpenAI protocol has no beam search; use num_beams=1 with a remote generator"
            )
        body: dict = {
            "model": self.name,
            "messages": messages,
            "max_tokens": options.max_new_tokens,
            "temperature": options.temperature,
            "stream": stream,
        }
        if options.top_p is not None:
            body["top_p"] = options.top_p
        if options.top_k is not None:
            body["top_k"] = options.top_k  # vLLM, TGI, llama.cpp accept it; OpenAI ignores unknown sampling keys
        if options.repetition_penalty != 1.0:
            body["repetition_penalty"] = options.repetition_penalty
        if options.seed is not None:
            body["seed"] = options.seed
        if options.stop:
            body["stop"] = options.stop
        return body

    # -- failures ------------------------------------------------------------------------------------------

    def _fail(self, public: str, detail: str) -> RemoteGenerationError:
        log.warning(json.dumps({"event": "generator_failed", "upstream": self.base_url, "detail": detail[:500]}))
        return RemoteGenerationError(f"the generator backend failed ({public}); see the server log", detail)

    def _timeout(self, deadline: float) -> httpx.Timeout:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._fail("deadline passed", f"no answer within generator.deadline_s={self.deadline_s}")
        return httpx.Timeout(min(self.timeout_s, remaining))

    def _wait(self, attempt: int, deadline: float, cancel: Cancel | None) -> None:
        """Back off before the next attempt (never past the deadline; woken early by a cancel)."""
        delay = min(self.backoff_s * (2**attempt), max(0.0, deadline - time.monotonic()))
        if cancel is not None:
            cancel.wait(delay)
        else:
            time.sleep(delay)

    def _open(self, body: dict, deadline: float, cancel: Cancel | None) -> httpx.Response:
        """A response whose status is neither retryable nor an error (body not read yet)."""
        for attempt in range(self.max_retries + 1):
            if cancel is not None and cancel.is_set():
                raise GenerationError("cancelled: the client went away")
            upstream = _Upstream()
            try:
                request = self.client.build_request(
                    "POST",
                    "/chat/completions",
                    json=body,
                    timeout=self._timeout(deadline),
                    extensions={"trace": upstream.trace},
                )
                if cancel is not None:
                    cancel.on_cancel(upstream.hang_up)
                response = self.client.send(request, stream=True)
                if not upstream.opened(response):
                    raise GenerationError("cancelled: the client went away")
                if response.status_code not in RETRY_STATUS:
                    if response.status_code >= 400:
                        response.read()
                        response.close()
                        raise self._fail(
                            f"HTTP {response.status_code}", f"HTTP {response.status_code}: {response.text[:300]}"
                        )
                    return response
                response.read()
                response.close()
                reason = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                if cancel is not None and cancel.is_set():  # hung up by the cancel: no retry
                    raise GenerationError("cancelled: the client went away") from exc
                reason = f"{type(exc).__name__}: {exc}"
            if attempt == self.max_retries or time.monotonic() >= deadline:
                raise self._fail(reason.split(":")[0], f"{reason} after {attempt + 1} attempts")
            log.warning(json.dumps({"event": "generator_retry", "upstream": self.base_url, "reason": reason}))
            self._wait(attempt, deadline, cancel)
        raise AssertionError("unreachable")

    # -- calls ---------------------------------------------------------------------------------------------

    def generate(
        self,
        messages: list[Message],
        options: GenerationOptions,
        cancel: Cancel | None = None,
        context: Sequence[str] = (),  # grounded decoding is local only: the server decodes
        avoid: Sequence[str] = (),
    ) -> Generation:
        deadline = time.monotonic() + self.deadline_s
        response = self._open(self._body(messages, options, stream=False), deadline, cancel)
        try:
            response.read()
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if cancel is not None and cancel.is_set():
                raise GenerationError("cancelled: the client went away") from exc
            raise self._fail(type(exc).__name__, str(exc)) from exc
        finally:
            response.close()
        try:
            data = response.json()
            choice = data["choices"][0]
            content = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise self._fail("unreadable response", f"{type(exc).__name__}: {response.text[:300]}") from exc
        text, stopped = trim_at_stop(content, options.stop)
        usage = data.get("usage") or {}
        finish = "stop" if stopped else choice.get("finish_reason") or "stop"
        return Generation(text.strip(), usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), finish)

    def stream(
        self,
        messages: list[Message],
        options: GenerationOptions,
        cancel: Cancel | None = None,
        context: Sequence[str] = (),  # grounded decoding is local only: the server decodes
        avoid: Sequence[str] = (),
    ) -> Iterator[str]:
        deadline = time.monotonic() + self.deadline_s
        response = self._open(self._body(messages, options, stream=True), deadline, cancel)
        trimmer = StopTrimmer(options.stop)
        try:
            for line in response.iter_lines():
                if cancel is not None and cancel.is_set():
                    return
                if time.monotonic() > deadline:
                    raise self._fail("deadline passed", f"stream still open after {self.deadline_s} s")
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    delta = json.loads(payload)["choices"][0].get("delta", {}).get("content")
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    raise self._fail("unreadable stream", f"{type(exc).__name__}: {payload[:300]}") from exc
                if delta:
                    out = trimmer.feed(delta)
                    if out:
                        yield out
                    if trimmer.stopped:
                        return
            tail = trimmer.flush()
            if tail:
                yield tail
        except (httpx.HTTPError, httpx.StreamError) as exc:
            # after the first token a retry would repeat text, so a broken stream is an error
            if cancel is not None and cancel.is_set():
                return  # hung up by the cancel
            raise self._fail(type(exc).__name__, f"stream broke: {exc}") from exc
        finally:
            response.close()
