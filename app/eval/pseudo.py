"""Label-free validation sets: pseudo-queries made from a corpus itself (the inverse cloze task; the
reranker's training pseudo-queries, `app.training.reranker.pseudo_query_groups`, pick their sentences the same
way).

One sentence of a document becomes the query and is cut out of that document in the corpus, so the query
must be matched by what the rest of the document says, not by an exact copy of itself. The document it came
from is the one relevant document. No human judgment is involved, so any corpus can serve, including one far
from the domains a model was trained on.

`stdlib_docs` is such a corpus that every Python installation carries: the docstrings of the standard
library's public modules, classes and functions (technical English, far from SciFact's biomedical claims and
SQuAD's Wikipedia questions). It depends only on the Python version, which `pseudo_query_set` records.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import random
import re
import sys
import warnings
from dataclasses import dataclass

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")
_SENTENCE_LOWER = re.compile(r"(?<=[.!?])\s+(?=[a-z0-9])")
MIN_WORDS, MAX_WORDS = 6, 40  # a usable query sentence
MIN_SENTENCES = 3  # a document keeps at least two sentences once its query is cut out
# modules with side effects on import (GUI, browser, test suites, printing) or no public docs of their own
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip"}


@dataclass(frozen=True)
class PseudoQuerySet:
    """A corpus (BEIR-style records, query sentences cut out), its queries and their one relevant document."""

    corpus: list[dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    source: str


def sentences(text: str) -> list[str]:
    """The sentences of `text` usable as queries (`MIN_WORDS`–`MAX_WORDS` words). A sentence ends at `.`, `!`
    or `?` before a capital or a digit; in a text without any capital letter (a lower-cased corpus such as
    Cranfield), before any letter or digit."""
    splitter = _SENTENCE if any(c.isupper() for c in text) else _SENTENCE_LOWER
    return [s for s in splitter.split(text) if MIN_WORDS <= len(s.split()) <= MAX_WORDS]


def _prose(doc: str) -> str:
    """A docstring's prose: paragraphs that are not doctests or indented code, whitespace collapsed."""
    keep = [p for p in doc.split("\n\n") if not p.lstrip().startswith((">>>", "$")) and not p.startswith("    ")]
    return " ".join(" ".join(p.split()) for p in keep)


def stdlib_docs() -> list[dict[str, str]]:
    """Docstrings of the standard library's public modules, classes, functions and methods with at least
    `MIN_SENTENCES` usable sentences, as records (`_id` and `title`: the qualified name; `text`: the prose),
    sorted by name, duplicates (inherited or aliased texts) kept once."""
    records: dict[str, dict[str, str]] = {}
    seen: set[str] = set()
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP:
            continue
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules (winreg, msvcrt…) do not import here
            continue
        objects: list[tuple[str, object]] = [(name, module)]
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(value, "__module__", None) != name:
                continue
            if inspect.isclass(value) or inspect.isfunction(value):
                objects.append((f"{name}.{attr}", value))
            if inspect.isclass(value):
                objects += [
                    (f"{name}.{attr}.{m}", f)
                    for m, f in sorted(vars(value).items())
                    if not m.startswith("_") and inspect.isfunction(f)
                ]
        for qualified, obj in objects:
            text = _prose(inspect.getdoc(obj) or "")
            if len(sentences(text)) >= MIN_SENTENCES and text not in seen:
                seen.add(text)
                records[qualified] = {"_id": qualified, "title": qualified, "text": text}
    return [records[k] for k in sorted(records)]


def pseudo_query_set(records: list[dict[str, str]], n: int, seed: int = 13, source: str = "") -> PseudoQuerySet:
    """Up to `n` documents drawn with `seed` among those with `MIN_SENTENCES` usable sentences; from each, one
    usable sentence other than the first usable one (which often just names the object) becomes the query and
    is cut out of the document. Every other document is unchanged (and stays in the corpus)."""
    rng = random.Random(seed)
    eligible = [i for i, r in enumerate(records) if len(sentences(r["text"])) >= MIN_SENTENCES]
    chosen = rng.sample(eligible, min(n, len(eligible)))
    corpus = [dict(r) for r in records]
    queries, qrels = {}, {}
    for i in sorted(chosen):
        record = corpus[i]
        candidates = sentences(record["text"])[1:]
        query = rng.choice(candidates)
        record["text"] = " ".join(record["text"].replace(query, " ").split())
        qid = f"q{i}"
        queries[qid] = query
        qrels[qid] = {record["_id"]: 1}
    label = source or f"python {sys.version_info.major}.{sys.version_info.minor}"
    return PseudoQuerySet(corpus, queries, qrels, label)
