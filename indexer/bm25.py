"""BM25 over passages with bm25s: one tokeniser for documents and queries, save/load with mmap."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from bm25s.tokenization import _infer_stopwords
from tqdm.auto import tqdm

from indexer.config import BM25Settings


@lru_cache(maxsize=8)
def _stemmer(language: str | None) -> Any:  # a PyStemmer Stemmer (no hints), or None
    if not language:
        return None
    import Stemmer

    return Stemmer.Stemmer(language)


_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # the scikit-learn / bm25s token pattern


@lru_cache(maxsize=8)
def _stopwords(name: str | None) -> frozenset[str]:
    return frozenset(_infer_stopwords(name)) if name else frozenset()


def tokenize(texts: list[str], settings: BM25Settings, show_progress: bool = False) -> list[list[str]]:
    """Lower-case, split on word characters, drop stop words, stem. The one tokeniser for passages (at build
    time) and queries (at search time), so both always agree."""
    stop = _stopwords(settings.stopwords)
    stemmer = _stemmer(settings.stemmer)
    out = []
    for text in tqdm(texts, desc="tokenise", unit="passage", disable=not show_progress):
        tokens = [t for t in _TOKEN.findall(text.lower()) if t not in stop]
        out.append(stemmer.stemWords(tokens) if stemmer is not None else tokens)
    return out


def index_bm25(texts: list[str], settings: BM25Settings, show_progress: bool = False) -> bm25s.BM25:
    """An in-memory bm25s model over `texts` (row i = passage i)."""
    model = bm25s.BM25(method=settings.method, k1=settings.k1, b=settings.b)
    model.index(tokenize(texts, settings, show_progress=show_progress), show_progress=show_progress)
    return model


def build_bm25(texts: list[str], settings: BM25Settings, out_dir: Path, show_progress: bool = True) -> None:
    """Index `texts` and save the sparse matrices under `out_dir`."""
    index_bm25(texts, settings, show_progress).save(str(out_dir))


class BM25Index:
    """A bm25s model (loaded from a bundle, or built in memory) that scores every passage for a query."""

    def __init__(self, model: bm25s.BM25, settings: BM25Settings) -> None:
        self.settings = settings
        self.model = model
        self.num_passages = int(model.scores["num_docs"])

    @classmethod
    def load(cls, directory: Path, settings: BM25Settings, mmap: bool = True) -> BM25Index:
        return cls(bm25s.BM25.load(str(directory), mmap=mmap), settings)

    @classmethod
    def from_texts(cls, texts: list[str], settings: BM25Settings) -> BM25Index:
        return cls(index_bm25(texts, settings), settings)

    def query_tokens(self, query: str) -> list[str]:
        """The query's tokens that exist in the index vocabulary."""
        vocab = self.model.vocab_dict
        return [t for t in tokenize([query], self.settings)[0] if t in vocab]

    def scores(self, query: str, mask: np.ndarray | None = None) -> np.ndarray:
        """BM25 score of every passage (0 where `mask` is 0 or no query term matches)."""
        tokens = self.query_tokens(query)
        if not tokens:
            return np.zeros(self.num_passages, dtype=np.float32)
        return np.asarray(self.model.get_scores(tokens, weight_mask=mask), dtype=np.float32)


def top_k(scores: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[tuple[int, float]]:
    """Indices and scores of the k best positive scores, ties broken by lower index (deterministic)."""
    valid = scores > 0 if mask is None else (scores > 0) & (mask > 0)
    candidates = np.flatnonzero(valid)
    if candidates.size == 0 or k <= 0:
        return []
    if candidates.size > k:
        part = np.argpartition(-scores[candidates], k - 1)[:k]
        threshold = scores[candidates[part]].min()
        candidates = candidates[scores[candidates] >= threshold]
    order = np.lexsort((candidates, -scores[candidates]))[:k]
    chosen = candidates[order]
    return [(int(i), float(scores[i])) for i in chosen]
