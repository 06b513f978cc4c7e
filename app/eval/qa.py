"""`sift eval qa`: SQuAD v1.1 exact match and F1 (official normalisation), with the gold paragraph given and
end to end over the SQuAD paragraphs as a corpus; ROUGE-L (rouge-score) and BLEU (sacrebleu) for generated
answers; retrieval-only QA (answer-bearing passage in top k) when no generator is used.

Split (fixed, shared with the reranker's training code): SQuAD v1.1 dev articles 0–23 (by order in the file)
may be used for training; articles 24–47 are held out for evaluation. The evaluation sample is drawn from
articles 24–47 only, with a fixed seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.answering import Answerer, PreparedAnswer
    from app.generation.base import GenerationOptions
    from app.pipeline import Pipeline, SearchOptions
    from app.retrieval.types import Hit
    from indexer.config import IndexConfig

TRAIN_ARTICLES = range(0, 24)
EVAL_ARTICLES = range(24, 48)
SAMPLE_SEED = 13


@dataclass(frozen=True)
class SquadQuestion:
    id: str
    question: str
    answers: tuple[str, ...]
    context: str
    article: int
    paragraph_id: str


def load_squad(path: Path, articles: range = EVAL_ARTICLES) -> list[SquadQuestion]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    out = []
    for a in articles:
        for p, paragraph in enumerate(data[a]["paragraphs"]):
            for qa in paragraph["qas"]:
                answers = tuple(dict.fromkeys(ans["text"] for ans in qa["answers"]))
                out.append(
                    SquadQuestion(qa["id"], qa["question"], answers, paragraph["context"], a, f"squad-a{a}-p{p}")
                )
    return out


def paragraphs_corpus(path: Path, articles: range = EVAL_ARTICLES) -> list[dict]:
    """SQuAD paragraphs as BEIR-style documents (`_id` = paragraph id, title = article title)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    return [
        {"_id": f"squad-a{a}-p{p}", "title": data[a]["title"].replace("_", " "), "text": paragraph["context"]}
        for a in articles
        for p, paragraph in enumerate(data[a]["paragraphs"])
    ]


def sample(questions: Sequence[SquadQuestion], n: int, seed: int = SAMPLE_SEED) -> list[SquadQuestion]:
    """A fixed random sample (same seed, same file → same questions)."""
    rng = random.Random(seed)
    return sorted(rng.sample(list(questions), min(n, len(questions))), key=lambda q: q.id)


def sample_fingerprint(questions: Sequence[SquadQuestion]) -> str:
    return hashlib.sha256(",".join(q.id for q in questions).encode()).hexdigest()[:16]


def normalize_answer(text: str) -> str:
    """Official SQuAD v1.1 normalisation: lower-case, drop punctuation and articles, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1(prediction: str, answers: Sequence[str]) -> float:
    def one(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        common = Counter(p) & Counter(g)
        same = sum(common.values())
        if same == 0:
            return 0.0
        precision, recall = same / len(p), same / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(one(prediction, a) for a in answers)


def generation_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, all gold answers as references) and mean best ROUGE-L F (rouge-score)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    width = max(len(a) for a in answers)
    references = [[a[i] if i < len(a) else a[0] for a in answers] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(list(predictions), references).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [
        max(scorer.score(gold, pred)["rougeL"].fmeasure for gold in golds) for pred, golds in zip(predictions, answers)
    ]
    return {"bleu": bleu, "rouge_l": 100.0 * sum(rouge) / len(rouge)}


def qa_scores(predictions: Sequence[str], questions: Sequence[SquadQuestion]) -> dict[str, float]:
    n = len(questions)
    em = sum(exact_match(p, q.answers) for p, q in zip(predictions, questions)) / n
    f = sum(f1(p, q.answers) for p, q in zip(predictions, questions)) / n
    return {
        "exact_match": 100.0 * em,
        "f1": 100.0 * f,
        **generation_scores(predictions, [q.answers for q in questions]),
    }


def clean_prediction(text: str) -> str:
    """First line of a generated answer, without a trailing full stop (answers are short spans)."""
    line = text.strip().split("\n")[0].strip()
    return line[:-1] if line.endswith(".") else line


def retrieve_hits(
    pipeline: Pipeline, questions: Sequence[SquadQuestion], k: int, progress: bool = True
) -> list[list[Hit]]:
    """Hybrid top-k documents (best passage each) for every question, through the engine the API calls."""
    import asyncio

    from tqdm import tqdm

    from app.engine import Engine

    engine = Engine(pipeline)
    options = engine.options(k=k, mode="hybrid", collapse=True)
    return [
        asyncio.run(engine.search(q.question, options)).hits
        for q in tqdm(questions, desc="retrieve", disable=not progress)
    ]


def retrieval_qa(
    questions: Sequence[SquadQuestion], hits: Sequence[Sequence], depths: Sequence[int]
) -> dict[str, float]:
    """Percentage of questions whose gold paragraph is among the top `d` retrieved, for each depth."""
    return {
        f"answer_paragraph_in_top{d}": 100.0
        * sum(q.paragraph_id in {h.doc_id for h in hs[:d]} for q, hs in zip(questions, hits))
        / len(questions)
        for d in depths
    }


EXTRACTIVE_TEMPLATE = Path(__file__).resolve().parents[2] / "configs" / "prompts" / "extractive.yaml"
MODES = ("generative", "extractive", "extract-then-generate")


def qa_answerer(
    pipeline: Pipeline, mode: str, generator: Any = None, reader: Any = None, passages: int = 2
) -> Answerer:  # a Generator, an ExtractiveReader
    """The API's `Answerer` for one answer mode, with the short-answer prompt and no refusal threshold
    (every question gets an answer, as SQuAD scoring expects)."""
    from app.answering import Answerer

    settings = pipeline.settings.answer.model_copy(
        update={
            "mode": mode,
            "template": EXTRACTIVE_TEMPLATE,
            "passages": passages,
            "min_dense_score": None,
            "min_rerank_score": None,
            "min_reader_confidence": None,
        }
    )
    return Answerer(pipeline, generator, settings, reader=reader)


def prepare_question(answerer: Answerer, q: SquadQuestion, gold: bool, search: SearchOptions) -> PreparedAnswer:
    """The prepared answer of one question: its gold paragraph as the only passage (`gold`), else retrieved."""
    import asyncio

    if gold:
        passage = {"doc_id": q.paragraph_id, "passage_id": q.paragraph_id, "title": "", "text": q.context}
        return answerer.given(q.question, [passage], render=False)
    return asyncio.run(answerer.prepare(q.question, search))


def answer_questions(
    answerer: Answerer,
    questions: Sequence[SquadQuestion],
    options: GenerationOptions,
    gold: bool,
    k: int = 5,
    progress: bool = True,
) -> tuple[list[str], list[float]]:
    """Predictions and per-answer latency (ms) through `Answerer.answer`: with each question's gold paragraph
    as the only passage (`gold`), or end to end (hybrid top-k, best passages per document, the answerer's
    `passages` best ones read)."""
    import asyncio
    import time

    from tqdm import tqdm

    search = answerer.pipeline.options(k=k, mode="hybrid", collapse=True)
    preds, latencies = [], []
    label = f"{answerer.mode} {'gold-context' if gold else 'end-to-end'}"
    for q in tqdm(questions, desc=label, disable=not progress):
        started = time.perf_counter()
        prepared = prepare_question(answerer, q, gold, search)
        result = asyncio.run(answerer.answer(prepared, options))
        latencies.append((time.perf_counter() - started) * 1000)
        # extractive: the reader's exact span is the prediction (the answer text may be its whole sentence)
        span = result.span["text"] if answerer.mode == "extractive" and result.span else None
        preds.append(span if span is not None else clean_prediction(result.text))
    return preds, latencies


def gold_perplexity(
    answerer: Answerer, questions: Sequence[SquadQuestion], gold: bool, k: int = 5, progress: bool = True
) -> dict[str, float | int | None]:
    """Perplexity of each question's gold answer (SQuAD's first) as the generator's reply to the very prompt
    the answerer would generate from: exp(total negative log-likelihood / total answer tokens) over the
    questions that reach the generator. None where nothing is scored: the extractive mode (no language
    model), a generator that cannot score a given reply (a remote one), or no question reaching it.
    `gold_ppl_questions` counts the scored questions (a declined span or no answerable passage skips one)."""
    import math

    from tqdm import tqdm

    from app.generation.base import TextScorer

    scorer = answerer.generator
    if answerer.mode == "extractive" or not isinstance(scorer, TextScorer):
        return {"gold_ppl": None, "gold_ppl_questions": 0}
    search = answerer.pipeline.options(k=k, mode="hybrid", collapse=True)
    nll, tokens, scored = 0.0, 0, 0
    label = f"{answerer.mode} {'gold-context' if gold else 'end-to-end'} perplexity"
    for q in tqdm(questions, desc=label, disable=not progress):
        prepared = prepare_question(answerer, q, gold, search)
        messages = answerer.generation_messages(prepared)
        if messages is None:
            continue
        total, count = scorer.continuation_nll(messages, q.answers[0])
        nll, tokens, scored = nll + total, tokens + count, scored + 1
    return {"gold_ppl": math.exp(nll / tokens) if tokens else None, "gold_ppl_questions": scored}


def latency_summary(latencies: Sequence[float]) -> dict[str, float]:
    import numpy as np

    return {
        "latency_ms_p50": float(np.percentile(latencies, 50)),
        "latency_ms_p95": float(np.percentile(latencies, 95)),
    }


SPLITS = {"test": EVAL_ARTICLES, "validation": TRAIN_ARTICLES}  # `sift eval qa --split`; choices use validation


def squad_bundle(squad: Path, index_dir: Path, index_config: IndexConfig, articles: range = EVAL_ARTICLES) -> Path:
    """Build (once) a bundle whose documents are the paragraphs of `articles` (the evaluation articles)."""
    from indexer.build import ensure_bundle

    corpus = Path(index_dir) / "corpus.jsonl"
    if not corpus.exists():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        records = paragraphs_corpus(squad, articles)
        corpus.write_text("".join(json.dumps(d) + "\n" for d in records), encoding="utf-8")
    return ensure_bundle(corpus, index_dir, index_config)
