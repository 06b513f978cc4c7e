"""`sift reranker train`: fine-tune a sentence-transformers `CrossEncoder` (one relevance logit).

Training groups — a query, one positive passage and negatives — come from any mix of:
- BEIR qrels (`corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`; never a `test` split);
- SQuAD-format files (questions of the allowed articles; SQuAD v1.1 dev articles 24–47 are refused);
- label-free pseudo-queries from a corpus file or bundle: one sentence of a passage is the query and the
  rest of the passage the positive (the feature that adapts the reranker to your own documents).
Negatives are mined with Sift's own BM25 searcher and, optionally, its bi-encoder (moderately hard: ranks
3–30, positives excluded) plus random passages (easy). A fixed share of the groups is held out for
validation (nDCG@10 / MRR@10 of reranking each held-out query's candidates) after every epoch or every
`validate_every` steps, keeping the best model; checkpoints allow resuming.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.eval.pseudo import MIN_SENTENCES
from app.eval.pseudo import sentences as usable_sentences
from app.training.common import Group, Scored, epoch_batches, load_cross_encoder, logits, pairs_of, set_seed

if TYPE_CHECKING:
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

log = logging.getLogger(__name__)


class PassagePool:
    """Passages with a BM25 index over them (and, given a bi-encoder, their embeddings) for mining negatives."""

    def __init__(self, ids: list[str], texts: list[str], encoder: SentenceTransformer | None = None) -> None:
        from indexer.bm25 import BM25Index
        from indexer.config import BM25Settings

        self.ids, self.texts = ids, texts
        self.index = BM25Index.from_texts(texts, BM25Settings())
        self.encoder = encoder
        self._embeddings: np.ndarray | None = None

    def negatives(self, query: str, exclude: set[str], mining: Mining, rng: random.Random, lo: int = 2) -> list[str]:
        """`mining.hard` BM25 + `mining.dense` bi-encoder negatives from ranks lo..30, then `mining.easy` random
        ones; never a passage in `exclude`, never the same passage twice."""
        picked = self.hard_negatives(query, exclude, mining.hard, rng, lo=lo)
        if mining.dense:
            dense = self.dense_negatives(query, exclude, mining.dense + len(picked), rng, lo=lo)
            picked += [t for t in dense if t not in picked][: mining.dense]
        return picked + self.random_negatives(exclude, mining.easy, rng)

    def hard_negatives(
        self, query: str, exclude: set[str], n: int, rng: random.Random, lo: int = 2, hi: int = 30
    ) -> list[str]:
        from indexer.bm25 import top_k

        if n <= 0:
            return []
        ranked = top_k(self.index.scores(query), hi + len(exclude))
        pool = [i for i, _ in ranked if self.ids[i] not in exclude][lo:hi]
        return [self.texts[i] for i in rng.sample(pool, min(n, len(pool)))]

    def dense_negatives(
        self, query: str, exclude: set[str], n: int, rng: random.Random, lo: int = 2, hi: int = 30
    ) -> list[str]:
        if n <= 0 or self.encoder is None:
            return []
        if self._embeddings is None:
            self._embeddings = self.encoder.encode(
                self.texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=True
            )
        q = self.encoder.encode([query], normalize_embeddings=True, convert_to_numpy=True)[0]
        ranked = np.argsort(-(self._embeddings @ q))[: hi + len(exclude)]
        pool = [int(i) for i in ranked if self.ids[i] not in exclude][lo:hi]
        return [self.texts[i] for i in rng.sample(pool, min(n, len(pool)))]

    def random_negatives(self, exclude: set[str], n: int, rng: random.Random) -> list[str]:
        out: list[str] = []
        while len(out) < n and len(self.ids) > len(exclude):
            i = rng.randrange(len(self.ids))
            if self.ids[i] not in exclude:
                out.append(self.texts[i])
        return out


@dataclass(frozen=True)
class Mining:
    """How many negatives of each kind a training group gets."""

    hard: int = 2  # BM25, ranks 3–30
    easy: int = 1  # random passages
    dense: int = 0  # bi-encoder, ranks 3–30 (needs `encoder`)
    encoder: SentenceTransformer | None = None


def _doc_text(record: dict) -> str:
    title = record.get("title") or ""
    return f"{title} {record['text']}".strip() if title else record["text"]


def corpus_pool(
    key: str, records: list[dict], mining: Mining, pools: dict[str, PassagePool] | None = None
) -> PassagePool:
    """The passage pool of a corpus's records, built once per `key` in the caller's `pools` (BM25 and, with a
    bi-encoder, the corpus's embeddings are then made once however many sources mine it)."""
    if pools is not None and key in pools:
        return pools[key]
    pool = PassagePool([str(r["_id"]) for r in records], [_doc_text(r) for r in records], mining.encoder)
    if pools is not None:
        pools[key] = pool
    return pool


def beir_groups(
    root: Path, split: str, mining: Mining, rng: random.Random, pools: dict[str, PassagePool] | None = None
) -> list[Group]:
    if split == "test":
        raise ValueError("refusing to train on a test split; use qrels/train.tsv (or dev)")
    corpus = [json.loads(line) for line in open(root / "corpus.jsonl", encoding="utf-8")]
    pool = corpus_pool(str((root / "corpus.jsonl").resolve()), corpus, mining, pools)
    text_of = dict(zip(pool.ids, pool.texts))
    queries = {str(r["_id"]): r["text"] for r in map(json.loads, open(root / "queries.jsonl", encoding="utf-8"))}
    qrels: dict[str, set[str]] = {}
    for line in open(root / "qrels" / f"{split}.tsv", encoding="utf-8"):
        parts = line.strip().split("\t")
        if len(parts) >= 3 and parts[0] != "query-id" and int(parts[2]) > 0:
            qrels.setdefault(parts[0], set()).add(parts[1])
    groups = []
    for qid, positives in sorted(qrels.items()):
        for pid in sorted(positives):
            if pid in text_of and qid in queries:
                negatives = pool.negatives(queries[qid], positives, mining, rng)
                groups.append(Group(queries[qid], text_of[pid], negatives, f"beir:{root.name}"))
    return groups


def squad_groups(
    path: Path, articles: Sequence[int], mining: Mining, rng: random.Random, limit: int | None
) -> list[Group]:
    from app.eval.qa import EVAL_ARTICLES

    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    if Path(path).name == "dev-v1.1.json" and set(articles) & set(EVAL_ARTICLES):
        raise ValueError("SQuAD v1.1 dev articles 24–47 are held out for evaluation; train on articles 0–23 only")
    ids, texts, items = [], [], []
    for a in articles:
        for p, paragraph in enumerate(data[a]["paragraphs"]):
            pid = f"a{a}-p{p}"
            ids.append(pid)
            texts.append(paragraph["context"])
            items += [(qa["question"], pid, paragraph["context"]) for qa in paragraph["qas"]]
    rng.shuffle(items)
    pool = PassagePool(ids, texts, mining.encoder)
    groups = []
    for question, pid, context in items[:limit]:
        negatives = pool.negatives(question, {pid}, mining, rng, lo=0)
        groups.append(Group(question, context, negatives, "squad"))
    return groups


def pseudo_query_groups(
    corpus: Path,
    mining: Mining,
    rng: random.Random,
    limit: int | None,
    per_document: int = 1,
    pools: dict[str, PassagePool] | None = None,
) -> list[Group]:
    """Label-free groups: a sentence of a document as the query, the document without it as the positive
    (`per_document` distinct sentences of each document become queries)."""
    if (Path(corpus) / "current").exists() or (Path(corpus) / "manifest.json").exists():
        from indexer.bundle import DOCSTORE, open_bundle
        from indexer.docstore import Docstore

        store = Docstore(open_bundle(corpus, verify=False).path(DOCSTORE))
        records = [{"_id": pid, "title": title, "text": text} for pid, title, text in store.passage_texts()]
    else:
        records = [json.loads(line) for line in open(corpus, encoding="utf-8")]
    pool = corpus_pool(str(Path(corpus).resolve()), records, mining, pools)
    order = list(range(len(records)))
    rng.shuffle(order)
    groups = []
    for i in order:
        record = records[i]
        sentences = usable_sentences(record["text"])
        if len(sentences) < MIN_SENTENCES:
            continue
        exclude = {str(record["_id"])}
        for query in rng.sample(sentences[1:], min(per_document, len(sentences) - 1)):
            rest = record["text"].replace(query, " ").strip()
            positive = f"{record.get('title') or ''} {rest}".strip()
            negatives = pool.negatives(query, exclude, mining, rng)
            groups.append(Group(query, positive, negatives, "pseudo"))
        if limit and len(groups) >= limit:
            break
    return groups[:limit] if limit else groups


@dataclass
class TrainConfig:
    base: str = "sentence-transformers/all-MiniLM-L6-v2"
    out: Path = Path("models/reranker")
    loss: str = "listwise"  # listwise (softmax over 1 positive + negatives) | bce (pointwise)
    max_length: int = 192
    epochs: int = 1
    batch_size: int = 8  # groups per step
    lr: float = 3e-5
    warmup: float = 0.1
    seed: int = 13
    validation: float = 0.05
    checkpoint_every: int = 200
    validate_every: int = 0  # steps between validations (0: once per epoch); the best model is kept
    device: str | None = None
    resume: bool = True
    max_seconds: float | None = None  # time budget: stop (validating and keeping the best) once spent
    margin_weight: float = 0.0  # weight of the Margin-MSE term on a teacher's margins (0: no teacher)


def group_scores(model: CrossEncoder, groups: Sequence[Group], batch_size: int = 64) -> list[np.ndarray]:
    """Each group's logits, positive first."""
    flat = logits(model, pairs_of(groups), batch_size)
    out, offset = [], 0
    for g in groups:
        n = 1 + len(g.negatives)
        out.append(flat[offset : offset + n])
        offset += n
    return out


def validate(model: CrossEncoder, groups: Sequence[Group]) -> dict[str, float]:
    """nDCG@10 and MRR@10 of reranking each held-out group (the positive is the one relevant passage)."""
    import ir_measures
    from ir_measures import RR, nDCG

    qrels, run = {}, {}
    for i, scores in enumerate(group_scores(model, groups)):
        qrels[str(i)] = {"0": 1}
        run[str(i)] = {str(j): float(s) for j, s in enumerate(scores)}
    result = ir_measures.calc_aggregate([nDCG @ 10, RR @ 10], qrels, run)
    return {"ndcg@10": float(result[nDCG @ 10]), "mrr@10": float(result[RR @ 10])}


def train(groups: Sequence[Group | Scored], config: TrainConfig, progress: bool = True) -> dict:
    """Fine-tune and save the best (by validation nDCG@10) model to `config.out`; returns the training log.
    `groups` may carry a teacher's margins (`Scored`, from `app.training.teacher.margins_on_scale` on this
    model's logit scale); with `config.margin_weight` > 0 they add a Margin-MSE term to the listwise loss."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    set_seed(config.seed)
    rng = random.Random(config.seed)
    items = [g if isinstance(g, Scored) else Scored(g, []) for g in groups]
    items = [s for s in items if s.group.negatives]
    rng.shuffle(items)
    if config.margin_weight > 0 and not all(s.margins for s in items):
        raise ValueError("margin_weight > 0 needs a teacher's margins for every group")
    n_val = max(1, int(len(items) * config.validation)) if config.validation > 0 else 0
    val, train_groups = [s.group for s in items[:n_val]], items[n_val:]
    model = load_cross_encoder(config.base, config.max_length, config.device)
    network, tokenizer, device = model.model, model.tokenizer, model.device
    if network is None:
        raise RuntimeError(f"{config.base}: the cross-encoder loaded without a model")
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr)
    steps_per_epoch = math.ceil(len(train_groups) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup * total), total)
    out = Path(config.out)
    checkpoint = out / "checkpoint"
    state: dict[str, Any] = {"step": 0, "history": [], "best": -1.0}
    if config.resume and (checkpoint / "state.json").exists():
        state = json.loads((checkpoint / "state.json").read_text())
        network.load_state_dict(torch.load(checkpoint / "network.pt", map_location=device))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device))
        scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", map_location=device))
        log.info("resumed from step %d", state["step"])
    if val and state["step"] == 0:
        state["history"].append({"step": 0, "epoch": 0, **validate(model, val)})
    started = time.perf_counter()
    bar = tqdm(total=total, initial=state["step"], desc="train", disable=not progress)
    for epoch in range(config.epochs):
        for step_in_epoch, batch in enumerate(epoch_batches(train_groups, config.batch_size, config.seed, epoch)):
            global_step = epoch * steps_per_epoch + step_in_epoch
            if global_step < state["step"]:
                continue
            tick = time.perf_counter()
            network.train()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
                loss = _loss(network, tokenizer, batch, config, device)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state["step"] = global_step + 1
            state.setdefault("losses", []).append(float(loss.detach()))
            state["pairs"] = state.get("pairs", 0) + sum(1 + len(s.group.negatives) for s in batch)
            state["train_s"] = state.get("train_s", 0.0) + time.perf_counter() - tick
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(state['losses'][-50:]):.4f}")
            if val and config.validate_every and state["step"] % config.validate_every == 0:
                _validate_and_keep_best(model, val, state, epoch, out)
            if config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                _save_checkpoint(checkpoint, network, optimizer, scheduler, state)
            if config.max_seconds and time.perf_counter() - started > config.max_seconds:
                state["stopped"] = f"time budget of {config.max_seconds:.0f} s spent at step {state['step']}"
                break
        if val:
            if state["history"][-1]["step"] != state["step"]:
                _validate_and_keep_best(model, val, state, epoch, out)
        else:
            model.save(str(out))
        _save_checkpoint(checkpoint, network, optimizer, scheduler, state)
        if "stopped" in state:
            break
    bar.close()
    state["seconds"] = time.perf_counter() - started
    state["pairs_per_s"] = state.get("pairs", 0) / max(state.get("train_s", 0.0), 1e-9)
    state["train_groups"], state["validation_groups"] = len(train_groups), len(val)
    state["margin_weight"] = config.margin_weight
    (out / "training_log.json").write_text(
        json.dumps(
            {k: v for k, v in state.items() if k != "losses"} | {"loss_curve": state.get("losses", [])[::10]}, indent=1
        )
    )
    shutil.rmtree(checkpoint, ignore_errors=True)
    return state


def save_half_precision(folder: Path) -> int:
    """Rewrite the floating-point weights of a saved model in fp16 (half the size; loading up-casts on CPU).
    Returns the new size of the weights file in bytes."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "model.safetensors"
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    tmp = path.with_suffix(".tmp")
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    config_path = Path(folder) / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        config["dtype"] = "float16"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return path.stat().st_size


def _validate_and_keep_best(
    model: CrossEncoder, val: Sequence[Group], state: dict[str, Any], epoch: int, out: Path
) -> None:
    if model.model is not None:
        model.model.eval()
    scores = validate(model, val)
    state["history"].append({"step": state["step"], "epoch": epoch + 1, **scores})
    log.warning("validation at step %d: %s", state["step"], scores)
    if scores["ndcg@10"] > state["best"]:
        state["best"] = scores["ndcg@10"]
        model.save(str(out))


def _loss(network: Any, tokenizer: Any, batch: list[Scored], config: TrainConfig, device: Any) -> torch.Tensor:
    """The batch's loss (`network`: the cross-encoder's transformers model, `tokenizer` its tokenizer): listwise
    (or pointwise) towards each group's positive, plus `config.margin_weight` × the mean squared error between
    the model's margins (positive logit minus each negative's) and the teacher's."""
    import torch

    queries, passages, sizes = [], [], []
    for g in (s.group for s in batch):
        texts = [g.positive, *g.negatives]
        queries += [g.query] * len(texts)
        passages += texts
        sizes.append(len(texts))
    features = tokenizer(
        queries, passages, padding=True, truncation="longest_first", max_length=config.max_length, return_tensors="pt"
    ).to(device)
    logits = network(**features).logits.view(-1)
    if config.loss == "bce":
        labels = torch.cat([torch.tensor([1.0] + [0.0] * (n - 1)) for n in sizes]).to(device)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    else:
        losses, offset = [], 0
        for n in sizes:
            losses.append(-torch.log_softmax(logits[offset : offset + n], dim=0)[0])
            offset += n
        loss = torch.stack(losses).mean()
    if config.margin_weight <= 0:
        return loss
    student, offset = [], 0
    for n in sizes:
        student.append(logits[offset] - logits[offset + 1 : offset + n])
        offset += n
    teacher = torch.tensor([m for s in batch for m in s.margins], dtype=logits.dtype, device=logits.device)
    return loss + config.margin_weight * torch.nn.functional.mse_loss(torch.cat(student), teacher)


def _save_checkpoint(
    path: Path,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), tmp / "network.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
