"""`sift eval classify`: zero-shot tagging measured on labelled sets that exist offline.

Datasets (`load_labelled`):
- `squad`: SQuAD v1.1 dev paragraphs → their article's title (48 labels);
- a JSONL corpus and a metadata key, e.g. `examples/corpus.jsonl` and `topic` (the example corpus's 10 topics).

Protocol: each label's texts are split into two halves by alternation (`halves`): half 0 chooses the template
and the verbalizer (`choose`), half 1 is reported. Nothing about half 1 is looked at before the report.

Verbalizer candidates: `names` (the words of the label's name) and `searched-m` (automatic verbalizer
search on half 0: candidate words are the name's words and the label's most distinctive words in half 0 by
tf-idf; a word's merit for a label is its mean calibrated log-probability on that label's texts minus its
mean on the others'; the best m per label are kept, every token owned by one label).

Baseline, in the same run: each text's nearest label name by bi-encoder cosine (the bundle's dual-encoder).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.bm25 import _stopwords
from indexer.config import LabelSet
from indexer.models import passage_index_text
from indexer.tagging import Tagger

# the templates and answer prefixes tried on half 0 (the first is LabelSet's default)
TEMPLATES: list[tuple[str, str]] = [
    ("{text}\n\nWhat is the topic of this text?", "The topic is"),
    ("{text}\n\nWhat is this text about? Answer with one word.", "This text is about"),
    ("Text: {text}\n\nWhich subject does this text belong to?", "Subject:"),
]
SEARCH_SIZES = (1, 3)
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]+")


@dataclass
class Labelled:
    text: str
    label: str


def load_labelled(source: str, squad: Path | None = None) -> tuple[str, list[Labelled]]:
    """(name, rows): `squad` (needs `squad`, the SQuAD v1.1 JSON), or `PATH:KEY` for a JSONL corpus whose
    records' `metadata[KEY]` is the label (text = title + text, as the index sees a passage)."""
    if source == "squad":
        if squad is None:
            raise ValueError("--squad is needed for the squad dataset")
        data = json.loads(Path(squad).read_text())["data"]
        rows = [
            Labelled(p["context"], article["title"].replace("_", " "))
            for article in data
            for p in article["paragraphs"]
        ]
        return "SQuAD v1.1 dev paragraphs → 48 article titles", rows
    path, _, key = source.rpartition(":")
    if not path or not key:
        raise ValueError(f"dataset {source!r}: use `squad` or PATH.jsonl:METADATA_KEY")
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            label = (record.get("metadata") or {}).get(key)
            if label is not None:
                rows.append(Labelled(passage_index_text(record.get("title", ""), record["text"]), str(label)))
    return f"{Path(path).name} → metadata.{key}", rows


def halves(rows: Sequence[Labelled]) -> tuple[list[Labelled], list[Labelled]]:
    """Half 0 (choose) and half 1 (report): each label's rows alternate between them, in file order."""
    seen: Counter[str] = Counter()
    parts: tuple[list[Labelled], list[Labelled]] = ([], [])
    for row in rows:
        parts[seen[row.label] % 2].append(row)
        seen[row.label] += 1
    return parts


def cap_per_label(rows: Sequence[Labelled], per_label: int | None) -> list[Labelled]:
    """At most `per_label` rows of each label, the first ones (to bound the cost of choosing)."""
    if not per_label:
        return list(rows)
    seen: Counter[str] = Counter()
    kept = []
    for row in rows:
        if seen[row.label] < per_label:
            kept.append(row)
            seen[row.label] += 1
    return kept


def macro_f1(gold: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str]) -> float:
    """Unweighted mean over `labels` of per-label F1 (a label never predicted nor gold counts 0)."""
    scores = []
    for label in labels:
        tp = sum(1 for g, p in zip(gold, predicted) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, predicted) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, predicted) if g == label and p != label)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def accuracy(gold: Sequence[str], predicted: Sequence[str | None]) -> float:
    return float(np.mean([g == p for g, p in zip(gold, predicted)])) if gold else 0.0


def name_words(label: str) -> list[str]:
    """The words of a label's name (stop words and one-letter words dropped; the name itself if none left)."""
    stop = _stopwords("en")
    words = [w for w in re.findall(r"[A-Za-z0-9]+", label) if len(w) > 1 and w.lower() not in stop]
    return words or [label]


def distinctive_words(rows: Sequence[Labelled], top: int = 15) -> dict[str, list[str]]:
    """Per label, its `top` words by tf-idf over labels (each label's texts as one document)."""
    stop = _stopwords("en")
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        counts[row.label].update(w.lower() for w in _WORD.findall(row.text) if w.lower() not in stop and len(w) > 2)
    df: Counter[str] = Counter(w for c in counts.values() for w in c)
    n = len(counts)
    return {
        label: [w for w, _ in sorted(c.items(), key=lambda kv: (-kv[1] * np.log(n / df[kv[0]]), kv[0]))[:top]]
        for label, c in counts.items()
    }


def search_verbalizer(
    tagger: Tagger,
    label_set: LabelSet,
    slot: np.ndarray,
    rows: Sequence[Labelled],
    size: int,
) -> dict[str, list[str]]:
    """`size` words per label chosen on `rows` (half 0) from `slot` (their slot log-probabilities): candidates
    are the name's words and the label's distinctive words (lower case and capitalised); merit = mean calibrated
    log-probability on the label's rows minus the mean on the others'; each token goes to one label."""
    calibrated = slot - tagger.calibration(label_set)[None, :]
    gold = np.array([r.label for r in rows])
    extra = distinctive_words(rows)
    ranked: list[tuple[float, str, int, str]] = []
    for label in label_set.labels:
        inside = gold == label
        if not inside.any() or inside.all():
            continue
        words = name_words(label) + extra.get(label, [])
        for word in dict.fromkeys(w for base in words for w in (base, base.lower(), base.capitalize())):
            token = tagger.scorer.word_token(word)
            merit = float(calibrated[inside, token].mean() - calibrated[~inside, token].mean())
            ranked.append((merit, label, token, word))
    ranked.sort(key=lambda r: (-r[0], r[1], r[3]))
    owner: dict[int, str] = {}
    chosen: dict[str, list[str]] = {label: [] for label in label_set.labels}
    for _, label, token, word in ranked:
        if token in owner or len(chosen[label]) >= size:
            continue
        owner[token] = label
        chosen[label].append(word)
    for label, words in chosen.items():  # a label without candidates keeps its own name
        if not words:
            token = tagger.scorer.word_token(label)
            if token not in owner:
                owner[token] = label
                words.append(label)
    return chosen


def predict(tagger: Tagger, slot: np.ndarray, label_set: LabelSet) -> list[str]:
    labels = list(label_set.labels)
    scores = tagger.label_scores(slot, label_set, tagger.tokens(label_set))
    return [labels[int(i)] for i in np.argmax(scores, axis=1)]  # argmax: ties to the label listed first


def names_verbalizer(tagger: Tagger, labels: Sequence[str]) -> dict[str, list[str]]:
    """Each label's name words, dropping a word whose first token another label already owns."""
    owner: dict[int, str] = {}
    chosen: dict[str, list[str]] = {}
    for label in labels:
        words = []
        for word in name_words(label):
            token = tagger.scorer.word_token(word)
            if owner.setdefault(token, label) == label:
                words.append(word)
        chosen[label] = words or [label]
    return chosen


def choose(
    tagger: Tagger, field: str, labels: Sequence[str], dev: Sequence[Labelled], echo: Any = print
) -> tuple[LabelSet, list[dict[str, Any]]]:
    """The template and verbalizer with the best macro-F1 on `dev` (half 0), and every candidate's figures."""
    gold = [r.label for r in dev]
    best: tuple[float, LabelSet] | None = None
    tried = []
    for template, prefix in TEMPLATES:
        base = LabelSet(field=field, template=template, prefix=prefix, labels={label: [] for label in labels})
        slot = tagger.scorer.slot_logprobs([r.text for r in dev], base)
        candidates = {"names": names_verbalizer(tagger, labels)}
        for size in SEARCH_SIZES:
            candidates[f"searched-{size}"] = search_verbalizer(tagger, base, slot, dev, size)
        for verbalizer, words in candidates.items():
            label_set = base.model_copy(update={"labels": words})
            f1 = macro_f1(gold, predict(tagger, slot, label_set), labels)
            tried.append({"template": template, "prefix": prefix, "verbalizer": verbalizer, "macro_f1": f1})
            echo(f"  half 0: {verbalizer:<11} {template[-45:]!r:<50} macro-F1 {100 * f1:.1f}")
            if best is None or f1 > best[0]:
                best = (f1, label_set)
    assert best is not None
    return best[1], tried


def cosine_baseline(encoder: Any, texts: Sequence[str], labels: Sequence[str]) -> list[str]:
    """Each text's nearest label name by cosine of the bi-encoder's vectors."""
    vectors = encoder.encode(list(texts), normalize_embeddings=True, batch_size=32)
    names = encoder.encode(list(labels), normalize_embeddings=True)
    return [labels[int(i)] for i in np.argmax(vectors @ names.T, axis=1)]
