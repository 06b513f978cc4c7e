"""The generator interface and the decoding options every backend understands."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

Message = dict[str, str]


class GenerationOptions(BaseModel):
    """Decoding controls. Greedy when `temperature` is 0 (the default); sampling when it is above 0;
    beam search when `num_beams` > 1 (greedy only)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1, le=2048, description="most tokens to generate", examples=[128])
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy; > 0 samples", examples=[0.0])
    top_k: int | None = Field(None, ge=1, le=1000, description="sample from the k likeliest tokens", examples=[50])
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass", examples=[0.9])
    repetition_penalty: float = Field(1.0, gt=0.0, le=3.0, description="> 1 discourages repeats", examples=[1.1])
    num_beams: int = Field(1, ge=1, le=8, description="beam search width (greedy decoding only)", examples=[1])
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


class Generator(Protocol):
    """What the answer and chat endpoints need from a backend."""

    name: str
    context_window: int

    def count_tokens(self, text: str) -> int: ...

    def generate(self, messages: list[Message], options: GenerationOptions) -> Generation: ...

    def stream(self, messages: list[Message], options: GenerationOptions) -> Iterator[str]: ...


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
