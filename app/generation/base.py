"""The generator interface and the decoding options every backend understands."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

Message = dict[str, str]


class GenerationOptions(BaseModel):
    """Decoding controls. Greedy when `temperature` is 0 (the default); sampling when it is above 0;
    beam search when `num_beams` > 1 (greedy only)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(
        128, ge=1, description="most tokens to generate (at most answer.max_tokens_limit)", examples=[128]
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy; > 0 samples", examples=[0.0])
    top_k: int | None = Field(
        None, ge=1, le=1000, description="sample from the k likeliest tokens (only with temperature > 0)"
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass (only with temperature > 0)")
    repetition_penalty: float = Field(1.0, gt=0.0, le=3.0, description="> 1 discourages repeats", examples=[1.1])
    num_beams: int = Field(
        1, ge=1, le=8, description="beam search width (only with temperature 0 and stream false)", examples=[1]
    )
    seed: int | None = Field(None, ge=0, description="makes sampling reproducible", examples=[7])
    stop: list[str] = Field(default_factory=list, max_length=4, description="stop sequences", examples=[["\n\n"]])

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def problems(self, stream: bool = False) -> list[tuple[str, str]]:
        """(field, why) for every invalid combination; empty when the options are usable."""
        found = []
        if self.num_beams > 1 and self.sampling:
            found.append(("num_beams", "beam search is greedy here; set temperature to 0 or num_beams to 1"))
        if self.num_beams > 1 and stream:
            found.append(
                ("num_beams", "streaming supports greedy or sampling only; set num_beams to 1 or stream to false")
            )
        if not self.sampling and self.top_k is not None:
            found.append(("top_k", "top_k only applies when sampling; set temperature > 0"))
        if not self.sampling and self.top_p is not None:
            found.append(("top_p", "top_p only applies when sampling; set temperature > 0"))
        if any(not s for s in self.stop):
            found.append(("stop", "stop sequences must be non-empty strings"))
        return found


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class GenerationError(RuntimeError):
    """A backend failed. `str()` is safe to show to API clients (no URLs, no upstream bodies); `detail` is
    for the server's log only."""

    def __init__(self, public: str, detail: str = "") -> None:
        super().__init__(public)
        self.detail = detail or public


class Cancel:
    """Set when the client has gone: a generation checks `is_set()` between tokens, and callbacks registered
    with `on_cancel` (e.g. closing an upstream connection) run at once."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, waking early when cancelled; True when cancelled."""
        return self._event.wait(timeout)

    def set(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - best effort: the generation also checks is_set()
                pass

    def on_cancel(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()


class Generator(Protocol):
    """What the answer and chat endpoints need from a backend. Both calls stop early (within a token or a
    read) once `cancel` is set."""

    name: str
    context_window: int

    def count_tokens(self, text: str) -> int: ...

    # `context`: the passage texts the answer should keep to; `avoid`: texts it should not restate (the
    # question). Both steer grounded decoding (`generator.grounding`) in generators that decode locally; a
    # remote one cannot steer the server's decoding and ignores them
    def generate(
        self,
        messages: list[Message],
        options: GenerationOptions,
        cancel: Cancel | None = None,
        context: Sequence[str] = (),
        avoid: Sequence[str] = (),
    ) -> Generation: ...

    def stream(
        self,
        messages: list[Message],
        options: GenerationOptions,
        cancel: Cancel | None = None,
        context: Sequence[str] = (),
        avoid: Sequence[str] = (),
    ) -> Iterator[str]: ...


@runtime_checkable
class TextScorer(Protocol):
    """A generator that can also score a given reply (local models; an OpenAI-compatible server cannot)."""

    def continuation_nll(self, messages: list[Message], text: str) -> tuple[float, int]:
        """(summed negative log-likelihood in nats, token count) of `text` as the reply to `messages`."""
        ...


class StopTrimmer:
    """Feeds streamed text through, holding back anything that could be the start of a stop sequence and
    ending the stream at the first complete stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buffer, self.stopped = self.buffer[:cut], "", True
            return out
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold :]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def trim_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    trimmer = StopTrimmer(stops)
    out = trimmer.feed(text)
    return (out, True) if trimmer.stopped else (out + trimmer.flush(), False)
