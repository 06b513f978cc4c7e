"""`sift`: the command line. `sift index`, `sift serve`, `sift eval`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from indexer.cli import app as index_app

if TYPE_CHECKING:
    from app.settings import Settings

DEFAULT_READER = "models/sift-reader-minilm-l6"

app = typer.Typer(help="Sift: two-stage neural retrieval (BM25 + dense, fusion, reranking).", no_args_is_help=True)
app.add_typer(index_app, name="index")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (parsed when it is JSON itself), extras."""

    _SKIP = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        import json

        message = record.getMessage()
        entry: dict = {"ts": self.formatTime(record), "level": record.levelname.lower(), "logger": record.name}
        try:
            parsed = json.loads(message)
            entry.update(parsed if isinstance(parsed, dict) else {"msg": message})
        except ValueError:
            entry["msg"] = message
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._SKIP})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info") -> None:
    """Structured (JSON lines) logs on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def limit_malloc_arenas(arenas: int | None) -> None:
    """Cap glibc's malloc arenas (mallopt M_ARENA_MAX), before the server starts its threads; a no-op off
    glibc. Worker processes inherit MALLOC_ARENA_MAX from the environment set here."""
    if arenas is None:
        return
    os.environ.setdefault("MALLOC_ARENA_MAX", str(arenas))
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8 is M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def anonymous_refusal(settings: Settings, host: str) -> str | None:
    """Why serving on `host` without API keys is refused (None when it is allowed)."""
    from app.api.auth import Auth, is_loopback

    try:
        auth = Auth(settings.server)
    except (OSError, ValueError) as exc:
        return f"API keys: {exc}"
    if auth.anonymous and not is_loopback(host) and not settings.server.allow_anonymous:
        return (
            f"refusing to serve on {host} without API keys: anyone who reaches the port could use every endpoint. "
            "Set server.api_keys (e.g. SIFT_SERVER__API_KEYS='[\"<a long random key>\"]'), or bind 127.0.0.1, "
            "or set server.allow_anonymous: true if something in front of Sift authenticates"
        )
    return None


def serving_banner(settings: Settings, host: str, port: int) -> str:
    """What a newcomer needs on start-up: where to look, when it is ready, how to expose it safely."""
    from app.api.auth import is_loopback

    shown = f"[{host}]" if ":" in host else host
    lines = [
        f"sift: loading models and builds; ready when http://{shown}:{port}/readyz answers 200 "
        f'(a "ready" log line says so). Playground: http://{shown}:{port}/ · API docs: http://{shown}:{port}/docs'
    ]
    if is_loopback(host):
        lines.append(
            "sift: listening on loopback only. To serve other machines, set a key and bind all interfaces: "
            "SIFT_SERVER__API_KEYS='[\"'$(openssl rand -hex 24)'\"]' make run HOST=0.0.0.0 "
            "(or sift serve --host 0.0.0.0); clients then send Authorization: Bearer <key>"
        )
    return "\n".join(lines)


@app.command("serve")
def serve(
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help="bundle folder or index folder with `current`"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (default configs/default.yaml)"),
    host: str | None = typer.Option(None, help="interface to bind (default from config: 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (default from config: 8000)"),
    workers: int | None = typer.Option(
        None, help="worker processes (default server.workers); models load once, shared"
    ),
    engine: str = typer.Option("uvicorn", "--engine", help="uvicorn (this machine) or ray (Ray Serve replicas)"),
    replicas: int | None = typer.Option(
        None, "--replicas", min=1, help="--engine ray: replicas (default ray.replicas)"
    ),
    shards: bool = typer.Option(
        False, "--shards", help="--engine ray, a sharded build: one deployment per shard behind a fan-out ingress"
    ),
    address: str | None = typer.Option(None, "--address", help="--engine ray: cluster to join (default ray.address)"),
) -> None:
    """Serve the HTTP API with uvicorn. The server watches each collection's `current` link and switches
    to a newly published build without a restart (`POST /v1/admin/reload` checks at once).
    With --engine ray (install `sift[ray]`), Ray Serve runs --replicas replicas of the service (autoscaling
    from the config's `ray.autoscaling`), or with --shards one deployment per shard of a sharded build."""
    import uvicorn

    from app.api.main import create_app
    from app.settings import load_settings

    overrides = {"bundle": bundle} if bundle is not None else {}
    settings = load_settings(config, **overrides)
    setup_logging(settings.server.log_level)
    n = workers or settings.server.workers
    serve_host, serve_port = host or settings.server.host, port or settings.server.port
    limit_malloc_arenas(settings.server.malloc_arena_max)
    refusal = anonymous_refusal(settings, serve_host)
    if refusal:
        typer.echo(f"error: {refusal}", err=True)
        raise typer.Exit(2)
    if engine == "ray":
        try:
            from app import serving_ray
        except ImportError as exc:
            typer.echo(f"error: --engine ray needs Ray: pip install 'sift[ray]' ({exc})", err=True)
            raise typer.Exit(2) from exc
        settings.ray.replicas = replicas or settings.ray.replicas
        settings.ray.address = address or settings.ray.address
        serving_ray.run(settings, serve_host, serve_port, sharded=shards)
        return
    if engine != "uvicorn":
        typer.echo(f"error: --engine must be uvicorn or ray, not {engine!r}", err=True)
        raise typer.Exit(2)
    typer.echo(serving_banner(settings, serve_host, serve_port), err=True)
    if n == 1:
        uvicorn.run(create_app(settings), host=serve_host, port=serve_port, log_level=settings.server.log_level)
        return
    from app.serving import serve_workers

    serve_workers(settings, n, serve_host, serve_port)


eval_app = typer.Typer(help="Measure retrieval quality and latency on BEIR-layout datasets.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("retrieval")
def eval_retrieval(
    dataset: Path = typer.Option(..., "--dataset", "-d", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/"),
    split: str = typer.Option("test", help="qrels split to evaluate (qrels/<split>.tsv)"),
    pipelines: str = typer.Option("bm25,dense,hybrid,hybrid+rerank", help="comma-separated pipelines to run"),
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help="evaluate this bundle (must index the corpus)"),
    build: bool = typer.Option(False, "--build", help="(re)build the bundle from the dataset's corpus first"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (index, fusion, reranker)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="where to write JSON, Markdown and TREC runs"),
    rerank_depth: int | None = typer.Option(None, help="candidates reranked by hybrid+rerank"),
) -> None:
    """Run each pipeline over the dataset's queries through the API's code path and report nDCG@10,
    Recall@100, MRR@10 and per-query latency p50/p95. Without --bundle, the bundle is kept in
    var/eval/<dataset>/ and reused unless --build is given."""
    import json

    from app.eval.retrieval import PIPELINES, load_beir, markdown_table, run_pipelines, write_trec_run
    from app.services import load_pipeline
    from app.settings import load_settings
    from indexer.build import ensure_bundle

    setup_logging("warning")
    data = load_beir(dataset, split)
    names = [p.strip() for p in pipelines.split(",") if p.strip()]
    unknown = [n for n in names if n not in PIPELINES]
    if unknown:
        typer.echo(f"error: unknown pipeline(s) {unknown}; choose from {list(PIPELINES)}", err=True)
        raise typer.Exit(2)
    settings = load_settings(config)
    index_dir = bundle or Path("var") / "eval" / dataset.resolve().name
    if bundle is None:
        ensure_bundle(data.corpus, index_dir, settings.index, rebuild=build, show_progress=True)
    settings = load_settings(config, bundle=index_dir)
    pipeline = load_pipeline(settings)
    if "hybrid+rerank" in names and not pipeline.second_stage:
        typer.echo("note: no second stage configured (reranker.model); skipping hybrid+rerank", err=True)
        names.remove("hybrid+rerank")
    unavailable = [n for n in names if PIPELINES[n]["mode"] not in pipeline.available_modes()]
    if unavailable:
        typer.echo(
            f"error: pipeline(s) {unavailable} cannot run on bundle {pipeline.bundle.build_id}: it supports modes "
            f"{pipeline.available_modes()} (was it built without the dense index?)",
            err=True,
        )
        raise typer.Exit(2)
    rows, runs = run_pipelines(pipeline, data, names, rerank_depth=rerank_depth, progress=True)
    table = markdown_table(rows)
    typer.echo(f"{dataset.name} {split}: {len(data.queries)} queries, bundle {pipeline.bundle.build_id}")
    typer.echo(table)
    out = out or Path("var") / "eval" / f"{dataset.resolve().name}-{split}"
    out.mkdir(parents=True, exist_ok=True)
    for name, run in runs.items():
        write_trec_run(run, out / f"{name}.trec", f"sift-{name}")
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "dataset": str(dataset),
                "split": split,
                "bundle": pipeline.bundle.build_id,
                "pipelines": {
                    r.name: {
                        **r.metrics,
                        "latency_ms_p50": r.latency_ms_p50,
                        "latency_ms_p95": r.latency_ms_p95,
                        "queries": r.queries,
                    }
                    for r in rows
                },
            },
            indent=2,
        )
    )
    typer.echo(f"wrote {out}/results.json, results.md and TREC runs")


@eval_app.command("qa")
def eval_qa(
    squad: Path = typer.Option(..., "--squad", help="SQuAD v1.1 JSON file (e.g. ../shared/data/squad/dev-v1.1.json)"),
    modes: str = typer.Option(
        "generative,extractive,extract-then-generate",
        help="answer modes to compare (those whose generator/reader is configured run; `none` = retrieval only)",
    ),
    gold_context: bool = typer.Option(
        True, "--gold-context/--no-gold-context", help="answer with the gold paragraph given"
    ),
    retrieve: bool = typer.Option(True, "--retrieve/--no-retrieve", help="answer end to end over the SQuAD paragraphs"),
    reader: str | None = typer.Option(
        None, help="extractive reader for the extractive modes (default: answer.reader, else the shipped one)"
    ),
    split: str = typer.Option(
        "test",
        help="test: held-out articles 24–47 (report figures); validation: articles 0–23 (make choices here, e.g. "
        "answer.mode; the shipped reader and cross-encoder were trained on them, so they favour the extractive modes)",
    ),
    sample_size: int = typer.Option(500, "--sample", help="questions sampled (fixed seed) from the split's articles"),
    limit: int | None = typer.Option(None, help="evaluate only the first N sampled questions"),
    k: int = typer.Option(5, help="passages retrieved per question"),
    passages: int = typer.Option(2, help="retrieved passages read (or put into the prompt)"),
    max_new_tokens: int = typer.Option(24, help="tokens generated per answer"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config"),
    out: Path | None = typer.Option(None, "--out", "-o", help="where to write results.json and predictions"),
) -> None:
    """Exact match / F1 (official SQuAD normalisation), ROUGE-L, BLEU, the gold answer's perplexity under the
    generator given the mode's prompt, and latency p50/p95 per answer, for every
    answer mode side by side, on a fixed sample of SQuAD v1.1 dev articles 24–47: with the gold paragraph, and
    end to end (hybrid retrieval over the articles' paragraphs). Also retrieval-only QA (gold paragraph in
    the top k)."""
    import json

    from app.eval.qa import (
        MODES,
        SPLITS,
        answer_questions,
        gold_perplexity,
        latency_summary,
        load_squad,
        qa_answerer,
        qa_scores,
        retrieval_qa,
        retrieve_hits,
        sample,
        sample_fingerprint,
        squad_bundle,
    )
    from app.generation import GenerationOptions, load_generator
    from app.services import load_pipeline
    from app.settings import load_settings

    setup_logging("warning")
    settings = load_settings(config)
    wanted = [m.strip() for m in modes.split(",") if m.strip() and m.strip() != "none"]
    unknown = [m for m in wanted if m not in MODES]
    if unknown:
        typer.echo(f"error: unknown mode(s) {unknown}; choose from {list(MODES)} or none", err=True)
        raise typer.Exit(2)
    if split not in SPLITS:
        typer.echo(f"error: unknown split {split!r}; choose from {list(SPLITS)}", err=True)
        raise typer.Exit(2)
    articles = SPLITS[split]
    questions = sample(load_squad(squad, articles), sample_size)
    fingerprint = sample_fingerprint(questions)
    questions = questions[:limit] if limit else questions
    gen = None
    if any(m != "extractive" for m in wanted):
        gen = load_generator(settings.generator, settings.device)
    extractive = None
    if any(m != "generative" for m in wanted):
        from app.generation.reader import ExtractiveReader

        extractive = ExtractiveReader.load(reader or settings.answer.reader or DEFAULT_READER, settings.device)
    runnable = [m for m in wanted if (m == "extractive" or gen is not None)]
    options = GenerationOptions(max_new_tokens=max_new_tokens, stop=["\n"])
    typer.echo(
        f"SQuAD v1.1 dev articles {articles.start}–{articles.stop - 1} ({split}): {len(questions)} questions "
        f"(sample {sample_size}, fingerprint {fingerprint})"
    )
    name = f"squad-dev-a{articles.start}-{articles.stop - 1}"
    index_dir = squad_bundle(squad, Path("var") / "eval" / name, settings.index, articles)
    pipeline = load_pipeline(load_settings(config, bundle=index_dir))
    results: dict[str, dict] = {}
    predictions: dict[str, list[str]] = {}
    if retrieve:
        results["retrieval"] = retrieval_qa(questions, retrieve_hits(pipeline, questions, k), (1, k))
    for mode in runnable:
        answerer = qa_answerer(pipeline, mode, gen, extractive, passages)
        for setting, on in (("gold_context", gold_context), ("end_to_end", retrieve)):
            if not on:
                continue
            preds, latencies = answer_questions(answerer, questions, options, setting == "gold_context", k)
            predictions[f"{mode}/{setting}"] = preds
            results[f"{mode}/{setting}"] = {
                **qa_scores(preds, questions),
                **gold_perplexity(answerer, questions, setting == "gold_context", k),
                **latency_summary(latencies),
            }
    typer.echo(
        "| mode | setting | EM | F1 | ROUGE-L | BLEU | gold PPL | p50 ms | p95 ms |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for name, r in results.items():
        if name == "retrieval":
            continue
        mode, setting = name.split("/")
        ppl = "n/a" if r["gold_ppl"] is None else f"{r['gold_ppl']:.1f}"
        typer.echo(
            f"| {mode} | {setting} | {r['exact_match']:.1f} | {r['f1']:.1f} | {r['rouge_l']:.1f} | {r['bleu']:.1f} "
            f"| {ppl} | {r['latency_ms_p50']:.0f} | {r['latency_ms_p95']:.0f} |"
        )
    typer.echo(
        "gold PPL: perplexity of the gold answer as the generator's reply to the mode's own prompt (lower: the "
        "prompt leads the model to the answer); n/a without a local generator to score it (extractive mode)"
    )
    for name, value in results.get("retrieval", {}).items():
        typer.echo(f"retrieval-only QA: {name} = {value:.1f}%")
    out = out or Path("var") / "eval" / ("squad-qa" if split == "test" else f"squad-qa-{split}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                "split": split,
                "sample": sample_size,
                "evaluated": len(questions),
                "fingerprint": fingerprint,
                "generator": gen.name if gen else None,
                "reader": reader or settings.answer.reader or (DEFAULT_READER if extractive else None),
                "k": k,
                "passages": passages,
                "results": results,
            },
            indent=2,
        )
    )
    (out / "predictions.json").write_text(
        json.dumps({name: {q.id: p for q, p in zip(questions, preds)} for name, preds in predictions.items()}, indent=1)
    )
    typer.echo(f"wrote {out}/results.json and predictions.json")


@eval_app.command("classify")
def eval_classify(
    dataset: str = typer.Option(
        ..., "--dataset", "-d", help="`squad` (paragraphs → article titles) or PATH.jsonl:METADATA_KEY"
    ),
    squad: Path | None = typer.Option(None, "--squad", help="SQuAD v1.1 JSON (for --dataset squad)"),
    choose_per_label: int | None = typer.Option(
        10, "--choose-per-label", help="half-0 texts per label used to choose (0: all of half 0)"
    ),
    field: str = typer.Option("label", help="metadata field of the label set written to label_set.json"),
    max_prompts: int = typer.Option(
        1,
        "--max-prompts",
        min=1,
        max=5,
        help="also try ensembles of up to this many prompts (each costs one more model pass per text)",
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (index.tagging.model, ...)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="folder for results.json and label_set.json"),
) -> None:
    """Zero-shot tagging: choose the template and verbalizer on half 0 of a labelled set (each label's texts
    alternate between halves), report macro-F1 and accuracy on half 1 beside the baseline (the nearest label
    name by bi-encoder cosine), and write the chosen label set (`index.tagging.label_sets` takes it)."""
    import json
    import random
    import re
    import time

    import numpy as np

    from app.eval.classify import (
        accuracy,
        cap_per_label,
        choose,
        cosine_baseline,
        ensemble_scores,
        halves,
        load_labelled,
        macro_f1,
    )
    from app.settings import load_settings
    from indexer.config import PRIOR_SAMPLE, LabelSet
    from indexer.encoders import load_encoder
    from indexer.tagging import Tagger

    setup_logging("warning")
    settings = load_settings(config)
    try:
        name, rows = load_labelled(dataset, squad)
    except (OSError, ValueError, KeyError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    labels = list(dict.fromkeys(r.label for r in rows))
    half0, test = halves(rows)
    dev = cap_per_label(half0, choose_per_label)
    typer.echo(f"{name}: {len(labels)} labels; choosing on {len(dev)} texts of half 0, reporting on {len(test)}")
    tagger = Tagger.load(settings.index.tagging)
    chosen, tried = choose(tagger, field, labels, dev, echo=typer.echo, max_prompts=max_prompts)
    prior_on = 0
    if chosen.prior:  # measured again as `sift index prior` does: a uniform sample of half 0, chosen without labels
        sample = sorted(random.Random(0).sample(range(len(half0)), min(PRIOR_SAMPLE, len(half0))))
        prior_on = len(sample)
        typer.echo(f"measuring the chosen set's label prior on {prior_on} texts of half 0 (a uniform sample)")
        found = tagger.estimate_prior([half0[i].text for i in sample], chosen)
        chosen = LabelSet.model_validate({**chosen.model_dump(), "prior": found})
    gold = [r.label for r in test]
    texts = [r.text for r in test]
    # names only: the chosen prompts (all of an ensemble's), each label's name as its only word, no prior (the
    # chosen one was measured with the chosen words)
    no_words: dict[str, list[str]] = {label: [] for label in labels}
    names = chosen.model_copy(
        update={
            "labels": no_words,
            "prior": {},
            "ensemble": [p.model_copy(update={"labels": no_words}) for p in chosen.ensemble],
        }
    )
    tables = []
    t = time.perf_counter()
    for part in chosen.prompts():  # one model pass per prompt; both verbalizers read it
        words = list(dict.fromkeys([*tagger.verbalizer(part, strict=False).words, *labels]))
        tables.append((tagger.scorer.word_logprobs(texts, part, words), {w: i for i, w in enumerate(words)}))
    seconds = time.perf_counter() - t
    predicted, by_names, no_prior = (
        [labels[int(i)] for i in np.argmax(ensemble_scores(tagger, s, tables), axis=1)]
        for s in (chosen, names, chosen.model_copy(update={"prior": {}}))
    )
    encoder = load_encoder(settings.index.dense.model, settings.index.dense.device)
    baseline = cosine_baseline(encoder, texts, labels)
    scored = {
        "tagger": {"macro_f1": macro_f1(gold, predicted, labels), "accuracy": accuracy(gold, predicted)},
        "tagger_names_only": {"macro_f1": macro_f1(gold, by_names, labels), "accuracy": accuracy(gold, by_names)},
        "tagger_without_prior": {"macro_f1": macro_f1(gold, no_prior, labels), "accuracy": accuracy(gold, no_prior)},
        "cosine_baseline": {"macro_f1": macro_f1(gold, baseline, labels), "accuracy": accuracy(gold, baseline)},
    }
    results = {
        "dataset": name,
        "labels": len(labels),
        "chosen_on": len(dev),
        "reported_on": len(test),
        "model": tagger.name,
        "template": chosen.template,
        "prefix": chosen.prefix,
        "calibration": chosen.calibration,
        "verbalizer": chosen.labels,
        "prompts": len(chosen.prompts()),
        "prior": chosen.prior,
        "prior_strength": chosen.prior_strength if chosen.prior else 0.0,
        "prior_measured_on": prior_on,
        "ensemble": [p.model_dump(mode="json") for p in chosen.ensemble],
        **scored,
        "ms_per_text": 1000 * seconds / max(1, len(texts)),
        "choices": tried,
    }
    typer.echo("| method (half 1) | macro-F1 | accuracy |\n|---|---:|---:|")
    for key, title in (
        ("tagger", "zero-shot tagger, template and verbalizer chosen on half 0"),
        ("tagger_names_only", "zero-shot tagger, label names as verbalizer"),
        ("tagger_without_prior", "zero-shot tagger, the chosen set without its label prior"),
        ("cosine_baseline", "baseline: nearest label name by bi-encoder cosine"),
    ):
        r = scored[key]
        typer.echo(f"| {title} | {100 * r['macro_f1']:.1f} | {100 * r['accuracy']:.1f} |")
    typer.echo(f"tagging cost: {results['ms_per_text']:.0f} ms per text ({tagger.name}, this machine)")
    out = out or Path("var") / "eval" / "classify" / re.sub(r"[^A-Za-z0-9]+", "-", dataset).strip("-")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for warning in tagger.conflicts(chosen):
        typer.echo(f"warning: the chosen label set: {warning}", err=True)
    (out / "label_set.json").write_text(json.dumps(chosen.model_dump(mode="json"), indent=2))
    typer.echo(f"wrote {out}/results.json and label_set.json")


reranker_app = typer.Typer(
    help="Train cross-encoder rerankers, and choose a collection's second stage.", no_args_is_help=True
)
app.add_typer(reranker_app, name="reranker")


@reranker_app.command("train")
def reranker_train(
    out: Path = typer.Option(Path("models/reranker"), "--out", "-o", help="where the trained CrossEncoder is saved"),
    base: str = typer.Option("sentence-transformers/all-MiniLM-L6-v2", help="base checkpoint (path or hub id)"),
    beir: list[Path] = typer.Option([], help="BEIR folder(s) whose qrels/<split>.tsv give labelled pairs"),
    beir_split: str = typer.Option("train", help="qrels split for --beir (test is refused)"),
    squad: Path | None = typer.Option(None, help="SQuAD-format JSON for question/paragraph pairs"),
    squad_articles: str = typer.Option("0-23", help="article range of --squad (dev 24–47 is refused)"),
    squad_limit: int | None = typer.Option(None, help="at most this many SQuAD questions"),
    pseudo: list[Path] = typer.Option([], help="corpus JSONL or bundle for label-free pseudo-queries"),
    pseudo_limit: int | None = typer.Option(None, help="at most this many pseudo-queries per corpus"),
    pseudo_per_doc: int = typer.Option(1, help="pseudo-queries (distinct sentences) per document"),
    hard_negatives: int = typer.Option(2, help="BM25-mined negatives per query (ranks 3–30)"),
    easy_negatives: int = typer.Option(1, help="random negatives per query"),
    dense_negatives: int = typer.Option(0, help="bi-encoder-mined negatives per query (ranks 3–30)"),
    dense_model: str = typer.Option("sentence-transformers/all-MiniLM-L6-v2", help="bi-encoder for --dense-negatives"),
    loss: str = typer.Option("listwise", help="listwise (softmax over positive + negatives) or bce"),
    max_length: int = typer.Option(192, help="tokens per (query, passage) pair"),
    epochs: int = typer.Option(1),
    batch_size: int = typer.Option(8, help="query groups per optimisation step"),
    lr: float = typer.Option(3e-5, help="learning rate"),
    warmup: float = typer.Option(0.1, help="warm-up share of the steps"),
    seed: int = typer.Option(13),
    validation: float = typer.Option(0.05, help="share of groups held out for validation"),
    checkpoint_every: int = typer.Option(200, help="steps between resumable checkpoints"),
    validate_every: int = typer.Option(0, help="steps between validations (0: after each epoch)"),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when present)"),
    fp16: bool = typer.Option(True, "--fp16/--fp32", help="store the saved model's weights in half precision"),
    teacher: bool = typer.Option(
        False,
        "--teacher/--no-teacher",
        help="add Margin-MSE on the configured second stage's margins (reranker.model + MaxSim over the bi-encoder)",
    ),
    margin_weight: float = typer.Option(1.0, help="weight of the teacher's margin term (with --teacher)"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config naming the teacher's stages"),
    max_minutes: float | None = typer.Option(None, help="time budget: stop there, keeping the best model"),
) -> None:
    """Fine-tune a CrossEncoder on any mix of BEIR qrels, SQuAD questions and pseudo-queries, with negatives
    mined by Sift's BM25 (and the bi-encoder); validates after each epoch and keeps the best model. With
    --teacher, Sift's second stage scores every pair first and its margins are distilled too. Rerun to resume."""
    import json
    import random

    from app.settings import load_settings
    from app.training.common import describe_sources
    from app.training.reranker import (
        Mining,
        PassagePool,
        TrainConfig,
        beir_groups,
        pseudo_query_groups,
        squad_groups,
        train,
    )

    setup_logging("warning")
    settings = load_settings(config)
    rng = random.Random(seed)
    encoder = None
    if dense_negatives:
        from indexer.encoders import load_encoder

        encoder = load_encoder(dense_model, device)
    mining = Mining(hard=hard_negatives, easy=easy_negatives, dense=dense_negatives, encoder=encoder)
    pools: dict[str, PassagePool] = {}  # a corpus mined by several sources is indexed and embedded once
    groups = []
    for folder in beir:
        groups += beir_groups(folder, beir_split, mining, rng, pools)
    if squad is not None:
        first, last = (int(x) for x in squad_articles.split("-"))
        groups += squad_groups(squad, range(first, last + 1), mining, rng, squad_limit)
    for corpus in pseudo:
        groups += pseudo_query_groups(corpus, mining, rng, pseudo_limit, pseudo_per_doc, pools)
    if not groups:
        typer.echo("error: no training data; pass --beir, --squad and/or --pseudo", err=True)
        raise typer.Exit(2)
    typer.echo(describe_sources(groups))
    train_config = TrainConfig(
        base=base,
        out=out,
        loss=loss,
        max_length=max_length,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        seed=seed,
        validation=validation,
        checkpoint_every=checkpoint_every,
        validate_every=validate_every,
        device=device,
        max_seconds=max_minutes * 60 if max_minutes else None,
        margin_weight=margin_weight if teacher else 0.0,
    )
    state = train(_teacher_margins(groups, settings, base, max_length, device) if teacher else groups, train_config)
    summary = {"history": state["history"], "seconds": round(state["seconds"], 1)}
    typer.echo(json.dumps(summary | {"pairs_per_s": round(state["pairs_per_s"], 2)}, indent=1))
    if fp16:
        from app.training.reranker import save_half_precision

        save_half_precision(out)
    typer.echo(f"saved the best model to {out}")


def _teacher_margins(groups: list, settings: Settings, base: str, max_length: int, device: str | None) -> list:
    """`groups` scored by the configured second stage (`reranker.model` and MaxSim over `index.dense.model`'s
    token vectors, `reranker.weights`), its margins put on the spread of `base`'s logits over the same pairs
    (the teacher's own cross-encoder logits when `base` is that model)."""
    import numpy as np

    from app.training.common import pairs_of
    from app.training.reranker import group_scores, load_cross_encoder
    from app.training.teacher import Teacher, margins_on_scale, z
    from indexer.encoders import load_encoder

    second = settings.reranker
    judge = Teacher.from_settings(second, load_encoder(settings.index.dense.model, device), device)
    typer.echo(f"teacher: {judge.describe()}")
    raw = judge.stage_scores(pairs_of(groups))
    if "cross_encoder" in raw and base == second.model and max_length == second.max_length:
        student = raw["cross_encoder"]
    else:
        model = load_cross_encoder(base, max_length, device)
        model.eval()
        student = np.concatenate(group_scores(model, groups))
    return margins_on_scale(groups, z(judge.fuse(raw)), student)


@reranker_app.command("export")
def reranker_export(
    source: Path = typer.Argument(..., help="a saved CrossEncoder folder"),
    dest: Path = typer.Argument(..., help="where to write the copy (may equal SOURCE)"),
    fp16: bool = typer.Option(True, "--fp16/--fp32", help="store the weights in half precision"),
) -> None:
    """Copy a trained CrossEncoder (without training checkpoints), optionally in fp16 — the form shipped in
    models/."""
    import shutil

    from app.training.reranker import save_half_precision

    if not (source / "model.safetensors").exists():
        typer.echo(
            f"error: {source}/model.safetensors not found; pass the folder `sift reranker train` wrote", err=True
        )
        raise typer.Exit(2)
    if source.resolve() != dest.resolve():
        shutil.copytree(source, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint*"))
    size = save_half_precision(dest) if fp16 else (dest / "model.safetensors").stat().st_size
    typer.echo(f"wrote {dest} (model.safetensors {size / 1e6:.1f} MB)")


@reranker_app.command("choose")
def reranker_choose(
    index: Path = typer.Option(..., "--index", "-i", help="index folder (its current build) to choose for"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (the reranker to choose with)"),
    queries: int = typer.Option(500, min=1, help="pseudo-queries cut from the collection's documents"),
    seed: int = typer.Option(13, help="which documents give the pseudo-queries"),
    step: float = typer.Option(0.05, min=0.01, max=0.5, help="weight grid step (coarser: faster, less exact)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the choice, record nothing"),
) -> None:
    """Choose this collection's second stage without labels, and record it in its manifest.

    Sentences cut out of the collection's own documents are the queries (each must find the document it was
    cut from); a scratch copy of the build re-encodes only those documents. The cross-encoder and MaxSim score
    every query's hybrid top 100 once; depth (up to reranker.depth) and fusion weights are then chosen on
    MRR@10 (the first stage's candidates: hybrid, top 100). The collection's best replaces the configured
    default only when it beats it on those queries by a paired bootstrap (p < 0.05); a stage that adds
    nothing there is then weighed 0. When nothing beats the first stage alone, reranking is off by default
    there (a request may still ask). The choice is published as a new build (the same files, hard-linked,
    and the manifest's `second_stage`), which a running server reloads; updates keep it, a full rebuild does
    not. Run it again after the collection changes a lot; reranker.per_collection=false ignores it."""
    from app.settings import load_settings
    from app.training.second_stage import choose_for_collection
    from indexer.build import annotate_bundle
    from indexer.bundle import BundleError

    setup_logging("warning")
    settings = load_settings(config)
    try:
        record = choose_for_collection(index, settings, queries=queries, seed=seed, step=step)
    except (ValueError, BundleError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    metric = record["metric"]
    typer.echo(f"{record['queries']} pseudo-queries from build {record['build']}, {metric}:")
    typer.echo(f"  first stage (hybrid)     {record['hybrid']:.4f}")
    if "global_default" in record:
        rs = settings.reranker
        typer.echo(f"  configured default       {record['global_default']:.4f}  (depth {rs.depth}, {rs.weights})")
    best = f"depth {record['best_depth']}, {record['best_weights']}"
    typer.echo(f"  best for the collection  {record['best']:.4f}  ({best})")
    served = "first stage only" if not record["rerank"] else f"depth {record['depth']}, {record['weights']}"
    typer.echo(f"  served by default        {record['chosen']:.4f}  ({served})")
    if record["decision"] == "off":
        typer.echo("no second stage beats the first stage here: reranking is off by default for this collection")
    elif record["decision"] == "configured":
        typer.echo(
            f"the collection's best does not beat the configured default significantly (paired bootstrap p = "
            f"{record['p_value']:.3f} ≥ 0.05): the configured depth and weights stay"
        )
    else:
        how = "" if record["p_value"] is None else f" (paired bootstrap p = {record['p_value']:.3f})"
        typer.echo(f"served for this collection: its best{how}")
        off = sorted({"cross_encoder", "maxsim"} - set(record["stages"]))
        if off:
            typer.echo(f"weighed 0 for this collection (it moves no hit): {', '.join(off)}")
    if dry_run:
        typer.echo("--dry-run: nothing recorded")
        return
    try:
        result = annotate_bundle(index, "second_stage", record, expected=record["build"])
    except (BundleError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"recorded in build {result.build_id} ({result.path}); `current` points to it")


encoder_app = typer.Typer(help="Adapt the bi-encoder (dense retrieval, MaxSim) to a corpus.", no_args_is_help=True)
app.add_typer(encoder_app, name="encoder")


@encoder_app.command("train")
def encoder_train(
    pseudo: list[Path] = typer.Option(
        [], help="corpus JSONL or bundle folder: label-free pseudo-queries and negatives from it (repeatable)"
    ),
    out: Path = typer.Option(Path("models/encoder"), "--out", "-o", help="where the best model is saved"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (base encoder, teacher stages)"),
    base: str | None = typer.Option(None, help="bi-encoder to start from (default: index.dense.model)"),
    beir: list[Path] = typer.Option([], help="BEIR folder(s) whose qrels/<split>.tsv add labelled pairs"),
    beir_split: str = typer.Option("train", help="qrels split for --beir (test is refused)"),
    squad: Path | None = typer.Option(None, help="SQuAD-format JSON for question/paragraph pairs"),
    squad_articles: str = typer.Option("0-23", help="article range of --squad (dev 24–47 is refused)"),
    pseudo_limit: int | None = typer.Option(None, help="at most this many pseudo-queries per corpus"),
    pseudo_per_doc: int = typer.Option(1, help="pseudo-queries (distinct sentences) per document"),
    hard_negatives: int = typer.Option(1, help="BM25-mined negatives per query (ranks 3–30)"),
    dense_negatives: int = typer.Option(1, help="bi-encoder-mined negatives per query (ranks 3–30)"),
    teacher: bool = typer.Option(
        True, "--teacher/--no-teacher", help="Margin-MSE on the second stage's margins (reranker.model + MaxSim)"
    ),
    margin_weight: float = typer.Option(1.0, help="weight of the teacher's margin term"),
    max_length: int = typer.Option(256, help="passage tokens (the build's window)"),
    epochs: int = typer.Option(1),
    batch_size: int = typer.Option(16, help="groups per step; every passage of the batch is a negative"),
    lr: float = typer.Option(2e-5, help="learning rate"),
    seed: int = typer.Option(13),
    validation: float = typer.Option(0.05, help="share of pseudo-queries held out for validation"),
    validation_pool: int = typer.Option(1000, help="passages each held-out query is ranked among"),
    validate_every: int = typer.Option(0, help="steps between validations (0: after each epoch)"),
    checkpoint_every: int = typer.Option(50, help="steps between resumable checkpoints"),
    max_minutes: float | None = typer.Option(None, help="time budget: stop there, keeping the best model"),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when present)"),
) -> None:
    """Adapt the bi-encoder to your corpus without labels: pseudo-queries cut from its passages, negatives
    mined by BM25 and the bi-encoder, Sift's second stage as the teacher (Margin-MSE), held-out pseudo-queries
    deciding which model is kept. Rerun the same command to resume. Then build with
    `SIFT_INDEX__DENSE__MODEL=<out> sift index build ...`: the manifest records the encoder."""
    import json
    import random

    from app.settings import load_settings
    from app.training.common import describe_sources
    from app.training.encoder import EncoderTrainConfig, score_groups, train_encoder
    from app.training.reranker import Mining, PassagePool, beir_groups, pseudo_query_groups, squad_groups
    from app.training.teacher import Teacher
    from indexer.encoders import load_encoder

    setup_logging("warning")
    if not (pseudo or beir or squad):
        typer.echo("error: no training data; pass --pseudo CORPUS (and optionally --beir / --squad)", err=True)
        raise typer.Exit(2)
    for path in [*pseudo, *beir, *([squad] if squad else [])]:
        if not path.exists():
            typer.echo(f"error: {path} does not exist", err=True)
            raise typer.Exit(2)
    settings = load_settings(config)
    base = base or settings.index.dense.model
    rng = random.Random(seed)
    encoder = load_encoder(base, device)
    mining = Mining(hard=hard_negatives, easy=0, dense=dense_negatives, encoder=encoder)
    pools: dict[str, PassagePool] = {}
    groups = []
    resuming = (out / "checkpoint" / "data.json").exists()  # a resumed run reuses its groups and margins
    if resuming:
        typer.echo(f"resuming the run in {out}/checkpoint (delete it to start afresh)")
    try:
        for folder in [] if resuming else beir:
            groups += beir_groups(folder, beir_split, mining, rng, pools)
        if squad is not None and not resuming:
            first, last = (int(x) for x in squad_articles.split("-"))
            groups += squad_groups(squad, range(first, last + 1), mining, rng, None)
        for corpus in [] if resuming else pseudo:
            groups += pseudo_query_groups(corpus, mining, rng, pseudo_limit, pseudo_per_doc, pools)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not groups and not resuming:
        typer.echo("error: no training groups (are the documents long enough to cut a sentence from?)", err=True)
        raise typer.Exit(2)
    if groups:
        typer.echo(describe_sources(groups))
    judge = Teacher.from_settings(settings.reranker, encoder, device) if teacher else None
    corpus_texts = [t for pool in pools.values() for t in pool.texts]
    train_config = EncoderTrainConfig(
        base=base,
        out=out,
        max_length=max_length,
        epochs=epochs,
        batch_size=batch_size,
        negatives=hard_negatives + dense_negatives,
        lr=lr,
        margin_weight=margin_weight if teacher else 0.0,
        seed=seed,
        validation=validation,
        validation_pool=validation_pool,
        validate_every=validate_every,
        checkpoint_every=checkpoint_every,
        max_seconds=max_minutes * 60 if max_minutes else None,
        device=device,
    )
    sources = {"pseudo": [str(p) for p in pseudo], "beir": [str(p) for p in beir], "squad": str(squad or "")}
    scored = [] if resuming else score_groups(groups, judge, encoder)
    report = train_encoder(
        scored, train_config, corpus_texts, judge.describe() if judge else None, sources=sources, model=encoder
    )
    history = report["history"]
    typer.echo(json.dumps({"history": history, "pairs_per_s": round(report["pairs_per_s"], 2)}, indent=1))
    best = max(history, key=lambda h: h["mrr@10"]) if history else None
    if best is not None and best["step"] == 0:
        typer.echo(f"no step beat the base model on the held-out pseudo-queries; {out} holds the base model")
    typer.echo(f"saved the best model to {out}; build with it: SIFT_INDEX__DENSE__MODEL={out} sift index build ...")


reader_app = typer.Typer(help="Train the extractive reader (span QA).", no_args_is_help=True)
app.add_typer(reader_app, name="reader")


@reader_app.command("train")
def reader_train(
    squad: Path = typer.Option(..., "--squad", help="SQuAD-format JSON (e.g. ../shared/data/squad/dev-v1.1.json)"),
    articles: str = typer.Option("0-23", help="article range to train on (SQuAD v1.1 dev 24–47 is refused)"),
    out: Path = typer.Option(Path("models/reader"), "--out", "-o", help="where the best model is saved"),
    base: str = typer.Option(
        "sentence-transformers/all-MiniLM-L6-v2", help="encoder checkpoint to start from (path or hub id)"
    ),
    max_length: int = typer.Option(384, help="tokens per (question, passage window)"),
    stride: int = typer.Option(128, help="tokens shared by consecutive windows of a long passage"),
    epochs: int = typer.Option(2),
    batch_size: int = typer.Option(16, help="windows per optimisation step"),
    lr: float = typer.Option(5e-5, help="peak learning rate (linear warm-up and decay)"),
    warmup: float = typer.Option(0.1, help="warm-up share of the steps"),
    seed: int = typer.Option(13),
    validation: float = typer.Option(0.05, help="share of paragraphs held out for validation EM/F1"),
    validate_every: int = typer.Option(0, help="steps between validations (0: after each epoch)"),
    checkpoint_every: int = typer.Option(200, help="steps between resumable checkpoints (rerun to resume)"),
    max_steps: int | None = typer.Option(None, help="stop after this many steps"),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when present)"),
    fp16: bool = typer.Option(True, "--fp16/--fp32", help="store the saved weights in half precision"),
) -> None:
    """Fine-tune a span-extraction head (start/end logits) on SQuAD-format data; validates EM/F1 on held-out
    paragraphs, keeps the best model and writes calibration.json (span score -> P(exact match))."""
    import json

    from app.training.reader import ReaderTrainConfig, load_examples, train

    setup_logging("warning")
    first, last = (int(x) for x in articles.split("-"))
    try:
        examples = load_examples(squad, range(first, last + 1))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    config = ReaderTrainConfig(
        base=base,
        out=out,
        max_length=max_length,
        stride=stride,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        seed=seed,
        validation=validation,
        validate_every=validate_every,
        checkpoint_every=checkpoint_every,
        max_steps=max_steps,
        device=device,
        fp16=fp16,
    )
    typer.echo(f"{len(examples)} questions from articles {articles}")
    state = train(examples, config)
    typer.echo(json.dumps({"best": state.get("best"), "seconds": round(state["seconds"], 1)}, indent=1))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
