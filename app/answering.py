"""The answer path, shared by `/v1/answer`, `/v1/chat/completions` and `sift eval qa`.

`Answerer.prepare()` retrieves (through the search pipeline), applies the score threshold, fits the best
passages into the generator's token budget and renders the prompt template. `Answerer.pieces()` then yields
the answer text piece by piece for any `answer.mode`:

- `generative`: the generator's tokens; `citations()` maps each `[n]` in the answer back to its passage;
- `extractive`: the reader's best span over the chosen passages, as one piece: the sentence that holds it
  (`answer.extractive_text: sentence`, so a chat reads a sentence) or the bare span (`span`). Its citation
  carries the passage id and the span's character offsets (`passage_text[start:end] == span.text`); a span
  whose calibrated confidence is below `answer.min_reader_confidence` declines the question;
- `extract-then-generate`: the span and its sentence are the generator's only context.

`Answerer.finish()` turns the full text into the final `AnswerResult` (citations, usage, finish reason).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pysbd
import yaml

from app.generation.base import Cancel, Generation, GenerationOptions, Generator, Message
from app.generation.pool import GenerationPool
from app.pipeline import Pipeline, SearchOptions
from app.settings import AnswerSettings

log = logging.getLogger(__name__)
_CITE = re.compile(r"\[(\d{1,2})\]")
_WORD = re.compile(r"\w\w+", re.UNICODE)
DISCONNECT_POLL_S = 0.25  # how often a non-streamed answer checks that its client is still there


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
    missing_shards: list[str] = field(default_factory=list)  # shards left out of retrieval (`allow_partial`)


@dataclass
class AnswerResult:
    text: str
    answered: bool
    citations: list[dict[str, Any]]
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    span: dict[str, Any] | None = None  # extractive modes: the reader's span and its confidence


@dataclass
class _Run:
    """State of one answer being produced (what `finish` needs besides the text)."""

    span: Any = None
    span_passage: dict[str, Any] | None = None
    declined: bool = False


class Answerer:
    """Retrieval + prompt building + reading/generation + citation mapping, for every answer mode."""

    def __init__(
        self,
        pipeline: Pipeline,
        generator: Generator | None,
        settings: AnswerSettings,
        reader: Any = None,
        pool: GenerationPool | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.generator = generator
        self.reader = reader
        self.settings = settings
        # generation and reading run here, never on the threads retrieval uses; the composition root shares
        # one pool (server.max_concurrent_generations) across every build and collection
        self.pool = pool or GenerationPool(4)
        self.mode = settings.mode
        if self.mode != "generative" and reader is None:
            raise ValueError(f"answer.mode {self.mode!r} needs a reader (answer.reader)")
        if self.mode != "extractive" and generator is None:
            raise ValueError(f"answer.mode {self.mode!r} needs a generator (generator.backend)")
        self.template = PromptTemplate.load(settings.template)
        # sentence boundaries for extractive answers (rule-based, no model; one per answerer, used read-only)
        self.segmenter = pysbd.Segmenter(language="en", clean=False, char_span=True)
        self.name: str = (
            generator.name
            if self.mode != "extractive" and generator is not None
            else getattr(reader, "name", "extractive-reader")
        )

    @property
    def context_window(self) -> int:
        return self.generator.context_window if self.generator is not None else 1 << 20

    def count_tokens(self, text: str) -> int:
        if self.generator is not None:
            return self.generator.count_tokens(text)
        return len(self.reader.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- producing the answer ------------------------------------------------------------------------------

    def _read(self, prepared: PreparedAnswer, run: _Run) -> None:
        with self.pipeline.tracer.span("sift.read", **{"sift.passages": len(prepared.passages)}):
            span = self.reader.read(prepared.question, [p["text"] for p in prepared.passages])
        run.span = span
        if span is None or (
            self.settings.min_reader_confidence is not None and span.confidence < self.settings.min_reader_confidence
        ):
            run.declined = True
            return
        run.span_passage = prepared.passages[span.passage]

    @staticmethod
    def _span_passage(run: _Run) -> dict[str, Any]:
        if run.span_passage is None:
            raise RuntimeError("no span was read for this answer (the reader declined or did not run)")
        return run.span_passage

    def _generator(self) -> Generator:
        if self.generator is None:
            raise RuntimeError(f"answer.mode {self.mode!r} generates no text here (no generator)")
        return self.generator

    def span_sentence(self, run: _Run) -> str:
        """The sentence of the span's passage that holds the span (all the sentences it crosses)."""
        text: str = self._span_passage(run)["text"]
        left, right = sentence_bounds(self.segmenter, text, run.span.start, run.span.end)
        return text[left:right]

    def span_messages(self, prepared: PreparedAnswer, run: _Run) -> list[Message]:
        """extract-then-generate: the span's sentence (and the span) as the only context."""
        sentence = self.span_sentence(run)
        title = self._span_passage(run)["title"]
        context = self.template.passage.format(n=1, title=title, text=sentence)
        context += f"\n(Extracted answer: {run.span.text})"
        return self.template.messages(context, prepared.question)

    def _plan(self, prepared: PreparedAnswer, run: _Run) -> tuple[str | None, list[Message] | None]:
        """(the answer text when it is already decided, else the messages to generate from). Blocking: the
        reader runs here."""
        if not prepared.answerable:
            return prepared.no_answer, None
        if self.mode == "generative":
            return None, prepared.messages
        self._read(prepared, run)
        if run.declined:
            return prepared.no_answer, None
        if self.mode == "extractive":
            return (self.span_sentence(run) if self.settings.extractive_text == "sentence" else run.span.text), None
        return None, self.span_messages(prepared, run)

    def grounding_context(self, prepared: PreparedAnswer, run: _Run) -> list[str]:
        """The texts a generated answer should keep to (grounded decoding): the span's sentence in
        extract-then-generate, else the passages in the prompt."""
        if run.span_passage is not None:
            return [self.span_sentence(run)]
        return [p["text"] for p in prepared.passages]

    def generation_messages(self, prepared: PreparedAnswer) -> list[Message] | None:
        """The messages this answerer's generator would answer `prepared` from (the reader runs first in
        extract-then-generate), or None when the answer is decided without generating (extractive mode, no
        answerable passage, a declined span). Blocking. For scoring a reply, e.g. the gold answer's perplexity."""
        return self._plan(prepared, _Run())[1]

    def pieces(
        self, prepared: PreparedAnswer, options: GenerationOptions, run: _Run, cancel: Cancel | None = None
    ) -> Iterator[str]:
        """The answer text, piece by piece (blocking; run it on a worker thread)."""
        text, messages = self._plan(prepared, run)
        if messages is None:
            yield text or ""  # `_plan` decided the text (it gives messages or text, never neither)
        else:
            context = self.grounding_context(prepared, run)
            yield from self._generator().stream(messages, options, cancel, context, [prepared.question])

    def finish(
        self, prepared: PreparedAnswer, text: str, run: _Run, generation: Generation | None = None
    ) -> AnswerResult:
        """The final result; `generation` (non-streamed answers) supplies finish reason and token usage."""
        answered = prepared.answerable and not run.declined
        span = None
        if run.span is not None:
            span = {
                "text": run.span.text,
                "passage_id": prepared.passages[run.span.passage]["passage_id"],
                "start": run.span.start,
                "end": run.span.end,
                "confidence": round(run.span.confidence, 4),
            }
        if not answered:
            cited: list[dict[str, Any]] = []
        elif run.span_passage is not None:
            p = run.span_passage
            cited = [
                {
                    "n": p["n"],
                    "doc_id": p["doc_id"],
                    "passage_id": p["passage_id"],
                    "title": p["title"],
                    "text": p["text"],
                    "inferred": False,
                    "start": run.span.start,
                    "end": run.span.end,
                }
            ]
        else:
            cited = citations(text, prepared.passages)
        if generation is None:
            return AnswerResult(text, answered, cited, span=span)
        return AnswerResult(
            text,
            answered,
            cited,
            generation.finish_reason,
            generation.prompt_tokens,
            generation.completion_tokens,
            span,
        )

    def admit(self) -> None:
        """Take a generation slot for one answer, or raise `Busy` (the caller calls `dismiss()` when done)."""
        self.pool.acquire()

    def dismiss(self) -> None:
        self.pool.release()

    async def answer(
        self,
        prepared: PreparedAnswer,
        options: GenerationOptions,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> AnswerResult:
        """The whole answer (reading and generation on the generation pool's threads). `disconnected` is
        polled while it runs: once the client has gone, generation stops at its next token."""
        cancel = Cancel()
        work = asyncio.ensure_future(self._answer(prepared, options, cancel))
        if disconnected is not None:
            while not work.done():
                await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
                if not work.done() and await disconnected():
                    cancel.set()
                    break
        return await work

    async def _answer(self, prepared: PreparedAnswer, options: GenerationOptions, cancel: Cancel) -> AnswerResult:
        run = _Run()
        text, messages = await self.pool.run(self._plan, prepared, run)
        if messages is None:
            return self.finish(prepared, text or "", run)  # `_plan` decided the text
        with self.pipeline.tracer.span("sift.generate", **self._trace_attrs(options)) as span:
            context = self.grounding_context(prepared, run)
            result = await self.pool.run(
                self._generator().generate, messages, options, cancel, context, [prepared.question]
            )
            if span is not None:
                span.set_attribute("sift.completion_tokens", result.completion_tokens)
        return self.finish(prepared, result.text, run, result)

    def _trace_attrs(self, options: GenerationOptions, stream: bool = False) -> dict[str, Any]:
        return {
            "sift.model": self.name,
            "sift.mode": self.mode,
            "sift.max_new_tokens": options.max_new_tokens,
            "sift.stream": stream,
        }

    async def stream(
        self,
        prepared: PreparedAnswer,
        options: GenerationOptions,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> AsyncIterator[str | AnswerResult]:
        """Yields text pieces as they are produced, then the final `AnswerResult`. `disconnected` is polled
        while waiting for the next piece: once the client has gone, generation stops and the stream ends
        without a result."""
        run = _Run()
        parts: list[str] = []
        span = self.pipeline.tracer.start("sift.generate", **self._trace_attrs(options, stream=True))
        error: BaseException | None = None
        cancel = Cancel()
        try:
            async for piece in iterate_in_thread(
                lambda: self.pieces(prepared, options, run, cancel), self.pool, cancel, disconnected
            ):
                parts.append(piece)
                yield piece
        except BaseException as exc:
            error = exc
            raise
        finally:
            if span is not None:
                span.set_attribute("sift.pieces", len(parts))
            self.pipeline.tracer.end(span, error)
        if not cancel.is_set():
            yield self.finish(prepared, "".join(parts), run)

    def clears_threshold(self, hit_stages: dict[str, Any], reranked: bool) -> bool:
        if reranked and "rerank" in hit_stages and hit_stages["rerank"].score is not None:
            limit = self.settings.min_rerank_score
            return limit is None or hit_stages["rerank"].score >= limit
        dense = hit_stages.get("dense")
        limit = self.settings.min_dense_score
        if limit is None:
            return True
        return dense is not None and dense.score is not None and dense.score >= limit

    @staticmethod
    def chat_query(user_texts: list[str]) -> str:
        """A chat's retrieval query from its user messages, in order: the last one, prefixed by the one before
        when it is a short follow-up (fewer than 8 words: "and in 1890?")."""
        users = [t.strip() for t in user_texts if t.strip()]
        last = users[-1]
        if len(users) > 1 and len(last.split()) < 8:
            return f"{users[-2]} {last}"
        return last

    @staticmethod
    def with_instructions(prepared: PreparedAnswer, instructions: list[str]) -> PreparedAnswer:
        """`prepared` with a chat's system and developer texts appended to its prompt's first (system)
        message, so the caller's instructions reach the generator beside the template's."""
        if instructions:
            prepared.messages[0]["content"] += "\n" + "\n".join(instructions)
        return prepared

    async def prepare(self, question: str, options: SearchOptions, passages: int | None = None) -> PreparedAnswer:
        result = await self.pipeline.search(question, options)
        wanted = passages or self.settings.passages
        budget = min(self.settings.context_budget, self.context_window - 256)
        chosen: list[dict[str, Any]] = []
        used = 0
        answerable = self.mode != "generative" or any(
            self.clears_threshold(h.stages, options.rerank) for h in result.hits[:wanted]
        )
        for hit in result.hits:
            if len(chosen) >= wanted:
                break
            passage = result.passages[hit.idx]
            rendered = self.template.passage.format(n=len(chosen) + 1, title=passage["title"], text=passage["text"])
            cost = self.count_tokens(rendered)
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
            missing_shards=list(result.missing_shards),
        )

    def given(self, question: str, passages: list[dict[str, Any]], render: bool = True) -> PreparedAnswer:
        """A prepared answer over passages the caller chose (e.g. the gold paragraph in `sift eval qa`);
        no retrieval and no threshold. `render=False` puts the bare passage texts into the prompt."""
        chosen = [{**p, "n": i + 1} for i, p in enumerate(passages)]
        if render:
            block = "\n".join(
                self.template.passage.format(n=p["n"], title=p.get("title", ""), text=p["text"]) for p in chosen
            )
        else:
            block = "\n".join(p["text"] for p in chosen)
        messages = self.template.messages(block, question)
        return PreparedAnswer(question, messages, chosen, {}, bool(chosen), self.template.no_answer, len(chosen))

    def _truncate(self, text: str, tokens: int) -> str:
        tokenizer = getattr(self.generator, "tokenizer", None) or getattr(self.reader, "tokenizer", None)
        if tokenizer is None:
            return text[: tokens * 4]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        return tokenizer.decode(ids)


def sentence_bounds(segmenter: pysbd.Segmenter, text: str, start: int, end: int) -> tuple[int, int]:
    """Character bounds `(left, right)` of the sentences of `text` that hold `text[start:end]`, trailing
    whitespace excluded. Invariant: `left <= start` and `end <= right`, so the sentence contains the span."""
    left, right = 0, len(text)
    try:
        spans = segmenter.segment(text)
    except Exception:  # noqa: BLE001 - a rule-based splitter's bug on odd text: the passage holds the span too
        log.warning("sentence splitting failed; answering with the whole passage", exc_info=True)
        spans = []
    for sentence in spans:
        if sentence.end <= start:
            left = sentence.end
        elif sentence.start >= end:
            right = min(right, sentence.start)
            break
    left, right = min(left, start), max(right, end)
    while right > end and text[right - 1].isspace():
        right -= 1
    while left < start and text[left].isspace():
        left += 1
    return left, right


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


async def iterate_in_thread(
    make: Any,
    pool: GenerationPool,
    cancel: Cancel,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[Any]:
    """Consume a blocking iterator on a generation thread, yielding its items to the event loop. When the
    consumer stops early, or `disconnected()` says the client went away (polled while waiting for an item),
    `cancel` is set and the iterator is closed at its next item, so the generation behind it stops within a
    token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (server shutting down)
            cancel.set()

    def run() -> None:
        iterator = make()
        try:
            for item in iterator:
                if cancel.is_set():
                    break
                put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            put(done)

    pool.start(run)  # the request id and the current span follow onto the thread
    finished = False
    checked = loop.time()
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            while True:
                await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                # checked while waiting and, as pieces flow, at least every DISCONNECT_POLL_S (a server may drop
                # writes to a closed connection silently, so sending does not tell)
                if disconnected is not None and loop.time() - checked >= DISCONNECT_POLL_S:
                    checked = loop.time()
                    if await disconnected():
                        getter.cancel()
                        cancel.set()
                        return
                if getter.done():
                    break
            item = getter.result()
            if item is done:
                finished = True
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if not finished:
            cancel.set()  # the consumer left early: stop the generation
