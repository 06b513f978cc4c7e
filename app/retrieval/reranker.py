"""Second stage: a cross-encoder re-scores (query, passage) pairs.

`Reranker.score(pairs)` is the synchronous model call (length-sorted batches, passages truncated to
`max_length` tokens by the tokenizer instead of failing). On torch runtimes it runs as `DirectPairScorer`
(Rust tokenizer → the network, no per-call wrapper work), verified at load to give the wrapper's scores.

`MicroBatcher` sits in front of it in the server: pairs from concurrent requests are pooled into batches of
at most `max_batch_size`, waiting at most `max_wait_ms` for a batch to fill, and scored on one worker thread
so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.retrieval.protocols import TextReranker
from app.retrieval.queries import padded
from app.retrieval.types import Hit
from indexer.encoders import pick_device, resolve_model_path
from indexer.runtime import MODEL_LOADS

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

log = logging.getLogger(__name__)


class Reranker(TextReranker):
    """A sentence-transformers `CrossEncoder` with one relevance logit per pair."""

    name = "rerank"

    def __init__(self, model: CrossEncoder, batch_size: int = 32) -> None:
        self.model = model
        self.batch_size = batch_size
        self._lock = threading.Lock()
        import torch

        self._identity = torch.nn.Identity()
        self._direct = DirectPairScorer.of(model, self._predict)

    @classmethod
    def load(
        cls,
        name: str,
        max_length: int = 256,
        device: str | None = None,
        batch_size: int = 32,
        runtime: str = "torch",
        cache_dir: str | Path | None = None,
        threads: int | None = None,
    ) -> Reranker:
        """Load any CrossEncoder by local path or hub id, run by `runtime` (see `indexer.runtime`); on CPU
        the weights are used in float32 (a model stored in fp16, like Sift's shipped one, is up-cast: half
        precision is slow on CPUs)."""
        import torch
        from sentence_transformers import CrossEncoder

        from indexer.runtime import use_runtime

        device = pick_device(device)
        kwargs = {"model_kwargs": {"dtype": torch.float32}} if device == "cpu" else {}
        with MODEL_LOADS:
            model = CrossEncoder(resolve_model_path(name), max_length=max_length, device=device, **kwargs)
            use_runtime(model, "sequence-classification", runtime, cache_dir=cache_dir, threads=threads)
        return cls(model, batch_size=batch_size)

    @property
    def runtime(self) -> str:
        return getattr(self.model, "sift_runtime", "torch")

    @property
    def max_length(self) -> int:
        return pair_budget(self.model)

    @property
    def tokenizer(self) -> Any:  # a Hugging Face tokenizer
        return self.model.tokenizer

    def prepare(self, query: str, texts: list[str], max_tokens_per_doc: int | None) -> tuple[list[str], list[int], int]:
        """Texts to score against `query` (`/v1/rerank`): each cut to `max_tokens_per_doc` tokens; returns
        (texts, indices cut here or by `max_length`, tokens billed: each pair's, capped at `max_length`).
        Under this model's lock: its tokenizer is not thread-safe and a batch may be scoring meanwhile."""
        with self._lock:
            texts, truncated = truncate_texts(self.tokenizer, texts, max_tokens_per_doc)
            pair_tokens = [len(ids) for ids in self.tokenizer([query] * len(texts), texts)["input_ids"]]
        truncated |= {i for i, n in enumerate(pair_tokens) if n > self.max_length}
        return texts, sorted(truncated), int(sum(min(n, self.max_length) for n in pair_tokens))

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """Relevance logits for (query, passage) pairs, computed in length-sorted batches."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        scores = np.empty(len(pairs), dtype=np.float32)
        with self._lock:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = [pairs[i] for i in chunk]
                scores[chunk] = self._direct(batch) if self._direct is not None else self._predict(batch)
        return scores

    @property
    def direct(self) -> bool:
        """Whether scoring runs as `DirectPairScorer` (else through the CrossEncoder's `predict`)."""
        return self._direct is not None

    def _predict(self, batch: list[tuple[str, str]]) -> np.ndarray:
        """Raw logits of one batch through the CrossEncoder's own `predict` (the reference path)."""
        out = self.model.predict(
            batch,
            batch_size=len(batch),
            show_progress_bar=False,
            convert_to_numpy=True,
            activation_fn=self._identity,  # raw logits, not the model's default sigmoid
        )
        return np.asarray(out, dtype=np.float32).reshape(-1)


def pair_budget(model: CrossEncoder) -> int:
    """Tokens per (query, passage) pair the CrossEncoder keeps (`max_seq_length`; `max_length` before
    sentence-transformers 6)."""
    value = getattr(model, "max_seq_length", None) or getattr(model, "max_length", None)
    return int(value or 512)


# a pair's passage is tokenized from a whitespace-cut prefix of this many characters per `max_length` token
# (a WordPiece token is at least one character, so a cut prefix that still overflows the budget gives exactly
# the full text's truncation; one that does not overflow is tokenized again whole)
PREFIX_CHARS_PER_TOKEN = 8
DIRECT_PROBE = [
    ("what makes bread rise", "Yeast ferments the sugars in dough and the carbon dioxide it releases makes it rise."),
    ("stars", "Stars fuse hydrogen into helium in their cores. " * 40),
    ("a query much longer than its passage, " * 12, "Short passage."),
    ("Überraschung — naïve café?", "Ünïcödé text, with punctuation: (brackets), [more]; and dashes — here."),
]


class DirectPairScorer:
    """A CrossEncoder on a torch runtime, run as Rust tokenizer (pair truncation and padding as the wrapper's
    tokenizer does them) → the network's logits, with none of the wrapper's per-call work.

    Invariant: it gives the scores `CrossEncoder.predict` gives for the same batch. `of` checks this on
    `DIRECT_PROBE` at load and returns None (the wrapper's path stays) when any score differs by more
    than 1e-4, or when the model is not exactly one Transformer module with one label, no prompt, a fast
    tokenizer that truncates and pads on the right, and a torch network. The passage-prefix shortcut is
    used only with a BERT pre-tokenizer (tokens never span whitespace, so a prefix cut at a space tokenizes
    to a prefix of the full text's tokens)."""

    def __init__(self, model: CrossEncoder) -> None:
        from tokenizers import Tokenizer

        hf = model.tokenizer
        self.network: Any = model.model
        self.max_length = pair_budget(model)
        config = hf.backend_tokenizer.to_str()
        self.tokenizer = Tokenizer.from_str(config)
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first")
        self.tokenizer.no_padding()  # padded by `padded`, after the cut passages that must be tokenized whole are
        self.pad_id, self.pad_type_id = int(hf.pad_token_id or 0), int(hf.pad_token_type_id or 0)
        self.type_ids = "token_type_ids" in hf.model_input_names
        pre = json.loads(config).get("pre_tokenizer") or {}
        self.prefix_chars = self.max_length * PREFIX_CHARS_PER_TOKEN if pre.get("type") == "BertPreTokenizer" else 0

    @classmethod
    def of(
        cls, model: CrossEncoder, reference: Callable[[list[tuple[str, str]]], np.ndarray]
    ) -> DirectPairScorer | None:
        try:
            hf = model.tokenizer
            ok = (
                getattr(model, "sift_runtime", "torch") in ("torch", "torch-bf16")
                and [type(m).__name__ for m in model] == ["Transformer"]
                and int(model.num_labels) == 1
                and not getattr(model, "prompts", None)
                and not getattr(model, "default_prompt_name", None)
                and hasattr(hf, "backend_tokenizer")
                and hf.padding_side == "right"
                and hf.truncation_side == "right"
                and hasattr(model.model, "forward")
            )
            if not ok:
                return None
            direct = cls(model)
            gap = float(np.max(np.abs(direct(DIRECT_PROBE) - reference(DIRECT_PROBE))))
        except (AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
            log.info("cross-encoder scored through its wrapper: %s", exc)
            return None
        if not gap <= 1e-4:
            log.warning("cross-encoder scored through its wrapper: the direct path differs by %.2e", gap)
            return None
        return direct

    def _cut(self, text: str) -> str:
        if not self.prefix_chars or len(text) <= self.prefix_chars:
            return text
        space = text.rfind(" ", 0, self.prefix_chars)
        return text[:space] if space > 0 else text

    def __call__(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """Raw logits of `pairs`, one batch, in order."""
        import torch

        if not pairs:
            return np.zeros(0, dtype=np.float32)
        cut = [(query, self._cut(text)) for query, text in pairs]
        encodings = self.tokenizer.encode_batch(cut)
        for i, encoding in enumerate(encodings):
            # a cut passage that no longer overflows the budget may lack tokens the whole text keeps
            if len(cut[i][1]) < len(pairs[i][1]) and not encoding.overflowing:
                encodings[i] = self.tokenizer.encode(*pairs[i])
        ids, types, mask = padded(encodings, self.pad_id, self.pad_type_id)
        device = self.network.device
        inputs = {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask).to(device)}
        if self.type_ids:
            inputs["token_type_ids"] = torch.from_numpy(types).to(device)
        with torch.inference_mode():
            logits = self.network(**inputs).logits
        scores: np.ndarray = logits.float().cpu().numpy().reshape(-1)
        return scores


def truncate_texts(tokenizer: Any, texts: list[str], max_tokens: int | None) -> tuple[list[str], set[int]]:
    """`texts` with each longer than `max_tokens` tokenizer tokens cut to that many, and the indices cut.
    The caller holds the lock of the model that owns `tokenizer` (tokenizers are not thread-safe)."""
    texts = list(texts)
    cut: set[int] = set()
    if max_tokens:
        for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
            if len(ids) > max_tokens:
                texts[i] = tokenizer.decode(ids[:max_tokens])
                cut.add(i)
    return texts, cut


def _zscore(values: np.ndarray) -> np.ndarray:
    std = values.std()
    return (values - values.mean()) / std if std > 0 else np.zeros_like(values)


def apply_rerank(hits: list[Hit], scores: np.ndarray, interpolation: float = 1.0) -> list[Hit]:
    """Re-order `hits` by one reranker's `scores`, interpolated with their first-stage scores (both
    z-normalised within the list) unless `interpolation` is 1: `combine_stages` with weights 1 − w and w.
    Records stage `rerank` with the raw reranker score; with interpolation 1 that raw score stays the hit's
    score, otherwise the fused one does."""
    combined = combine_stages(
        hits, {"cross_encoder": scores}, {"first_stage": 1 - interpolation, "cross_encoder": interpolation}
    )
    if interpolation < 1.0:
        return combined
    raw = [hit.stages["rerank"].score for hit in combined]
    return [hit if score is None else hit._replace(score=score) for hit, score in zip(combined, raw)]


def combine_stages(hits: list[Hit], scores: dict[str, np.ndarray], weights: dict[str, float]) -> list[Hit]:
    """Re-order `hits` by the weighted sum of z-normalised scores (within the list): `weights["first_stage"]`
    times the hits' own scores, plus `weights[name]` times `scores[name]` for each second-stage component
    (`cross_encoder`, `maxsim`). Records stage `rerank` (the cross-encoder's raw score, else MaxSim's, and
    the final rank) and, when MaxSim ran, stage `maxsim` (its raw score and its own rank); the hit's score
    becomes the fused one. Ties keep the first-stage order."""
    if not hits:
        return []
    final = weights.get("first_stage", 0.0) * _zscore(np.array([h.score for h in hits], dtype=np.float64))
    for name, values in scores.items():
        final = final + weights.get(name, 0.0) * _zscore(np.asarray(values, dtype=np.float64))
    order = sorted(range(len(hits)), key=lambda i: (-final[i], i))
    primary = scores.get("cross_encoder", scores.get("maxsim"))
    maxsim = scores.get("maxsim")
    maxsim_rank = {}
    if maxsim is not None:
        maxsim_rank = {i: r for r, i in enumerate(sorted(range(len(hits)), key=lambda i: (-maxsim[i], i)), start=1)}
    result = []
    for rank, i in enumerate(order, start=1):
        hit = hits[i]
        if maxsim is not None:
            hit = hit.with_stage("maxsim", float(maxsim[i]), maxsim_rank[i])
        hit = hit.with_stage("rerank", float(primary[i]) if primary is not None else None, rank)
        result.append(hit._replace(score=float(final[i])))
    return result


def stack_below(head: list[Hit], tail: list[Hit], gap: float = 1e-3) -> list[Hit]:
    """`head` (re-scored by the second stage) followed by `tail` (the hits below the depth it re-scored),
    with the tail's scores moved below the head's lowest: each tail hit keeps its distance to the first
    tail hit, and the first lies `gap` below the last head hit.

    Invariant: scores never rise as rank falls, so a client that sorts or thresholds by score gets the
    served ranking. The stages a hit went through keep their own scores in `stages`."""
    if not head or not tail:
        return head + tail
    floor = min(h.score for h in head)
    shift = floor - gap - tail[0].score
    return head + [h._replace(score=h.score + shift) for h in tail]


@dataclass
class _Job:
    pairs: list[tuple[str, str]]
    future: asyncio.Future[list[float | None]]
    scores: list[float | None] = field(default_factory=list)
    remaining: int = 0
    company: bool = True  # other requests may be about to queue pairs: a batch starting with it waits for them


class QueueFull(RuntimeError):
    """The rerank queue holds as many pairs as it may; the request is refused rather than queued."""

    def __init__(self, queued: int, wanted: int, limit: int) -> None:
        super().__init__(
            f"the rerank queue is full ({queued} pairs waiting, {wanted} more asked, limit {limit}: "
            "reranker.max_queued_pairs); retry in a second"
        )


class MicroBatcher:
    """Pools rerank pairs from concurrent requests into batches scored on one worker thread. At most
    `max_queued` pairs wait at once; a request that would exceed that is refused (`QueueFull`).

    One per reranker model per process (`app.services.Models.batcher`): every build and collection served by
    the process queues its pairs here, so `max_queued` bounds the model, and `searching` counts the reranked
    searches of all of them between their first stage and their rerank (company a batch may wait for)."""

    def __init__(
        self, reranker: TextReranker, max_batch_size: int = 64, max_wait_ms: float = 5.0, max_queued: int = 4096
    ) -> None:
        self.reranker = reranker
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_pending = 16 * max_batch_size
        self.max_queued = max_queued
        self._queue: asyncio.Queue[tuple[_Job, int]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank")
        self.batches = 0
        self.pairs_scored = 0
        self.waits = 0  # batches that waited `max_wait` for company (how often a batch paid that latency)
        self.searching = 0  # reranked searches on their way to this batcher (kept by `Pipeline.search_many`)

    def _ensure_started(self) -> asyncio.Queue[tuple[_Job, int]]:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._worker is None or self._worker.done() or self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run(self._queue))
        return self._queue

    async def score(self, pairs: list[tuple[str, str]], company: bool = True) -> np.ndarray:
        """Scores for `pairs`, in order; resolves when every pair has been through a batch. `company=False`
        says the caller knows no other request is on its way (a lone search): a batch it starts does not wait
        `max_wait` for others to join."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        queue = self._ensure_started()
        if queue.qsize() + len(pairs) > self.max_queued:
            raise QueueFull(queue.qsize(), len(pairs), self.max_queued)
        job = _Job(pairs, asyncio.get_running_loop().create_future(), [None] * len(pairs), len(pairs), company)
        for i in range(len(pairs)):
            queue.put_nowait((job, i))
        try:
            return np.asarray(await job.future, dtype=np.float32)
        finally:
            if not job.future.done():
                job.future.cancel()

    async def _run(self, queue: asyncio.Queue[tuple[_Job, int]]) -> None:
        """Wait `max_wait` for a batch to fill (unless it is full, or its first request expects no company),
        take everything queued (up to `max_pending`), sort it all by length, and score it in batches of
        `max_batch_size`, answering each request as its pairs finish. (No `asyncio.wait_for` here: on Python
        3.11 it can swallow the cancellation that stops this task.)"""
        loop = asyncio.get_running_loop()
        while True:
            items = [await queue.get()]
            if self.max_wait > 0 and items[0][0].company and queue.qsize() + 1 < self.max_batch_size:
                self.waits += 1
                await asyncio.sleep(self.max_wait)  # let concurrent requests join this batch
            while len(items) < self.max_pending and not queue.empty():
                items.append(queue.get_nowait())
            items = [(job, i) for job, i in items if not job.future.done()]
            items.sort(key=lambda item: len(item[0].pairs[item[1]][0]) + len(item[0].pairs[item[1]][1]))
            for start in range(0, len(items), self.max_batch_size):
                chunk = [(job, i) for job, i in items[start : start + self.max_batch_size] if not job.future.done()]
                if chunk:
                    await self._score_chunk(loop, chunk)

    async def _score_chunk(self, loop: asyncio.AbstractEventLoop, chunk: list[tuple[_Job, int]]) -> None:
        pairs = [job.pairs[i] for job, i in chunk]
        try:
            scores = await loop.run_in_executor(self._executor, self.reranker.score, pairs)
        except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
            for job, _ in chunk:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.batches += 1
        self.pairs_scored += len(pairs)
        for (job, i), score in zip(chunk, scores):
            job.scores[i] = float(score)
            job.remaining -= 1
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(job.scores)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def model_name(model: str) -> str:
    """A model's name as a per-collection choice records it (`sift reranker choose`): the last part of its
    path or hub id, since the same model has another path on another machine."""
    return Path(model.rstrip("/")).name
