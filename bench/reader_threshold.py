"""Choose `answer.min_reader_confidence` on validation data only (never on SQuAD articles 24–47).

Answerable cases are the validation questions of `sift reader train` (held-out paragraphs of SQuAD v1.1 dev
articles 0–23) with their own paragraph; unanswerable ones are the same questions with a random paragraph of
another article. The threshold (0.00–0.89, step 0.01) that maximises balanced accuracy (answer the first,
decline the second) is printed; configs/default.yaml uses it.

    python bench/reader_threshold.py --squad ../shared/data/squad/dev-v1.1.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


def main() -> None:
    from app.eval.qa import exact_match
    from app.generation.reader import ExtractiveReader
    from app.training.reader import load_examples, split_by_paragraph

    parser = argparse.ArgumentParser(description="choose the reader's no-answer threshold on validation data")
    parser.add_argument("--squad", type=Path, default=Path("../shared/data/squad/dev-v1.1.json"))
    parser.add_argument("--reader", default="models/sift-reader-minilm-l6")
    args = parser.parse_args()
    examples = load_examples(args.squad, range(0, 24))
    _, validation = split_by_paragraph(examples, 0.05, 13)  # the same split `sift reader train` validates on
    reader = ExtractiveReader.load(args.reader, "cpu")
    rng = random.Random(13)
    by_article: dict[str, list[str]] = {}
    for e in examples:
        by_article.setdefault(e.paragraph.split("-")[0], []).append(e.context)
    answerable, unrelated, em = [], [], []
    for i in tqdm(range(0, len(validation), 16), desc="read validation", unit="batch"):
        chunk = validation[i : i + 16]
        spans = reader.read_many([e.question for e in chunk], [[e.context] for e in chunk])
        answerable += [s.confidence for s in spans]
        em += [exact_match(s.text, e.answers) for s, e in zip(spans, chunk)]
        others = []
        for e in chunk:
            article = rng.choice([a for a in by_article if a != e.paragraph.split("-")[0]])
            others.append([rng.choice(by_article[article])])
        unrelated += [s.confidence if s else 0.0 for s in reader.read_many([e.question for e in chunk], others)]
    pos, neg = np.asarray(answerable), np.asarray(unrelated)
    grid = [(round(float(t), 2), 0.5 * float((pos >= t).mean() + (neg < t).mean())) for t in np.arange(0, 0.9, 0.01)]
    best = max(grid, key=lambda x: (x[1], -x[0]))
    print(
        json.dumps(
            {
                "validation_questions": len(validation),
                "exact_match_with_own_paragraph": round(float(np.mean(em)), 4),
                "mean_confidence_answerable": round(float(pos.mean()), 4),
                "mean_confidence_unrelated_paragraph": round(float(neg.mean()), 4),
                "threshold": best[0],
                "balanced_accuracy": round(best[1], 4),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
