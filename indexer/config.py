"""Build parameters of an index bundle, read from the `index:` section of `configs/*.yaml`.

`SIFT_INDEX__<SECTION>__<FIELD>` environment variables override the file, e.g.
`SIFT_INDEX__DENSE__INDEX_TYPE=hnsw`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


class ChunkingSettings(BaseModel):
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
    index_type: Literal["flat", "hnsw", "ivfpq"] = "flat"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    ivf_nlist: int = 0
    ivf_nprobe: int = 16
    pq_m: int = 48
    pq_nbits: int = 8


class CsvSettings(BaseModel):
    id_column: str = "id"
    title_column: str = "title"
    text_column: str = "text"


class IndexConfig(BaseSettings):
    """Everything that determines the contents of a bundle (recorded in its manifest)."""

    model_config = SettingsConfigDict(env_prefix="SIFT_INDEX__", env_nested_delimiter="__", extra="forbid")

    chunking: ChunkingSettings = ChunkingSettings()
    bm25: BM25Settings = BM25Settings()
    dense: DenseSettings = DenseSettings()
    csv: CsvSettings = CsvSettings()

    @classmethod
    def from_yaml(cls, path: Path | None) -> IndexConfig:
        """Read the `index:` section of a YAML config (or defaults when `path` is None)."""
        data: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            data = loaded.get("index", {}) or {}
        return cls(**data)
