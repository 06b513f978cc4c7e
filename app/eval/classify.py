"""`sift eval classify`: zero-shot tagging measured on labelled sets that exist offline.

Datasets (`load_labelled`):
- `squad`: SQuAD v1.1 dev paragraphs → their article's title (48 labels);
- a JSONL corpus and a metadata key, e.g. `examples/corpus.jsonl` and `topic` (the example corpus's 10 topics).

Protocol: each label's texts are split into two halves by alternation (`halves`): half 0 chooses the template
and the verbalizer (`choose`), half 1 is reported. Nothing about half 1 is looked at before the report.

Choices on half 0 (`choose`): the template (`TEMPLATES`), the verbalizer and the calibration strength
(`CALIBRATIONS`). Verbalizers: `names` (each label's own name, scored as a whole) and `searched-m` (the name plus
m words per label from automatic verbalizer search: candidates are the name's words and the label's most
distinctive words in half 0 by tf-idf; a word's merit for a label is its mean calibrated log-probability on that
label's texts minus its mean on the others'; a word the model scores like another label's goes to one label).
A searched verbalizer is judged cross-fitted (searched on one fold of half 0, scored on the other, both ways):
judged on the texts it was searched on, it would look better than it is.

Every candidate (a single prompt or an ensemble) is also tried with a label prior (`LabelSet.prior`, batch
calibration) at each of `PRIOR_STRENGTHS`: the prior is each label's mean probability over texts without their
labels; judged cross-fitted (each fold divided by the prior of the other fold's texts), kept as measured on all of
half 0's texts.

Baseline, in the same run: each text's nearest label name by bi-encoder cosine (the bundle's dual-encoder).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from indexer.bm25 import _stopwords
from indexer.config import LabelPrompt, LabelSet
from indexer.models import passage_index_text
from indexer.tagging import Tagger, prior_of, prior_vector, softmax

# the templates and answer prefixes tried on half 0 (the first is LabelSet's default)
TEMPLATES: list[tuple[str, str]] = [
    ("{text}\n\nWhat is the topic of this text?", "The topic is"),
    ("{text}\n\nWhat is this text about? Answer with one word.", "This text is about"),
    ("Text: {text}\n\nWhich subject does this text belong to?", "Subject:"),
    ("{text}\n\nWhat is the title of this text?", "The title is"),
    ("{text}\n\nWhat is the title of the Wikipedia article this paragraph comes from?", "The title is"),
]
SEARCH_SIZES = (1, 2, 3)  # words per label beside its name (automatic verbalizer search)
CALIBRATIONS = (1.0, 0.75, 0.5)  # calibration strengths tried
PRIOR_STRENGTHS = (0.0, 0.5, 1.0)  # prior strengths tried (0: no prior)
CANDIDATES = 5  # distinctive words per label a search may pick from
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


def candidates(label: str, extra: Sequence[str], top: int = CANDIDATES) -> list[str]:
    """A label's candidate verbalizer words: its name, the name's words, and its `top` most distinctive words
    (capitalised, as a title or a name starts)."""
    words = [label, *name_words(label), *(w.capitalize() for w in extra[:top])]
    return list(dict.fromkeys(words))


def scores_for(
    tagger: Tagger, label_set: LabelSet, words: Sequence[str], table: np.ndarray, index: dict[str, int]
) -> np.ndarray:
    """[texts, labels] label scores of `label_set` read from `table`, the `word_logprobs` of the words in
    `index` (word -> column)."""
    verbalizer = tagger.verbalizer(label_set, strict=False)
    return tagger.label_scores(table[:, [index[w] for w in verbalizer.words]], label_set, verbalizer)


def search_verbalizer(
    tagger: Tagger,
    label_set: LabelSet,
    table: np.ndarray,
    index: dict[str, int],
    pool: dict[str, list[str]],
    rows: Sequence[Labelled],
    size: int,
) -> dict[str, list[str]]:
    """Each label's name plus its `size` best other candidates (`pool`) chosen on `rows` (half 0), from `table`
    (their `word_logprobs`, columns by `index`): merit = mean log-probability on the label's rows minus the
    mean on the others'; a word the model scores like another label's goes to one label only."""
    calibrated = table  # a word's calibration is one constant over the rows: it cancels out of the merit
    gold = np.array([r.label for r in rows])
    owner: dict[tuple[int, ...], str] = {tagger.scorer.word_key(label): label for label in label_set.labels}
    ranked: list[tuple[float, str, str]] = []
    for label in label_set.labels:
        inside = gold == label
        if not inside.any() or inside.all():
            continue
        for word in pool[label][1:]:
            column = calibrated[:, index[word]]
            ranked.append((float(column[inside].mean() - column[~inside].mean()), label, word))
    ranked.sort(key=lambda r: (-r[0], r[1], r[2]))
    chosen: dict[str, list[str]] = {label: [label] for label in label_set.labels}
    for merit, label, word in ranked:
        key = tagger.scorer.word_key(word)
        if merit <= 0 or key in owner or len(chosen[label]) > size:
            continue
        owner[key] = label
        chosen[label].append(word)
    return chosen


def choose(
    tagger: Tagger,
    field: str,
    labels: Sequence[str],
    dev: Sequence[Labelled],
    echo: Any = print,
    max_prompts: int = 1,
) -> tuple[LabelSet, list[dict[str, Any]]]:
    """The template, verbalizer and calibration strength with the best macro-F1 on `dev` (half 0), and every
    candidate's figures. Each template's prompts are scored once, over every label's candidate words.

    `max_prompts` > 1 also tries prompt ensembles: the templates ranked by their best configuration's macro-F1,
    the first k (2 ≤ k ≤ max_prompts) each with that configuration, scored by the mean of their cross-fitted
    label scores; an ensemble is kept only when it beats every smaller choice (it costs k model passes).

    Every candidate is also judged with a label prior at each of `PRIOR_STRENGTHS` (`cross_fitted_log_prior`);
    one kept carries the prior of its scores on all of `dev` (the caller may measure it again on a sample
    chosen without labels: `sift eval classify` does)."""
    gold = [r.label for r in dev]
    fold_of = {id(row): part for part, rows in enumerate(halves(dev)) for row in rows}
    parts = np.array([fold_of[id(row)] for row in dev])

    def pool_of(rows: Sequence[Labelled]) -> dict[str, list[str]]:
        extra = distinctive_words(rows)
        return {label: candidates(label, extra.get(label, [])) for label in labels}

    # candidate words: a fold's search draws them from the other fold only (no word picked for the texts it
    # will be judged on); the kept search draws them from all of half 0; every candidate is scored once
    pools = [pool_of([row for row, p in zip(dev, parts) if p != fold]) for fold in (0, 1)]
    pool = pool_of(dev)
    words = list(dict.fromkeys(w for p in (pool, *pools) for label in labels for w in p[label]))
    index = {w: i for i, w in enumerate(words)}
    best: tuple[float, LabelSet] | None = None
    tried = []
    # each template's best configuration, in order: (its best macro-F1 at any prior strength, its set without a
    # prior, its cross-fitted label scores and their shadow (`cross_fitted_log_prior`), both without a prior,
    # and the template's word table)
    per_template: list[tuple[float, LabelSet, np.ndarray, np.ndarray, np.ndarray]] = []

    def with_prior(
        crossed: np.ndarray,
        shadow: np.ndarray,
        label_set: LabelSet,
        all_of_half0: Callable[[], np.ndarray],
        describe: dict[str, Any],
        line: str,
    ) -> float:
        """`crossed` judged at each prior strength (`cross_fitted_log_prior` of `shadow`); the best so far is
        kept with the prior of all of half 0 (`all_of_half0()`: the set's label scores there). Returns the best
        macro-F1 over the strengths."""
        nonlocal best
        logs = cross_fitted_log_prior(shadow, parts)
        top = 0.0
        for strength in PRIOR_STRENGTHS:
            f1 = macro_f1(gold, [labels[int(i)] for i in np.argmax(crossed - strength * logs, axis=1)], labels)
            top = max(top, f1)
            tried.append({**describe, "prior_strength": strength, "macro_f1": f1})
            echo(f"  half 0: {line} p={strength:<4} macro-F1 {100 * f1:.1f}")
            if best is None or f1 > best[0]:
                kept = label_set
                if strength:
                    prior = prior_of(softmax(all_of_half0()), label_set)
                    kept = label_set.model_copy(update={"prior": prior, "prior_strength": strength})
                best = (f1, kept)
        return top

    for order, (template, prefix) in enumerate(TEMPLATES):
        base = LabelSet(field=field, template=template, prefix=prefix, labels={label: [] for label in labels})
        table = tagger.scorer.word_logprobs([r.text for r in dev], base, words)
        names: dict[str, list[str]] = {label: [] for label in labels}
        # a searched verbalizer is judged cross-fitted: words searched on one fold of half 0 predict the other
        # fold (judged on the rows it was searched on, it would look better than it is); the set kept is the
        # one searched on all of half 0
        verbalizers: dict[str, tuple[dict[str, list[str]], list[tuple[np.ndarray, dict[str, list[str]]]]]] = {
            "names": (names, [(np.arange(len(dev)), names)])
        }
        for size in SEARCH_SIZES:
            folds = []
            for fold in (0, 1):
                rows = np.flatnonzero(parts == fold)
                other = np.flatnonzero(parts != fold)
                words_of = search_verbalizer(
                    tagger, base, table[other], index, pools[fold], [dev[int(i)] for i in other], size
                )
                folds.append((rows, words_of))
            whole = search_verbalizer(tagger, base, table, index, pool, dev, size)
            verbalizers[f"searched-{size}"] = (whole, folds)
        for verbalizer, (chosen_words, folds) in verbalizers.items():
            for strength in CALIBRATIONS:
                label_set = base.model_copy(update={"labels": chosen_words, "calibration": strength})
                crossed = np.zeros((len(dev), len(labels)), dtype=np.float32)  # cross-fitted label scores
                # each fold's set on the other fold's texts; one set for every row (names): its own scores
                shadow = crossed if len(folds) == 1 else np.zeros_like(crossed)
                for rows, fold_words in folds:
                    fold_set = base.model_copy(update={"labels": fold_words, "calibration": strength})
                    crossed[rows] = scores_for(tagger, fold_set, words, table[rows], index)
                    if len(folds) > 1:
                        other = np.setdiff1d(np.arange(len(dev)), rows)
                        shadow[other] = scores_for(tagger, fold_set, words, table[other], index)
                f1 = with_prior(
                    crossed,
                    shadow,
                    label_set,
                    partial(scores_for, tagger, label_set, words, table, index),
                    {"template": template, "prefix": prefix, "verbalizer": verbalizer, "calibration": strength},
                    f"{verbalizer:<11} c={strength:<4} {template[-45:]!r:<50}",
                )
                if len(per_template) <= order:
                    per_template.append((f1, label_set, crossed, shadow, table))
                elif f1 > per_template[order][0]:
                    per_template[order] = (f1, label_set, crossed, shadow, table)
    assert best is not None
    ranked = sorted(per_template, key=lambda t: -t[0])  # stable: ties keep the templates' order
    for k in range(2, min(max_prompts, len(ranked)) + 1):
        members = ranked[:k]
        mean = np.mean([m[2] for m in members], axis=0)  # label scores averaged over the prompts
        mean_shadow = np.mean([m[3] for m in members], axis=0)
        head = members[0][1]
        ensemble = head.model_copy(
            update={
                "ensemble": [
                    LabelPrompt(template=m.template, prefix=m.prefix, labels=m.labels, calibration=m.calibration)
                    for _, m, *_ in members[1:]
                ]
            }
        )
        member_tables = [(m[4], index) for m in members]
        with_prior(
            mean,
            mean_shadow,
            ensemble,
            partial(ensemble_scores, tagger, ensemble, member_tables),
            {
                "template": head.template,
                "prefix": head.prefix,
                "verbalizer": f"ensemble of {k} prompts",
                "calibration": head.calibration,
                "ensemble": [
                    {"template": m.template, "prefix": m.prefix, "calibration": m.calibration, "labels": m.labels}
                    for _, m, *_ in members
                ],
            },
            f"ensemble of the {k} best prompts{'':<35}",
        )
    return best[1], tried


def cross_fitted_log_prior(shadow: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """[texts, labels] the log prior each row is divided by when judged cross-fitted: for a row of fold f, the
    prior (`prior_vector`) of the texts of the other folds as scored by the set that judges fold f. `shadow`
    holds those scores: its rows of fold g are scored by the set of the fold that is not g (two folds), so no
    fold's prior comes from its own texts nor from words searched on its own labels."""
    logs = np.zeros_like(shadow)
    for fold in np.unique(parts):
        logs[parts == fold] = np.log(prior_vector(softmax(shadow[parts != fold])))
    return logs


def ensemble_scores(
    tagger: Tagger, label_set: LabelSet, tables: Sequence[tuple[np.ndarray, dict[str, int]]]
) -> np.ndarray:
    """[texts, labels] the set's label scores, the mean over its prompts (`LabelSet.prompts`), each read from
    its `word_logprobs` table and column index."""
    if len(tables) != len(label_set.ensemble) + 1:
        raise ValueError(f"{len(tables)} tables for {len(label_set.ensemble) + 1} prompts")
    return tagger.set_scores(
        label_set, lambda i, part, verbalizer: tables[i][0][:, [tables[i][1][w] for w in verbalizer.words]]
    )


def cosine_baseline(encoder: Any, texts: Sequence[str], labels: Sequence[str]) -> list[str]:
    """Each text's nearest label name by cosine of the bi-encoder's vectors."""
    vectors = encoder.encode(list(texts), normalize_embeddings=True, batch_size=32)
    names = encoder.encode(list(labels), normalize_embeddings=True)
    return [labels[int(i)] for i in np.argmax(vectors @ names.T, axis=1)]
