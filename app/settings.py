"""The one settings model: `configs/default.yaml` (or `--config FILE` / `SIFT_CONFIG`) plus `SIFT_*`
environment overrides, nested with `__` (e.g. `SIFT_RERANKER__MODEL=/models/ce`, `SIFT_SEARCH__MAX_K=200`).

`Settings` extends `indexer.config.SiftSettings` (the `index:` section and the search mode the indexer reads)
and is loaded by the same `indexer.config.load_config`, so the server, `sift index` and the quality gate read
one file and one environment the same way. Every code default equals `configs/default.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from indexer.config import (
    DEFAULT_CONFIG,
    PROJECT_ROOT,
    IndexConfig,
    Runtime,
    SearchModeSettings,
    SiftSettings,
    load_config,
)
from indexer.lm import default_cache_dir

__all__ = ["DEFAULT_CONFIG", "PROJECT_ROOT", "Settings", "load_settings", "project_path"]


def project_path(value: str | Path) -> str | Path:
    """A relative path that does not exist from the working directory but does inside the project
    (`configs/prompts/...`, `models/...`) is taken as the project's; anything else is returned unchanged."""
    path = Path(value)
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        return PROJECT_ROOT / path
    return value


class SearchSettings(SearchModeSettings):
    """`default_mode` (from `indexer.config.SearchModeSettings`, which the quality gate reads) and the API's
    limits."""

    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    default_candidates: int = Field(100, ge=1)
    max_candidates: int = Field(1000, ge=1)
    max_query_chars: int = Field(2000, ge=1)
    max_batch_queries: int = Field(1000, ge=1)
    max_batch_work: int = Field(
        400_000, ge=1, description="most queries × candidates × retrievers in one /v1/search/batch request"
    )
    snippet_chars: int = Field(240, ge=40)
    max_facets: int = Field(10, ge=0, description="metadata fields one search may count (`facets`)")


class ClassifySettings(BaseModel):
    """`POST /v1/classify`: zero-shot labels for texts by `index.tagging`'s model (loaded on the first call)."""

    enabled: bool = Field(True, description="serve /v1/classify (404 when false)")
    max_texts: int = Field(32, ge=1, description="texts per request (413 above)")
    max_text_chars: int = Field(4000, ge=1, description="longest text (413 above)")
    max_labels: int = Field(100, ge=2, description="labels of an inline label set (413 above)")
    max_words: int = Field(20, ge=1, description="verbalizer words per label (413 above)")
    timeout_s: float = Field(60.0, gt=0, description="longest a classification may wait and run (503 past it)")
    max_queued: int = Field(4, ge=1, description="classifications running or waiting at once (429 above)")


class EmbeddingsSettings(BaseModel):
    """Limits of `/v1/embeddings` (OpenAI shape)."""

    max_inputs: int = Field(256, ge=1, description="most texts per request")
    max_input_chars: int = Field(8192, ge=1, description="longest text accepted (characters)")


class FusionSettings(BaseModel):
    method: Literal["rrf", "weighted"] = "rrf"
    rrf_k: int = Field(60, ge=1)
    weights: dict[str, float] = Field(default_factory=lambda: {"bm25": 0.5, "dense": 0.5})


class RerankerSettings(BaseModel):
    model: str | None = Field(
        "models/sift-reranker-minilm-l6",
        validate_default=True,
        description="CrossEncoder path or hub id, or `maxsim[:bi-encoder]` (training-free); null disables reranking",
    )
    max_length: int = Field(128, ge=8, description="tokens per (query, passage) pair; longer passages are truncated")
    depth: int = Field(12, ge=1, description="default number of fused candidates reranked")
    max_depth: int = Field(200, ge=1)
    latency_budget_ms: float | None = Field(
        200,
        ge=0,
        description="the default depth is capped at the deepest `depth` whose whole in-process search (first stage + "
        "second stage) fits this many ms, measured on this machine when a build loads "
        "(app.retrieval.calibration); null or 0: no calibration, the default depth is `depth`",
    )
    max_batch_size: int = Field(64, ge=1, description="pairs per micro-batch across concurrent requests")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a micro-batch waits to fill")
    max_queued_pairs: int = Field(
        4096,
        ge=1,
        description="most pairs waiting to be reranked; requests beyond it get 429 (never a queue without end)",
    )
    timeout_ms: float = Field(30000, gt=0, description="budget after which the fused order is returned")
    interpolation: float = Field(
        1.0, ge=0, le=1, description="final = w·z(reranker) + (1-w)·z(first stage); 1.0 = reranker only"
    )
    maxsim: bool = Field(
        True,
        description="add MaxSim (late interaction over the bundle's bi-encoder token vectors, stored at build time "
        "with index.dense.token_vectors, else re-encoded) to the second stage, fused with `weights`; only with a "
        "`model` (null turns the whole second stage off; `model: maxsim` + `maxsim: true` is MaxSim alone)",
    )
    weights: dict[str, float] | None = Field(
        default_factory=lambda: {"first_stage": 0.25, "cross_encoder": 0.45, "maxsim": 0.3},
        description="z-score fusion weights of the second stage: first_stage, cross_encoder, maxsim (a missing key "
        "weighs 0); null: from `interpolation` (split evenly between cross_encoder and maxsim when both run)",
    )
    device: str | None = None
    per_collection: bool = Field(
        True,
        description="serve the second stage chosen for a collection by `sift reranker choose` (its build's manifest: "
        "depth, weights, stages turned down) in place of `depth` and `weights`, when it was chosen with this "
        "reranker and the stages it uses run here; false: every collection gets the configured ones",
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        unknown = set(value) - {"first_stage", "cross_encoder", "maxsim"}
        if unknown:
            raise ValueError(f"unknown second-stage weights {sorted(unknown)}; use first_stage, cross_encoder, maxsim")
        if any(w < 0 for w in value.values()) or not any(w > 0 for w in value.values()):
            raise ValueError("second-stage weights must be ≥ 0, at least one > 0")
        return value

    def stage_weights(self, cross_encoder: bool, maxsim: bool) -> dict[str, float]:
        """The fusion weights for the stages that run (0 for a stage that does not)."""
        if self.weights is not None:
            w = {"first_stage": 0.0, "cross_encoder": 0.0, "maxsim": 0.0, **self.weights}
        else:
            i = self.interpolation
            share = i / 2 if cross_encoder and maxsim else i
            w = {"first_stage": 1 - i, "cross_encoder": share, "maxsim": share}
        if not cross_encoder:
            w["cross_encoder"] = 0.0
        if not maxsim:
            w["maxsim"] = 0.0
        return w

    @field_validator("model")
    @classmethod
    def _model_path(cls, value: str | None) -> str | None:
        """`models/...` means the folder shipped with Sift, whatever the working directory; "" or "none"
        (handy in environment variables) turns reranking off."""
        if value is not None and value.strip().lower() in ("", "none", "null"):
            return None
        return str(project_path(value)) if value else value


class GroundingSettings(BaseModel):
    """Decoding-time control of the local generator: logits processors that keep a generated answer to the
    passages it was given (an OpenAI-compatible server decodes remotely, so these do not apply to it)."""

    passage_bias: float = Field(
        0.0, ge=0.0, le=20.0, description="logit bonus for tokens that occur in the answer's passages (0: off)"
    )
    no_repeat_ngram: int = Field(0, ge=0, le=10, description="never repeat an n-gram of this size (0: off)")
    block_instruction_ngrams: int = Field(
        0,
        ge=0,
        le=10,
        description="never write an n-gram of this size from the prompt's instructions that the passages lack (0: off)",
    )
    block_question_ngrams: int = Field(
        0, ge=0, le=10, description="never write an n-gram of the question (restating it; 0: off), for short answers"
    )
    block_citation_markers: bool = Field(
        False, description="never write `[` (citation markers): for short answers scored as text, not for chat"
    )
    stop_at: list[str] = Field(
        default_factory=list,
        description="stop sequences added to every generation, e.g. a newline for one-line answers",
    )
    copy_spans: bool = Field(
        False,
        description="write only a phrase copied from the answer's passages, ending anywhere (short answers, not chat)",
    )


class GeneratorSettings(BaseModel):
    backend: Literal["local", "openai", "none"] = Field(
        "local", description="local model, OpenAI-compatible server, or none"
    )
    model: str = Field(
        "smollm2",
        description="`smollm2` (bundled SmolLM2-135M-Instruct), a local path or hub id, or the remote model name",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="where the dequantised SmolLM2 copy is kept (a user cache: an installed package's own folder "
        "is not writable)",
    )
    device: str | None = None
    base_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://localhost:8001/v1")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    timeout_s: float = Field(60.0, gt=0, description="per connect/read of a remote generator")
    deadline_s: float = Field(120.0, gt=0, description="total time a remote generation may take, retries included")
    max_retries: int = Field(2, ge=0, le=10)
    backoff_s: float = Field(0.5, ge=0)
    context_window: int = Field(8192, ge=256, description="context size of a remote model (tokens)")
    grounding: GroundingSettings = GroundingSettings()


class AnswerSettings(BaseModel):
    mode: Literal["generative", "extractive", "extract-then-generate"] = Field(
        "extractive",
        description="generative: the generator writes the answer; extractive: the reader returns the best exact "
        "span of a passage; extract-then-generate: the generator rewrites the span with its sentence as context",
    )
    reader: str | None = Field(
        "models/sift-reader-minilm-l6",
        validate_default=True,
        description="extractive reader (span-QA model folder or hub id), used by the extractive modes",
    )
    extractive_text: Literal["sentence", "span"] = Field(
        "sentence",
        description="extractive mode's answer text: the sentence holding the reader's span (reads as an answer "
        "in a chat), or the bare span; the response's `span` and the citation's offsets are the exact span",
    )
    min_reader_confidence: float | None = Field(
        0.42,
        ge=0,
        le=1,
        description="decline when the reader's calibrated span confidence is below this (0.42 was chosen on "
        "validation data: bench/reader_threshold.py)",
    )
    template: Path = Field(
        Path("configs/prompts/answer.yaml"), validate_default=True, description="prompt template file"
    )
    passages: int = Field(3, ge=1, description="most passages put into the prompt")
    max_passages: int = Field(20, ge=1, description="most passages a request may ask for")
    context_budget: int = Field(1536, ge=128, description="prompt tokens available for passages")
    max_new_tokens: int = Field(96, ge=1, description="default tokens generated per answer")
    max_tokens_limit: int = Field(2048, ge=1, description="most tokens a request may ask to generate")
    max_question_tokens: int = Field(
        1024, ge=1, description="most prompt tokens from the caller: the question, or a chat's user and system text"
    )
    min_rerank_score: float | None = Field(
        0.0, description="best passage must reach this reranker score (when reranking)"
    )
    min_dense_score: float | None = Field(0.3, description="else best passage must reach this dense cosine score")

    @field_validator("template")
    @classmethod
    def _template_path(cls, value: Path) -> Path:
        return Path(project_path(value))

    @field_validator("reader")
    @classmethod
    def _reader_path(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() in ("", "none", "null"):
            return None
        return str(project_path(value)) if value else value


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_body_bytes: int = Field(1_000_000, ge=1024)
    log_level: str = "info"
    reload_interval_s: float = Field(
        2.0, gt=0, description="how often each collection's `current` is checked for a newly published build"
    )
    api_keys: list[str] = Field(default_factory=list, description="keys of the search scope (Bearer tokens)")
    admin_keys: list[str] = Field(default_factory=list, description="keys of the admin scope (search included)")
    api_key_file: Path | None = Field(None, description="file of `search KEY` / `admin KEY` lines")
    allow_anonymous: bool = Field(
        False, description="serve without keys on a non-loopback address (otherwise `sift serve` refuses)"
    )
    rate_limit_per_s: float | None = Field(
        None, gt=0, description="requests per second per key (per client address when anonymous); null: none"
    )
    rate_limit_burst: int = Field(20, ge=1, description="requests a key may send at once above the steady rate")
    malloc_arena_max: int | None = Field(
        2,
        ge=1,
        description="cap glibc's per-thread heap arenas in `sift serve` (as MALLOC_ARENA_MAX): with many threads "
        "running native code, more arenas mean steady RSS growth from fragmentation; null leaves glibc's default",
    )
    max_concurrent_generations: int = Field(
        4, ge=1, description="answers/chats generating at once; more get 429 at once (generation has its own threads)"
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="threads of the one pool that runs retrieval, fetching and encoding off the event loop; "
        "null: one per core (bench/search_latency.py --threads compares)",
    )


class IngestSettings(BaseModel):
    """Documents in over HTTP (`POST /v1/collections/NAME/documents`, `.../documents/delete`): each accepted
    batch is appended to the collection's ingest log and fsynced before the 202 (`indexer.ingest`); one applier
    per index folder (a flock, whichever worker or replica holds it) folds the pending batches into one
    incremental update (`sift index apply-ingest`, a child process), publishes it, and the server reloads."""

    enabled: bool = Field(True, description="accept documents over HTTP (admin scope); false: 404 on those routes")
    max_body_bytes: int = Field(
        16_000_000, ge=1024, description="largest ingest request body (413 above; other routes: server.max_body_bytes)"
    )
    max_documents_per_batch: int = Field(1000, ge=1, description="documents or ids in one request (413 above)")
    max_backlog_documents: int = Field(
        100_000, ge=1, description="documents and ids accepted but not yet applied; 429 with Retry-After above"
    )
    apply_interval_s: float = Field(
        1.0, gt=0, description="how long the applier gathers batches before one update (time-to-searchable floor)"
    )
    apply_max_documents: int = Field(20_000, ge=1, description="documents and ids folded into one update at most")
    apply_timeout_s: float = Field(1800.0, gt=0, description="an update that runs longer is stopped and retried")
    wait_timeout_s: float = Field(
        120.0, gt=0, description="`wait=true`: the longest a request waits to be searchable (then 202, not visible)"
    )
    applier_sched_idle: bool = Field(
        True,
        description="the applier child runs under Linux's SCHED_IDLE: it gets a core only when no search wants "
        "one (bench/ingest.py: search p99 while ingesting); false, or where unavailable: `applier_nice` alone",
    )
    applier_nice: int = Field(
        10, ge=0, le=19, description="the applier child's niceness: searches keep the cores while it encodes"
    )
    applier_threads: int = Field(1, ge=1, description="threads the applier child encodes with")
    applier_idle_s: float = Field(
        300.0, gt=0, description="the applier child (and its bi-encoder) is stopped after this long without work"
    )


class RuntimeSettings(BaseModel):
    """How each model runs at serving time (see `indexer.runtime`). Passages are encoded at build time with
    `index.dense.runtime`, recorded in the manifest. Every non-torch runtime is exported once, cached, and
    verified against torch float32 when loaded (refused below cosine 0.99). On CUDA, every runtime but torch
    means torch fp16; torch-bf16 needs a CPU with native bfloat16 (AVX512-BF16/AMX), else it runs as torch."""

    queries: Runtime = Field("onnx", description="bi-encoder at query time: dense search, embeddings, MaxSim")
    reranker: Runtime = Field("torch-bf16", description="cross-encoder")
    reader: Runtime = Field("torch", description="extractive reader")
    cache_dir: Path | None = Field(
        None, description="exports cache; null: $SIFT_RUNTIME_CACHE or ~/.cache/sift/runtimes"
    )
    threads: int | None = Field(
        None, ge=1, description="intra-op threads of every model call (torch and ONNX Runtime); null: one per core"
    )
    query_cache_size: int = Field(4096, ge=0, description="query embeddings kept (LRU by model and text); 0: off")
    spin_wait: bool = Field(
        False,
        description="ONNX Runtime's intra-op threads busy-wait between runs (its default); off in a server, where "
        "a spinning thread holds a core the cross-encoder needs: a default reranked query ~25 ms faster on 2 cores, "
        "a query without rerank ~1 ms slower at concurrency 1 (app.threads.share_cores)",
    )
    blas_threads: int | None = Field(
        1,
        ge=1,
        description="numpy's BLAS threads in a server (MaxSim's small products; idle OpenBLAS threads spin); "
        "null: numpy's default",
    )


class TracingSettings(BaseModel):
    """OpenTelemetry spans per request and stage (needs `pip install 'sift[tracing]'`); off by default."""

    enabled: bool = False
    exporter: Literal["otlp", "console"] = Field(
        "otlp", description="otlp (HTTP/protobuf, to `endpoint` or $OTEL_EXPORTER_OTLP_ENDPOINT) or console"
    )
    endpoint: str | None = Field(None, description="OTLP traces URL, e.g. http://collector:4318/v1/traces")
    service_name: str = "sift"
    sample_ratio: float = Field(1.0, ge=0, le=1, description="share of new traces recorded (parents decide theirs)")


class AutoscalingSettings(BaseModel):
    """Ray Serve autoscaling of the replicas (`sift serve --engine ray`); see Ray Serve's autoscaling_config."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests in flight per replica to aim for")
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        return self


class RaySettings(BaseModel):
    """`sift serve --engine ray`: replicas of the service (and of each shard) on Ray Serve."""

    address: str | None = Field(None, description="Ray cluster to join (auto, ray://host:10001); null: start one")
    replicas: int = Field(1, ge=1, description="replicas of the service (fixed; see autoscaling)")
    autoscaling: AutoscalingSettings | None = Field(None, description="when set, replaces the fixed `replicas`")
    cpus_per_replica: float = Field(1.0, gt=0)
    shard_replicas: int = Field(1, ge=1, description="replicas of each shard deployment (sharded builds)")
    cpus_per_shard: float = Field(0.5, gt=0, description="CPUs Ray reserves for each shard replica")
    shard_timeout_s: float = Field(5.0, gt=0, description="a shard slower than this is unavailable (503 or partial)")
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests a replica takes at once (Serve queues the rest at its proxy)"
    )


class Settings(SiftSettings):
    """Everything Sift reads at start. See `configs/default.yaml` for every field with comments. Loaded by
    `load_settings` (the file, `SIFT_*` env, overrides); `Settings()` is the code defaults plus the env."""

    model_config = SettingsConfigDict(extra="forbid")  # SIFT_ prefix, `__` nesting, sources: SiftSettings

    bundle: Path = Field(
        Path("var/index"),
        description="bundle folder or index folder with `current` (relative: to the working directory)",
    )
    collections: dict[str, Path] = Field(
        default_factory=dict,
        description="several collections in one server: name -> index folder (the first is the default); "
        "empty serves `bundle` as the collection `default`",
    )
    device: str | None = Field(None, description="model device; null picks CUDA when present")
    index: IndexConfig = IndexConfig()
    search: SearchSettings = SearchSettings()
    fusion: FusionSettings = FusionSettings()
    embeddings: EmbeddingsSettings = EmbeddingsSettings()
    classify: ClassifySettings = ClassifySettings()
    # built per instance: their path defaults (models/..., configs/prompts/...) resolve from the working
    # directory of that moment, as a file's values do (`project_path`)
    reranker: RerankerSettings = Field(default_factory=RerankerSettings)
    generator: GeneratorSettings = GeneratorSettings()
    answer: AnswerSettings = Field(default_factory=AnswerSettings)
    server: ServerSettings = ServerSettings()
    ingest: IngestSettings = IngestSettings()
    tracing: TracingSettings = TracingSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    ray: RaySettings = RaySettings()


def load_settings(config: Path | str | None = None, **overrides: object) -> Settings:
    """Settings from `config` (default: `$SIFT_CONFIG` or `configs/default.yaml`), env, then `overrides`:
    `indexer.config.load_config`, the loader `sift index build` and the quality gate use."""
    return load_config(Settings, config, **overrides)
