"""Build parameters of an index bundle (the `index:` section of `configs/*.yaml`), and the base of Sift's one
settings model.

Sift has one settings model and one way to load it: `SiftSettings` here holds the sections the indexer reads
(`index:`, and `search.default_mode` for the quality gate); `app.settings.Settings` extends it with every other
section (the indexer never imports the app). Both are loaded by `load_config`: a YAML file, then `SIFT_*`
environment variables nested with `__` over it (`SIFT_INDEX__DENSE__INDEX_TYPE=hnsw`,
`SIFT_SEARCH__DEFAULT_MODE=bm25`), then the caller's overrides over both. The code defaults equal
`configs/default.yaml` (tests/test_settings_defaults.py compares them).
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# how a model runs (indexer/runtime.py); the one list every setting that names a runtime uses
Runtime = Literal["torch", "torch-bf16", "onnx", "onnx-int8"]
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"


def config_path(config: Path | str | None = None) -> Path:
    """The YAML config Sift reads: `config`, else `$SIFT_CONFIG`, else `configs/default.yaml`."""
    path = Path(config or os.environ.get("SIFT_CONFIG") or DEFAULT_CONFIG)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; pass --config or set SIFT_CONFIG")
    return path


class ChunkingSettings(BaseModel):
    """Passage windows: a document of at most `window` tokens stays whole; a longer one becomes windows of
    `window` tokens overlapping by `overlap`."""

    window: int = Field(256, ge=1, description="passage length in dual-encoder tokens")
    overlap: int = Field(32, ge=0, description="tokens shared by consecutive windows")

    @model_validator(mode="after")
    def _overlap_below_window(self) -> ChunkingSettings:
        if self.overlap >= self.window:
            raise ValueError("chunking.overlap must be smaller than chunking.window")
        return self


class BM25Settings(BaseModel):
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = "lucene"
    k1: float = Field(0.9, gt=0)
    b: float = Field(0.4, ge=0, le=1)
    stemmer: str | None = Field("english", description="PyStemmer language, or null for none")
    stopwords: str | None = Field("en", description="bm25s stop-word list name, or null for none")


class DenseSettings(BaseModel):
    enabled: bool = True
    model: str = Field(DEFAULT_ENCODER, description="sentence-transformers model id or local path")
    normalize: bool = True
    batch_size: int = Field(32, ge=1)
    device: str | None = Field(None, description="cpu, cuda, ...; null picks CUDA when present")
    runtime: Runtime = Field(
        "torch",
        description="how passages are encoded: torch (float32), torch-bf16, ONNX Runtime float32, or ONNX Runtime "
        "dynamic int8 (see indexer.runtime)",
    )
    token_vectors: Literal["float16", "int8", "pq"] | None = Field(
        "pq",
        description="also keep each passage's token vectors (from the same encoder pass) for MaxSim at query time "
        "without re-encoding: pq (product quantisation: token_pq_m bytes per token), int8 (~0.4 KB per token "
        "with 384 dimensions) or float16 (~0.8 KB); null: none",
    )
    token_pq_m: int = Field(
        32, ge=1, le=1024, description="pq token vectors: sub-spaces (bytes per token); must divide the dimension"
    )
    token_pq_rotate: bool = Field(
        True, description="pq token vectors: learn an OPQ rotation first (better codes for the same bytes)"
    )
    token_pq_sample: int = Field(
        262144,
        ge=256,
        description="pq token vectors: tokens the codebook is trained on, spread over the corpus (chosen on SciFact "
        "train: a larger sample gave codebooks that score alike across k-means seeds)",
    )
    index_type: Literal["flat", "hnsw", "ivfpq"] = "flat"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    ivf_nlist: int = 0
    ivf_nprobe: int = 16
    pq_m: int = 48
    pq_nbits: int = 8

    @field_validator("model")
    @classmethod
    def _local_model_absolute(cls, value: str) -> str:
        """A model folder that exists here (an encoder adapted by `sift encoder train`) is recorded by its
        absolute path, so the manifest names the same model whatever folder the server starts in; a hub id
        (or a path not present here) is kept as written."""
        path = Path(value).expanduser()
        return str(path.resolve()) if not path.is_absolute() and path.is_dir() else value


class CsvSettings(BaseModel):
    """Which CSV columns hold the id, title and text; every other column becomes metadata."""

    id_column: str = "id"
    title_column: str = "title"
    text_column: str = "text"
    max_field_chars: int = Field(
        1_000_000, ge=1, description="longest CSV field; a longer one is a per-record error (--skip-bad skips it)"
    )


TEXT_SLOT = "{text}"
MAX_WORD_CHARS = 100  # a label or verbalizer word (each is scored token by token)


PRIOR_SAMPLE = 512  # passages a label prior is measured on by default (`sift index prior`, `sift eval classify`)
MAX_ENSEMBLE = 8  # prompts of a label set beside its own (each costs one more model pass per passage)


class LabelPrompt(BaseModel):
    """One more prompt of a label set's ensemble: its own template, prefix, verbalizer and calibration
    strength, over the same labels."""

    model_config = ConfigDict(extra="forbid")

    template: str = Field(..., max_length=2000, description="the question around the text, holding `{text}`")
    prefix: str = Field(..., max_length=200, description="the start of the answer; a label word follows")
    labels: dict[str, list[str]] = Field(
        ..., description="label -> verbalizer words for this prompt (the set's labels, each; empty: the label)"
    )
    calibration: float = Field(1.0, ge=0.0, le=1.0, description="as the set's `calibration`, for this prompt")


class LabelSet(BaseModel):
    """A zero-shot classifier made of a prompt and a verbalizer (no training data): the model reads
    `template` with a passage in place of `{text}`, then `prefix` as the start of its answer, and each label is
    scored by the probability that the next word is one of its verbalizer words (calibrated against the same
    prompt with an empty text). Tags written at build time go to passage metadata under `field`."""

    model_config = ConfigDict(extra="forbid")

    field: str = Field(..., min_length=1, max_length=64, description="passage metadata key the label is written to")
    template: str = Field(
        "{text}\n\nWhat is the topic of this text?",
        max_length=2000,
        description="the question around the text, holding `{text}` (a chat model reads it as the user's turn)",
    )
    prefix: str = Field("The topic is", max_length=200, description="the start of the answer; a label word follows")
    labels: dict[str, list[str]] = Field(
        ..., description="label -> verbalizer words (an empty list: the label itself); at least two labels"
    )
    top_scores: int = Field(3, ge=1, le=100, description="labels whose probabilities are kept beside the label")
    min_score: float = Field(
        0.0, ge=0.0, le=1.0, description="write no label when the best label's probability is below this"
    )
    calibration: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="how much of the empty text's word scores is subtracted (1: all, contextual calibration)",
    )

    prior: dict[str, float] = Field(
        default_factory=dict,
        description="each label's mean probability over unlabelled texts like those the set tags (no labels "
        "needed: `sift index prior` measures it on your corpus, `sift eval classify` on a labelled set's half "
        "0); a label's score is divided by its prior to the power `prior_strength` (batch calibration), so a "
        "label the model favours for every text stops winning everywhere. Empty: none",
    )
    prior_strength: float = Field(
        1.0, ge=0.0, le=1.0, description="how much of `prior` is taken out (1: divide by it; 0: ignore it)"
    )
    ensemble: list[LabelPrompt] = Field(
        default_factory=list,
        max_length=MAX_ENSEMBLE,
        description="more prompts over the same labels; a label's score is the mean of its scores under every "
        "prompt (prompt ensembling: each prompt costs one more model pass per passage)",
    )

    @model_validator(mode="after")
    def _valid(self) -> LabelSet:
        if TEXT_SLOT not in self.template:
            raise ValueError("template must contain {text}")
        seen = {(self.template, self.prefix)}
        for i, prompt in enumerate(self.ensemble):
            if TEXT_SLOT not in prompt.template:
                raise ValueError(f"ensemble[{i}].template must contain {{text}}")
            if (prompt.template, prompt.prefix) in seen:
                raise ValueError(f"ensemble[{i}] repeats a prompt of the set (it would count twice)")
            seen.add((prompt.template, prompt.prefix))
            if list(prompt.labels) != list(self.labels):
                raise ValueError(f"ensemble[{i}].labels must name the set's labels, in the same order")
            for label, words in prompt.labels.items():
                if any(not w.strip() or len(w) > MAX_WORD_CHARS for w in words):
                    raise ValueError(
                        f"ensemble[{i}].labels.{label}: a verbalizer word is empty or longer than "
                        f"{MAX_WORD_CHARS} characters"
                    )
        if len(self.labels) < 2:
            raise ValueError("labels: give at least two labels")
        if self.prior:
            if set(self.prior) != set(self.labels):
                raise ValueError("prior must give every label of the set, and only those, a probability")
            if not all(0.0 < p <= 1.0 for p in self.prior.values()):
                raise ValueError("prior: each probability must be above 0 and at most 1")
        for label, words in self.labels.items():
            if not label.strip():
                raise ValueError("labels: a label name is empty")
            if any(not w.strip() for w in words):
                raise ValueError(f"labels.{label}: a verbalizer word is empty")
            if any(len(w) > MAX_WORD_CHARS for w in [label, *words]):
                raise ValueError(
                    f"labels.{label}: a label or verbalizer word is longer than {MAX_WORD_CHARS} characters"
                )
        return self

    def words(self) -> dict[str, list[str]]:
        """Each label's verbalizer words, the label itself where none are given."""
        return {label: [w.strip() for w in words] or [label] for label, words in self.labels.items()}

    def prompts(self) -> list[LabelSet]:
        """The set's prompts, each as a label set of one prompt (validated, labels in the set's order): its own
        first, then the ensemble's."""
        own = self.model_copy(update={"ensemble": [], "prior": {}})  # the prior is the whole set's (set_scores)
        parts = [own]
        for i, prompt in enumerate(self.ensemble):
            if set(prompt.labels) != set(self.labels):  # a copy made without validation may reach here
                raise ValueError(f"ensemble[{i}].labels must name the set's labels")
            fields = {**own.model_dump(), **prompt.model_dump()}
            fields["labels"] = {label: prompt.labels[label] for label in self.labels}
            parts.append(LabelSet.model_validate(fields))
        return parts


# the label set shipped for the example corpus's topics; its template, prefix, words, calibration and prior were
# chosen on half of that corpus (`sift eval classify`, docs/benchmarks.md) and are reported on the other half
DEFAULT_LABEL_SETS: dict[str, LabelSet] = {
    "topic": LabelSet(
        field="auto_topic",
        template="{text}\n\nWhat is this text about? Answer with one word.",
        prefix="This text is about",
        labels={
            "astronomy": ["astronomy", "Galaxies"],
            "biology": ["biology", "Vaccines"],
            "computing": ["computing", "Turing"],
            "cooking": ["cooking", "Broth"],
            "earth": ["earth", "Earth's"],
            "health": ["health", "Cholesterol"],
            "history": ["history", "Silk"],
            "music": ["music", "Music"],
            "sport": ["sport", "Games"],
            "language": ["language", "Languages"],
        },
        calibration=0.75,
        # measured on half 0 of the example corpus (its notes, not their labels); `sift index prior` measures
        # one for your corpus
        prior={
            "astronomy": 0.093353,
            "biology": 0.115806,
            "computing": 0.077531,
            "cooking": 0.091498,
            "earth": 0.165862,
            "health": 0.086044,
            "history": 0.133651,
            "music": 0.106758,
            "sport": 0.06534,
            "language": 0.064156,
        },
        prior_strength=1.0,
    )
}


class TaggingSettings(BaseModel):
    """Zero-shot tagging at build time (`sift index build --tag`) and for `POST /v1/classify`: a language model
    scores each label set's verbalizer words (indexer/tagging.py)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="tag passages at build time (`--tag` turns it on; updates keep it)")
    model: str = Field(
        "smollm2",
        description="`smollm2` (the bundled SmolLM2-135M-Instruct, next-word probabilities), a causal LM or a "
        "fill-mask model (path or hub id; a masked LM scores the word in a [MASK] slot)",
    )
    cache_dir: Path | None = Field(None, description="where the dequantised SmolLM2 copy is kept; null: user cache")
    device: str | None = Field(None, description="cpu, cuda, ...; null picks CUDA when present")
    max_tokens: int = Field(160, ge=8, le=2048, description="passage tokens the model reads (the rest is cut)")
    runtime: Literal["torch", "torch-bf16"] = Field(
        "torch-bf16",
        description="torch-bf16: bfloat16 on a CPU that computes it natively (AVX512-BF16/AMX), else float32 "
        "(torch); float16 on CUDA",
    )
    system: str | None = Field(
        None, max_length=2000, description="a chat model's system turn (null: the model's default; \"\": an empty one)"
    )
    batch_size: int = Field(8, ge=1, le=256, description="prompts per model call")
    label_sets: dict[str, LabelSet] = Field(
        default_factory=lambda: {k: v.model_copy(deep=True) for k, v in DEFAULT_LABEL_SETS.items()},
        description="name -> label set; `--tag` writes every one",
    )


class IndexConfig(BaseModel):
    """Everything that determines the contents of a bundle (recorded in its manifest). A plain section of
    `SiftSettings`: it is loaded (file, `SIFT_INDEX__*` environment, overrides) only through `load_config`."""

    model_config = ConfigDict(extra="forbid")

    chunking: ChunkingSettings = ChunkingSettings()
    bm25: BM25Settings = BM25Settings()
    dense: DenseSettings = DenseSettings()
    csv: CsvSettings = CsvSettings()
    tagging: TaggingSettings = TaggingSettings()
    keep_builds: int = Field(3, ge=1, description="published builds kept on publish (older ones are pruned)")


def recorded_config(manifest: dict[str, Any]) -> IndexConfig:
    """The index config a bundle's manifest records. A manifest written before `dense.token_vectors` existed
    does not name it, and that build kept none (today's default, int8, must not be assumed for it)."""
    config = dict(manifest["config"])
    config["dense"] = {"token_vectors": None, **(config.get("dense") or {})}
    return IndexConfig.model_validate(config)


SearchMode = Literal["bm25", "dense", "hybrid"]


class SearchModeSettings(BaseModel):
    """The part of the `search:` section the indexer reads: the mode the quality gate evaluates. The server's
    `app.settings.SearchSettings` extends it with the API's limits."""

    default_mode: SearchMode = "hybrid"


# the YAML file `load_config` is reading, for `SiftSettings.settings_customise_sources` (None: no file)
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("sift_config_file", default=None)


class SiftSettings(BaseSettings):
    """The sections of Sift's settings the indexer reads, and the base of `app.settings.Settings`: one env
    prefix (`SIFT_`, nested with `__`), one YAML source, one loader (`load_config`). Other top-level sections
    of the file are ignored here (the server's `Settings` declares them all and forbids unknown ones)."""

    model_config = SettingsConfigDict(env_prefix="SIFT_", env_nested_delimiter="__", extra="ignore")

    index: IndexConfig = IndexConfig()
    search: SearchModeSettings = SearchModeSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Overrides, then `SIFT_*` environment variables, then the YAML file being loaded (none when the
        model is built directly: `Settings()` is the code defaults plus the environment)."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


S = TypeVar("S", bound=SiftSettings)


def load_config(model: type[S], config: Path | str | None = None, **overrides: Any) -> S:
    """`model` (`SiftSettings` or `app.settings.Settings`) from the config Sift reads (`config_path`), with
    `SIFT_*` environment variables over the file and `overrides` (nested dicts merge into the file's sections)
    over both. The one loader of Sift's settings: `load_settings`, `sift index` and the quality gate use it."""
    token = _CONFIG_FILE.set(config_path(config))
    try:
        return model(**overrides)
    finally:
        _CONFIG_FILE.reset(token)


def load_index_config(config: Path | str | None = None, **overrides: Any) -> IndexConfig:
    """The `index:` section of the config Sift reads, with `SIFT_INDEX__*` environment variables over the file
    and `overrides` (fields of `IndexConfig`) over both: `load_config`, exactly as `load_settings` reads it."""
    return load_config(SiftSettings, config, **({"index": overrides} if overrides else {})).index
