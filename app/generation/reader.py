"""The extractive reader: a BERT-style encoder with a span head reads (question, passage) and the answer is
the best legal span over the given passages.

Invariants:
- an answer is always `passages[span.passage][span.start:span.end]` — character offsets into the exact
  passage text given, taken from the fast tokenizer's offset mapping (unicode-safe);
- a span never starts in the question or special tokens, never ends before it starts and is at most
  `max_answer_tokens` long;
- `confidence` is a calibrated probability that the span is exactly right (Platt scaling of the span score,
  fitted on validation questions at training time and stored beside the model as `calibration.json`);
- ties between equal scores go to the earlier passage, then the earlier position.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Span:
    passage: int  # index of the passage in the list given to `read`
    start: int  # character offsets into that passage's text
    end: int
    text: str
    score: float  # start logit + end logit
    confidence: float  # calibrated P(span is the exact answer)


@dataclass(frozen=True)
class Calibration:
    """conf = sigmoid(a · score + b)."""

    a: float = 0.25
    b: float = -2.0

    def __call__(self, score: float) -> float:
        z = self.a * score + self.b
        return 1.0 / (1.0 + math.exp(-z)) if z > -60 else 0.0

    @classmethod
    def fit(cls, scores: Sequence[float], correct: Sequence[float], iterations: int = 100) -> Calibration:
        """One-feature logistic regression by Newton's method (with a small ridge, so it converges on
        separable data)."""
        x = np.asarray(scores, dtype=np.float64)
        y = np.asarray(correct, dtype=np.float64)
        X = np.stack([x, np.ones_like(x)], axis=1)
        w = np.zeros(2)
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-(X @ w)))
            grad = X.T @ (p - y) + 1e-3 * w
            hess = (X * (p * (1 - p))[:, None]).T @ X + 1e-3 * np.eye(2)
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        return cls(float(w[0]), float(w[1]))


def features(
    tokenizer: Any, questions: Sequence[str], contexts: Sequence[str], max_length: int, stride: int
) -> tuple[Any, list[list[tuple[int, int] | None]]]:  # a Hugging Face fast tokenizer, its BatchEncoding
    """Tokenise (question, context) pairs into overlapping windows over the context; each window keeps
    `overflow_to_sample_mapping` (which pair it came from) and offsets (None outside the context)."""
    enc = tokenizer(
        list(questions),
        list(contexts),
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="longest",
        return_tensors="np",
    )
    offsets: list[list[tuple[int, int] | None]] = []
    for i in range(len(enc["input_ids"])):
        sequence = enc.sequence_ids(i)
        offsets.append(
            [(int(o[0]), int(o[1])) if sequence[t] == 1 else None for t, o in enumerate(enc["offset_mapping"][i])]
        )
    return enc, offsets


def best_spans(
    start_logits: np.ndarray, end_logits: np.ndarray, offsets: list, max_answer_tokens: int, top: int = 20
) -> list[tuple[float, int, int]]:
    """Legal (score, start char, end char) candidates of one window, best first."""
    starts = np.argsort(-start_logits)[:top]
    ends = np.argsort(-end_logits)[:top]
    out = []
    for s in starts:
        if offsets[s] is None:
            continue
        for e in ends:
            if offsets[e] is None or e < s or e - s + 1 > max_answer_tokens:
                continue
            out.append((float(start_logits[s] + end_logits[e]), offsets[s][0], offsets[e][1]))
    out.sort(key=lambda c: (-c[0], c[1], c[2]))
    return out


class ExtractiveReader:
    """Span extraction over passages. Thread-safe (one forward pass at a time per model)."""

    def __init__(
        self,
        model: Any,  # a transformers AutoModelForQuestionAnswering (or its ONNX stand-in)
        tokenizer: Any,  # its Hugging Face fast tokenizer
        max_length: int = 384,
        stride: int = 128,
        max_answer_tokens: int = 30,
        calibration: Calibration | None = None,
        batch_size: int = 16,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.stride, self.max_answer_tokens = max_length, stride, max_answer_tokens
        self.calibration = calibration or Calibration()
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self.runtime = "torch"

    @classmethod
    def load(
        cls,
        path: str,
        device: str | None = None,
        max_length: int = 384,
        runtime: str = "torch",
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        **kwargs: Any,  # ExtractiveReader's other settings
    ) -> ExtractiveReader:
        """Load a span reader (a transformers question-answering model) run by `runtime` (see
        `indexer.runtime`); on CUDA the torch weights run in fp16."""
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        from indexer.encoders import pick_device, resolve_model_path
        from indexer.runtime import MODEL_LOADS, runtime_model

        folder = resolve_model_path(path)
        device = pick_device(device)
        with MODEL_LOADS:
            model = AutoModelForQuestionAnswering.from_pretrained(folder)
            model = model.float().to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder)
            if device == "cpu":
                model = runtime_model(model, tokenizer, "question-answering", runtime, cache_dir, threads, max_length)
            else:  # on a GPU the reader runs in fp16 whatever the runtime (as every runtime but torch does there)
                model = model.half()
                model.sift_runtime = "torch-fp16"
        calibration = None
        calib_file = Path(folder) / CALIBRATION_FILE
        if calib_file.is_file():
            calibration = Calibration(**json.loads(calib_file.read_text()))
        reader = cls(model, tokenizer, max_length=max_length, calibration=calibration, **kwargs)
        reader.runtime = model.sift_runtime
        return reader

    def logits(self, questions: Sequence[str], contexts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list, list]:
        """Start/end logits per window, each window's pair index and offsets."""
        import torch

        enc, offsets = features(self.tokenizer, questions, contexts, self.max_length, self.stride)
        device = next(self.model.parameters()).device
        starts, ends = [], []
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
        with self._lock, torch.inference_mode():
            for i in range(0, len(enc["input_ids"]), self.batch_size):
                batch = {n: torch.as_tensor(enc[n][i : i + self.batch_size], device=device) for n in names}
                out = self.model(**batch)
                starts.append(out.start_logits.float().cpu().numpy())
                ends.append(out.end_logits.float().cpu().numpy())
        return np.concatenate(starts), np.concatenate(ends), list(enc["overflow_to_sample_mapping"]), offsets

    def read(self, question: str, passages: Sequence[str]) -> Span | None:
        """The best span over `passages` (None when there is no legal span, e.g. no passages)."""
        return self.read_many([question], [passages])[0]

    def read_many(self, questions: Sequence[str], passages: Sequence[Sequence[str]]) -> list[Span | None]:
        pair_q, pair_p, pair_text = [], [], []
        for qi, (question, texts) in enumerate(zip(questions, passages)):
            for pi, text in enumerate(texts):
                if text.strip():
                    pair_q.append(qi)
                    pair_p.append(pi)
                    pair_text.append((question, text))
        best: list[tuple[float, int, int, int] | None] = [None] * len(questions)
        if pair_text:
            starts, ends, owner, offsets = self.logits([q for q, _ in pair_text], [t for _, t in pair_text])
            for w in range(len(owner)):
                pair = int(owner[w])
                candidates = best_spans(starts[w], ends[w], offsets[w], self.max_answer_tokens, top=20)
                if not candidates:
                    continue
                score, s, e = candidates[0]
                qi, pi = pair_q[pair], pair_p[pair]
                key = (score, pi, s, e)
                current = best[qi]
                if current is None or (-key[0], key[1], key[2]) < (-current[0], current[1], current[2]):
                    best[qi] = key
        out: list[Span | None] = []
        for qi, found in enumerate(best):
            if found is None:
                out.append(None)
                continue
            score, pi, s, e = found
            text = passages[qi][pi]
            out.append(Span(pi, s, e, text[s:e], score, self.calibration(score)))
        return out
