"""`OpenAICompatibleGenerator`: chat completions from any OpenAI-compatible server (vLLM, TGI, Ollama,
llama.cpp server, OpenAI, or another Sift) over httpx, with timeouts, bounded retries with exponential
backoff, and streaming."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator

import httpx

from app.generation.base import Generation, GenerationOptions, Message, StopTrimmer, trim_at_stop

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RemoteGenerationError(RuntimeError):
    """The remote server failed or refused after the allowed retries."""


class OpenAICompatibleGenerator:
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
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = model
        self.context_window = context_window
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        headers = {"content-type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport)

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

    def _post(self, body: dict) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.post("/chat/completions", json=body)
                if response.status_code not in RETRY_STATUS:
                    break
                reason = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                response, reason = None, f"{type(exc).__name__}: {exc}"
            if attempt == self.max_retries:
                raise RemoteGenerationError(f"{self.base_url}: {reason} after {attempt + 1} attempts")
            delay = self.backoff_s * (2**attempt)
            log.warning("generator %s: %s; retrying in %.2f s", self.base_url, reason, delay)
            time.sleep(delay)
        assert response is not None
        if response.status_code >= 400:
            raise RemoteGenerationError(f"{self.base_url}: HTTP {response.status_code}: {response.text[:300]}")
        return response

    def generate(self, messages: list[Message], options: GenerationOptions) -> Generation:
        data = self._post(self._body(messages, options, stream=False)).json()
        choice = data["choices"][0]
        text, stopped = trim_at_stop(choice["message"]["content"] or "", options.stop)
        usage = data.get("usage") or {}
        finish = "stop" if stopped else choice.get("finish_reason") or "stop"
        return Generation(text.strip(), usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), finish)

    def stream(self, messages: list[Message], options: GenerationOptions) -> Iterator[str]:
        body = self._body(messages, options, stream=True)
        trimmer = StopTrimmer(options.stop)
        for attempt in range(self.max_retries + 1):
            try:
                with self.client.stream("POST", "/chat/completions", json=body) as response:
                    if response.status_code in RETRY_STATUS and attempt < self.max_retries:
                        time.sleep(self.backoff_s * (2**attempt))
                        continue
                    if response.status_code >= 400:
                        response.read()
                        raise RemoteGenerationError(
                            f"{self.base_url}: HTTP {response.status_code}: {response.text[:300]}"
                        )
                    for line in response.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            break
                        delta = json.loads(payload)["choices"][0].get("delta", {}).get("content")
                        if delta:
                            out = trimmer.feed(delta)
                            if out:
                                yield out
                            if trimmer.stopped:
                                return
                    tail = trimmer.flush()
                    if tail:
                        yield tail
                    return
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise RemoteGenerationError(f"{self.base_url}: {exc} after {attempt + 1} attempts") from exc
                time.sleep(self.backoff_s * (2**attempt))
