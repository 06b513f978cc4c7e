"""Build parameters of an index bundle, read from the `index:` section of `configs/*.yaml`.

`SIFT_INDEX__<SECTION>__<FIELD>` environment variables override the file, e.g.
`SIFT_INDEX__DENSE__INDEX_TYPE=hnsw`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

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


def read_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text()) or {}


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
    token_vectors: Literal["float16", "int8"] | None = Field(
        None,
        description="also keep each passage's token vectors (from the same encoder pass) for MaxSim at query time "
        "without re-encoding: int8 (~0.4 KB per token with 384 dimensions) or float16 (~0.8 KB); null: none",
    )
    index_type: Literal["flat", "hnsw", "ivfpq"] = "flat"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    ivf_nlist: int = 0
    ivf_nprobe: int = 16
    pq_m: int = 48
    pq_nbits: int = 8


class CsvSettings(BaseModel):
    """Which CSV columns hold the id, title and text; every other column becomes metadata."""

    id_column: str = "id"
    title_column: str = "title"
    text_column: str = "text"
    max_field_chars: int = Field(
        1_000_000, ge=1, description="longest CSV field; a longer one is a per-record error (--skip-bad skips it)"
    )


class IndexConfig(BaseSettings):
    """Everything that determines the contents of a bundle (recorded in its manifest)."""

    model_config = SettingsConfigDict(env_prefix="SIFT_INDEX__", env_nested_delimiter="__", extra="forbid")

    chunking: ChunkingSettings = ChunkingSettings()
    bm25: BM25Settings = BM25Settings()
    dense: DenseSettings = DenseSettings()
    csv: CsvSettings = CsvSettings()
    keep_builds: int = Field(3, ge=1, description="published builds kept on publish (older ones are pruned)")


class _Section(PydanticBaseSettingsSource):
    """A pydantic-settings source that yields one section of an already-read YAML file."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def load_index_config(config: Path | str | None = None, **overrides: Any) -> IndexConfig:
    """The `index:` section of the config Sift reads (`config_path`), with `SIFT_INDEX__*` environment
    variables over the file and `overrides` over both: exactly how `load_settings` reads it for the server."""
    section = read_yaml(config_path(config)).get("index") or {}

    class FromFile(IndexConfig):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_: Any):  # noqa: ANN001, ANN206
            return (init_settings, env_settings, _Section(settings_cls, section))

    loaded = FromFile(**overrides)
    return IndexConfig.model_validate(loaded.model_dump())
