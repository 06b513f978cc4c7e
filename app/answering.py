"""The reader stage: turn a question and retrieved passages into a prompt, and an answer into citations.

`Answerer.prepare()` retrieves (through the search pipeline), applies the score threshold, fits the best
passages into the generator's token budget and renders the prompt template; the API then calls the
generator (streamed or not) and `citations()` maps each `[n]` in the answer back to its passage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app.generation.base import Generator, Message
from app.pipeline import Pipeline, SearchOptions
from app.settings import AnswerSettings

_CITE = re.compile(r"\[(\d{1,2})\]")
_WORD = re.compile(r"\w\w+", re.UNICODE)


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template from `configs/prompts/*.yaml`: system text, optional example turns, user text."""

    system: str
    user: str
    passage: str
    no_answer: str
    examples: tuple[tuple[str, str], ...] = ()

    @classmethod
    def load(cls, path: Path) -> PromptTemplate:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        examples = tuple((e["user"], e["assistant"]) for e in data.get("examples") or [])
        return cls(data["system"].strip(), data["user"], data["passage"], data["no_answer"].strip(), examples)

    def messages(self, passages: str, question: str) -> list[Message]:
        """System message, example turns, then the question with its passages."""
        out: list[Message] = [{"role": "system", "content": self.system}]
        for user, assistant in self.examples:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        out.append({"role": "user", "content": self.user.format(passages=passages, question=question)})
        return out


@dataclass
class PreparedAnswer:
    """What the generator needs, and what the response reports besides the answer."""

    question: str
    messages: list[Message]
    passages: list[dict[str, Any]]  # numbered from 1, as cited
    timings_ms: dict[str, float]
    answerable: bool
    no_answer: str
    considered: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Answerer:
    """Retrieval + prompt building + citation mapping around any `Generator`."""

    def __init__(self, pipeline: Pipeline, generator: Generator, settings: AnswerSettings) -> None:
        self.pipeline = pipeline
        self.generator = generator
        self.settings = settings
        self.template = PromptTemplate.load(settings.template)

    def clears_threshold(self, hit_stages: dict[str, Any], reranked: bool) -> bool:
        if reranked and "rerank" in hit_stages and hit_stages["rerank"].score is not None:
            limit = self.settings.min_rerank_score
            return limit is None or hit_stages["rerank"].score >= limit
        dense = hit_stages.get("dense")
        limit = self.settings.min_dense_score
        if limit is None:
            return True
        return dense is not None and dense.score is not None and dense.score >= limit

    async def prepare(self, question: str, options: SearchOptions, passages: int | None = None) -> PreparedAnswer:
        result = await self.pipeline.search(question, options)
        wanted = passages or self.settings.passages
        budget = min(self.settings.context_budget, self.generator.context_window - 256)
        chosen, used = [], 0
        answerable = any(self.clears_threshold(h.stages, options.rerank) for h in result.hits[:wanted])
        for hit in result.hits:
            if len(chosen) >= wanted:
                break
            passage = result.passages[hit.idx]
            rendered = self.template.passage.format(n=len(chosen) + 1, title=passage["title"], text=passage["text"])
            cost = self.generator.count_tokens(rendered)
            if used + cost > budget:
                if chosen:
                    continue
                rendered = self._truncate(rendered, budget)
                cost = budget
            used += cost
            chosen.append(
                {
                    "n": len(chosen) + 1,
                    "doc_id": hit.doc_id,
                    "passage_id": hit.passage_id,
                    "title": passage["title"],
                    "text": passage["text"],
                    "score": hit.score,
                    "rendered": rendered,
                }
            )
        block = "\n".join(p["rendered"] for p in chosen)
        messages = self.template.messages(block, question)
        for p in chosen:
            p.pop("rendered")
        return PreparedAnswer(
            question,
            messages,
            chosen,
            dict(result.timings_ms),
            answerable and bool(chosen),
            self.template.no_answer,
            considered=len(result.hits),
        )

    def _truncate(self, text: str, tokens: int) -> str:
        tokenizer = getattr(self.generator, "tokenizer", None)
        if tokenizer is None:
            return text[: tokens * 4]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        return tokenizer.decode(ids)


def citations(answer: str, passages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each `[n]` in the answer mapped to its passage. When the model cites nothing, the passage sharing the
    most words with the answer is attributed instead, marked `inferred: true`."""
    by_n = {p["n"]: p for p in passages}
    cited, out = [], []
    for match in _CITE.finditer(answer):
        n = int(match.group(1))
        if n in by_n and n not in cited:
            cited.append(n)
    for n in cited:
        p = by_n[n]
        out.append(
            {
                "n": n,
                "doc_id": p["doc_id"],
                "passage_id": p["passage_id"],
                "title": p["title"],
                "text": p["text"],
                "inferred": False,
            }
        )
    if not out and passages and answer.strip():
        words = {w.lower() for w in _WORD.findall(answer)}
        overlap = [(len(words & {w.lower() for w in _WORD.findall(p["text"])}), -p["n"], p) for p in passages]
        best = max(overlap, key=lambda t: (t[0], t[1]))
        if best[0] > 0:
            p = best[2]
            out.append(
                {
                    "n": p["n"],
                    "doc_id": p["doc_id"],
                    "passage_id": p["passage_id"],
                    "title": p["title"],
                    "text": p["text"],
                    "inferred": True,
                }
            )
    return out
