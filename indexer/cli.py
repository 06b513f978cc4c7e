"""`sift index ...`: build and inspect bundles from the command line (a typer sub-app)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from indexer.build import BuildResult, GateRefused, build_bundle
from indexer.bundle import BundleError, list_builds, open_bundle, prune_builds
from indexer.commands import lower_to_idle
from indexer.config import PRIOR_SAMPLE, IndexConfig, config_path, load_index_config
from indexer.gate import make_gate
from indexer.sources import SourceError

app = typer.Typer(help="Build and inspect index bundles.", no_args_is_help=True)


@app.command("build")
def build(
    input: Path = typer.Option(
        ..., "--input", "-i", help="BEIR-style JSONL file, CSV/TSV file, or folder of .txt/.md/.html"
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="index folder; the build goes to OUT/<build-id>, OUT/current points at it"
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="YAML config whose `index:` section is used (default: $SIFT_CONFIG, else configs/default.yaml)",
    ),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip (and count) bad records instead of failing"),
    id_column: str | None = typer.Option(None, help="CSV column holding the document id"),
    title_column: str | None = typer.Option(None, help="CSV column holding the title"),
    text_column: str | None = typer.Option(None, help="CSV column holding the text"),
    no_dense: bool = typer.Option(False, "--no-dense", help="build BM25 only (no dual-encoder, no FAISS)"),
    tag: bool = typer.Option(
        False,
        "--tag",
        help="tag every passage with index.tagging's label sets (zero-shot, by a language model) into its metadata, "
        "where filters and facets use them; later updates keep tagging",
    ),
    progress: bool = typer.Option(True, help="show progress bars"),
    gate: Path | None = typer.Option(
        None, "--gate", help="BEIR dataset folder: publish only if nDCG@10 drops at most --max-drop"
    ),
    max_drop: float = typer.Option(0.01, "--max-drop", help="largest nDCG@10 drop the gate accepts"),
    shards: int = typer.Option(
        1, "--shards", min=1, help="write S shard bundles and a shard map (BM25 keeps corpus-wide statistics)"
    ),
    engine: str = typer.Option(
        "local", "--engine", help="who encodes passages: local (this process) or ray (a Ray Data actor pool)"
    ),
    address: str | None = typer.Option(
        None, "--address", help="--engine ray: cluster to join (auto, ray://host:10001); default: a local Ray"
    ),
    num_encoders: int = typer.Option(1, "--num-encoders", min=1, help="--engine ray: encoder actors"),
    gpus_per_encoder: float = typer.Option(0.0, "--gpus-per-encoder", min=0.0, help="--engine ray: GPUs per actor"),
) -> None:
    """Read documents, split them into passages and publish a new bundle atomically. With --gate, the new
    build is scored on the dataset's qrels (`sift eval retrieval`) before it becomes current, and refused
    (exit 3, the published build kept) if it scores more than --max-drop below the published one.
    With --engine ray, passages are encoded by a Ray Data actor pool (install `sift[ray]`); everything else
    (reading, chunking, the docstore, BM25, publishing) is the same as a local build."""
    cfg = _read_config(config, id_column, title_column, text_column)
    if no_dense:
        cfg.dense.enabled = False
    if tag:
        cfg.tagging.enabled = True
    runner = encoding_engine(engine, address, num_encoders, gpus_per_encoder)
    gate_fn = make_gate(gate, max_drop, config, echo=lambda m: typer.echo(m, err=True)) if gate else None
    _publish_job(
        lambda: build_bundle(
            input, out, cfg, skip_bad=skip_bad, show_progress=progress, gate=gate_fn, shards=shards, engine=runner
        )
    )


def _read_config(
    config: Path | None, id_column: str | None, title_column: str | None, text_column: str | None
) -> IndexConfig:
    """The `index:` section of the config (exit 2 with the reason when it cannot be read), with the CSV column
    options given on the command line over it."""
    try:
        cfg = load_index_config(config)
    except Exception as exc:  # noqa: BLE001 - pydantic / YAML errors alike
        typer.echo(f"error: config {config}: {exc}", err=True)
        raise typer.Exit(2) from exc
    for name, value in (("id_column", id_column), ("title_column", title_column), ("text_column", text_column)):
        if value:
            setattr(cfg.csv, name, value)
    return cfg


def encoding_engine(engine: str, address: str | None, encoders: int, gpus_per_encoder: float) -> Any:  # noqa: ANN401
    """The `--engine` of a build or an update: None (this process) or a Ray Data encoding engine."""
    if engine not in ("local", "ray"):
        typer.echo(f"error: --engine must be local or ray, not {engine!r}", err=True)
        raise typer.Exit(2)
    if engine == "local":
        return None
    try:
        from indexer.ray_engine import RayEncoding
    except ImportError as exc:
        typer.echo(f"error: --engine ray needs Ray: pip install 'sift[ray]' ({exc})", err=True)
        raise typer.Exit(2) from exc
    return RayEncoding(address=address, encoders=encoders, gpus_per_encoder=gpus_per_encoder)


@app.command("reshard")
def reshard(
    source: Path = typer.Option(..., "--from", help="unsharded bundle (or index folder with `current`) to split"),
    out: Path = typer.Option(..., "--out", "-o", help="index folder for the sharded build"),
    shards: int = typer.Option(..., "--shards", min=2, help="number of shards"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Split a published build into S shards without re-encoding (vectors and token vectors are copied;
    BM25 is rescored per shard with corpus-wide statistics). Published atomically under OUT."""
    from indexer.build import reshard_bundle

    _publish_job(lambda: reshard_bundle(source, out, shards, show_progress=progress), "resharded:")


@app.command("convert")
def convert(
    source: Path = typer.Option(..., "--from", help="unsharded bundle (or index folder with `current`) to convert"),
    out: Path = typer.Option(..., "--out", "-o", help="index folder for the converted build (may be the source's)"),
    token_vectors: str = typer.Option(
        "pq", "--token-vectors", help="the new token-vector form: pq (product quantisation), int8 or float16"
    ),
    pq_m: int = typer.Option(32, "--pq-m", min=1, help="pq: sub-spaces, i.e. bytes per token (divides the dimension)"),
    rotate: bool = typer.Option(True, "--rotate/--no-rotate", help="pq: learn an OPQ rotation first"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Re-encode a build's stored token vectors into another form without running the model (e.g. int8 → pq:
    about 12× smaller with the default --pq-m 32); everything else is copied. Published atomically under OUT;
    the new build records the form, so `sift index update` keeps it."""
    from indexer.build import convert_tokens
    from indexer.tokens import DTYPES, TokenForm

    if token_vectors not in DTYPES:
        typer.echo(f"error: --token-vectors must be one of {', '.join(DTYPES)}, not {token_vectors!r}", err=True)
        raise typer.Exit(2)
    form = TokenForm(token_vectors, pq_m, rotate=rotate)  # type: ignore[arg-type]
    _publish_job(lambda: convert_tokens(source, out, form, show_progress=progress), "converted:")


def _publish_job(job: Callable[[], BuildResult], verb: str = "built") -> None:
    """Run a build or update and report it: exit 3 when the quality gate refuses, 1 on bad input."""
    try:
        result = job()
    except GateRefused as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(3) from exc
    except (SourceError, BundleError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    for reason in result.skipped:
        typer.echo(f"skipped: {reason}", err=True)
    typer.echo(result.summary().replace("built", verb, 1))


@app.command("update")
def update(
    out: Path = typer.Option(..., "--out", "-o", help="index folder whose current build is updated"),
    add: Path | None = typer.Option(
        None, "--add", help="new or changed documents (JSONL, CSV/TSV or folder; an existing id is replaced)"
    ),
    delete: Path | None = typer.Option(None, "--delete", help="file of document ids to delete, one per line"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip (and count) bad records instead of failing"),
    progress: bool = typer.Option(True, help="show progress bars"),
    gate: Path | None = typer.Option(
        None, "--gate", help="BEIR dataset folder: publish only if nDCG@10 drops at most --max-drop"
    ),
    max_drop: float = typer.Option(0.01, "--max-drop", help="largest nDCG@10 drop the gate accepts"),
    config: Path | None = typer.Option(None, "--config", "-c", help="config for the gate's evaluation"),
    engine: str = typer.Option(
        "local", "--engine", help="who encodes the added passages: local (this process) or ray (Ray Data actors)"
    ),
    address: str | None = typer.Option(
        None, "--address", help="--engine ray: cluster to join (auto, ray://host:10001); default: a local Ray"
    ),
    num_encoders: int = typer.Option(1, "--num-encoders", min=1, help="--engine ray: encoder actors"),
    gpus_per_encoder: float = typer.Option(0.0, "--gpus-per-encoder", min=0.0, help="--engine ray: GPUs per actor"),
) -> None:
    """Write a new build from the current one: unchanged documents keep their stored passages and vectors,
    only added or changed ones are encoded (by --engine, as a build's), BM25 is rebuilt over the whole corpus;
    the manifest records the parent build. Published atomically (and gated) like a build."""
    from indexer.update import update_bundle

    runner = encoding_engine(engine, address, num_encoders, gpus_per_encoder)
    gate_fn = make_gate(gate, max_drop, config, echo=lambda m: typer.echo(m, err=True)) if gate else None
    _publish_job(
        lambda: update_bundle(out, add, delete, skip_bad=skip_bad, show_progress=progress, gate=gate_fn, engine=runner),
        "updated:",
    )


@app.command("apply-ingest")
def apply_ingest(
    out: Path = typer.Option(..., "--out", "-o", help="index folder whose ingest log is applied"),
    max_documents: int | None = typer.Option(
        None, "--max-documents", min=1, help="apply whole batches up to this many items (default: all pending)"
    ),
    serve: bool = typer.Option(
        False,
        "--serve",
        help="stay up with the model loaded: apply once per `apply` line on stdin, answer one JSON line on stdout "
        "(how the server runs it); exit at end of input",
    ),
    nice: int = typer.Option(0, "--nice", min=0, max=19, help="--serve: raise this process's niceness by this"),
    idle: bool = typer.Option(
        False,
        "--idle",
        help="--serve: run under Linux's SCHED_IDLE policy (a core only when no other thread wants it); where it is "
        "unavailable, only --nice applies",
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="--serve: threads to encode with"),
    progress: bool = typer.Option(False, help="show progress bars"),
) -> None:
    """Apply the documents and deletions accepted over HTTP (`POST /v1/collections/NAME/documents`) and not yet
    in the current build, as one update published atomically. The server runs this itself (`ingest` settings);
    run it by hand to drain the log of a folder no server applies. Exit 0 with "nothing pending" when the
    current build holds every accepted batch."""
    from indexer.pipeline import LocalEncoding
    from indexer.update import apply_ingest as apply

    engine = LocalEncoding(keep=serve, threads=threads)

    def once() -> dict[str, Any]:
        try:
            result = apply(out, max_documents, show_progress=progress, engine=engine)
        except (SourceError, BundleError, ValueError, RuntimeError, OSError) as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if result is None:
            return {"ok": True, "applied": False, "summary": "nothing pending"}
        return {"ok": True, "applied": True, "summary": result.summary().replace("built", "applied:", 1)}

    if not serve:
        outcome = once()
        if not outcome["ok"]:
            typer.echo(f"error: {outcome['error']}", err=True)
            raise typer.Exit(1)
        typer.echo(outcome["summary"])
        return
    protocol, sys.stdout = sys.stdout, sys.stderr  # only answers on stdout: anything printed goes to stderr
    if nice:
        os.nice(nice)
    if idle:
        lower_to_idle()
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:  # warm: the current build's bi-encoder, before the first batch arrives
        from indexer.config import recorded_config

        manifest = open_bundle(out, verify=False).manifest
        if (manifest.get("dense") or {}).get("enabled"):
            engine.start(recorded_config(manifest))
    except (BundleError, OSError, ValueError) as exc:
        typer.echo(f"not warmed up: {exc}", err=True)
    for line in sys.stdin:
        if line.strip() != "apply":
            outcome = {"ok": False, "error": f"unknown request {line.strip()[:40]!r}; send `apply`"}
        else:
            outcome = once()
        protocol.write(json.dumps(outcome) + "\n")
        protocol.flush()


@app.command("verify")
def verify(bundle: Path = typer.Argument(..., help="bundle folder or index folder with `current`")) -> None:
    """Check a bundle's manifest and every file's sha256."""
    try:
        info = open_bundle(bundle, verify=True)
    except BundleError as exc:
        typer.echo(f"damaged: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"ok: {info.root} ({info.manifest['counts']['passages']} passages, {len(info.manifest['files'])} files)")


@app.command("info")
def info(bundle: Path = typer.Argument(..., help="bundle folder or index folder with `current`")) -> None:
    """Print a bundle's manifest (without file checksums) and the builds beside it."""
    try:
        data = open_bundle(bundle, verify=False)
    except BundleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    manifest = {k: v for k, v in data.manifest.items() if k != "files"}
    json.dump({"path": str(data.root), **manifest, "builds": list_builds(data.root.parent)}, sys.stdout, indent=2)
    sys.stdout.write("\n")


@app.command("prior")
def prior(
    input: Path = typer.Option(
        ..., "--input", "-i", help="the corpus the label sets will tag (JSONL, CSV/TSV or folder, as for build)"
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML config whose index.tagging label sets are measured (default as build)"
    ),
    label_set: list[str] = typer.Option(
        [], "--label-set", "-l", help="a configured label set to measure (repeatable; default: every one)"
    ),
    sample: int = typer.Option(PRIOR_SAMPLE, "--sample", min=2, max=100_000, help="passages drawn from the corpus"),
    strength: float | None = typer.Option(
        None, "--strength", min=0.0, max=1.0, help="prior_strength to write (default: each set's configured one)"
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the sample"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip (and count) bad records instead of failing"),
    id_column: str | None = typer.Option(None, help="CSV column holding the document id"),
    title_column: str | None = typer.Option(None, help="CSV column holding the title"),
    text_column: str | None = typer.Option(None, help="CSV column holding the text"),
    progress: bool = typer.Option(True, help="show progress bars"),
    out: Path | None = typer.Option(None, "--out", "-o", help="write the config here (default: standard output)"),
) -> None:
    """Measure label priors on your corpus, without labels (batch calibration): each label's mean probability
    over a uniform sample of the corpus's passages. Writes the config it read (its comments are not kept) with
    each measured label set's `prior` in place. Build with it (`sift index build --config OUT --tag`): each
    label's probability is divided by its prior, so a label the model favours on every passage stops winning
    everywhere; updates of that build keep its config, and a server started with it (SIFT_CONFIG) labels
    `/v1/classify` texts alike."""
    import yaml

    from indexer.sources import ReadReport
    from indexer.tagging import LabelSetError, Tagger, sample_passages

    cfg = _read_config(config, id_column, title_column, text_column)
    source = config_path(config)  # found: _read_config read it
    sets = cfg.tagging.label_sets
    if not sets:
        typer.echo(f"error: {source} configures no label sets (index.tagging.label_sets): nothing to measure", err=True)
        raise typer.Exit(2)
    unknown = [name for name in label_set if name not in sets]
    if unknown:
        typer.echo(
            f"error: no label set {unknown[0]!r} in index.tagging.label_sets (have: {', '.join(sets)})", err=True
        )
        raise typer.Exit(2)
    if out is not None and not out.parent.is_dir():
        typer.echo(f"error: --out {out}: folder {out.parent} does not exist; create it first", err=True)
        raise typer.Exit(2)
    chosen = {name: sets[name] for name in (label_set or list(sets))}
    report = ReadReport()
    try:
        texts = sample_passages(input, cfg, sample, seed, skip_bad, progress, report)
        tagger = Tagger.load(cfg.tagging)
    except SourceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except (OSError, ValueError, ImportError) as exc:
        typer.echo(f"error: a model did not load ({exc}); check index.tagging.model and index.dense.model", err=True)
        raise typer.Exit(1) from exc
    if report.skipped:
        typer.echo(f"skipped {len(report.skipped)} bad record(s); the first: {report.skipped[0]}", err=True)
    if len(texts) < 2:
        typer.echo(f"error: {input}: {len(texts)} passage(s); a prior needs at least 2", err=True)
        raise typer.Exit(1)
    measured = {}
    for name, label_set_ in chosen.items():
        try:
            found = tagger.estimate_prior(texts, label_set_, progress=progress)
        except LabelSetError as exc:
            typer.echo(f"error: label set {name!r}: {exc}", err=True)
            raise typer.Exit(2) from exc
        update = {"prior": found, "prior_strength": label_set_.prior_strength if strength is None else strength}
        measured[name] = label_set_.model_validate({**label_set_.model_dump(), **update})
        top = sorted(found.items(), key=lambda item: -item[1])[:3]
        typer.echo(
            f"{name}: measured on {len(texts)} passages; most favoured "
            + ", ".join(f"{label} {p:.3f}" for label, p in top)
            + f" (even: {1 / len(found):.3f})",
            err=True,
        )
    whole = yaml.safe_load(source.read_text()) or {}  # the config read, with the measured sets in place
    tagging = whole.setdefault("index", {}).setdefault("tagging", {})
    tagging["label_sets"] = {
        **{n: s.model_dump(mode="json") for n, s in sets.items()},
        **{n: s.model_dump(mode="json") for n, s in measured.items()},
    }
    text = f"# {source} with label priors measured on {input} by `sift index prior`\n" + yaml.safe_dump(
        whole, sort_keys=False, allow_unicode=True
    )
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}: build with it (sift index build --config {out} --tag ...)", err=True)


@app.command("prune")
def prune(
    out: Path = typer.Option(..., "--out", "-o", help="index folder holding the builds and `current`"),
    keep: int = typer.Option(3, "--keep", min=1, help="newest published builds to keep"),
) -> None:
    """Delete all but the newest KEEP builds. The build `current` points at, and any build a running server
    holds open, are never deleted (the same rule a build applies on publish with index.keep_builds)."""
    try:
        deleted, in_use = prune_builds(out, keep)
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    for build_id in deleted:
        typer.echo(f"deleted {build_id}")
    for build_id in in_use:
        typer.echo(f"kept {build_id}: in use by a running server")
    typer.echo(f"{len(deleted)} deleted, {len(list_builds(out))} kept")
