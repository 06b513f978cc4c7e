"""Dense passage vectors and their FAISS index (exact inner product, HNSW or IVF-PQ; GPU when present)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import faiss
import numpy as np

from indexer.config import DenseSettings

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.f16.npy"


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def make_index(vectors: np.ndarray, settings: DenseSettings) -> faiss.Index:
    """Build the configured index over L2-normalised (or raw) float32 `vectors`, on GPU when possible."""
    n, dim = vectors.shape
    metric = faiss.METRIC_INNER_PRODUCT
    if settings.index_type == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
    elif settings.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, metric)
        index.hnsw.efConstruction = settings.hnsw_ef_construction
        index.hnsw.efSearch = settings.hnsw_ef_search
    else:
        nlist = settings.ivf_nlist or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
        if dim % settings.pq_m:
            raise ValueError(f"dense.pq_m={settings.pq_m} must divide the embedding dimension {dim}")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, settings.pq_m, settings.pq_nbits, metric)
        index.nprobe = settings.ivf_nprobe
    if gpu_available() and settings.index_type != "hnsw":
        log.info("building the FAISS index on GPU")
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        if not gpu_index.is_trained:
            gpu_index.train(vectors)
        gpu_index.add(vectors)
        return faiss.index_gpu_to_cpu(gpu_index)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    return index


def save_dense(vectors: np.ndarray, settings: DenseSettings, out_dir: Path) -> faiss.Index:
    """Write the index and a float16 copy of the vectors (for re-indexing without re-encoding)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = make_index(vectors, settings)
    faiss.write_index(index, str(out_dir / INDEX_FILE))
    np.save(out_dir / EMBEDDINGS_FILE, vectors.astype(np.float16))
    return index


def load_index(directory: Path, settings: DenseSettings, mmap: bool = True) -> faiss.Index:
    """Read the FAISS index (memory-mapped where the index type allows) and apply search parameters."""
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap and settings.index_type != "flat" else 0
    index = faiss.read_index(str(directory / INDEX_FILE), flags)
    if settings.index_type == "hnsw":
        hnsw = faiss.downcast_index(index)
        if not isinstance(hnsw, faiss.IndexHNSW):
            raise ValueError(f"{directory / INDEX_FILE}: not an HNSW index ({type(hnsw).__name__})")
        hnsw.hnsw.efSearch = settings.hnsw_ef_search
    elif settings.index_type == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = settings.ivf_nprobe
    return index
