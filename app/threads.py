"""A serving process's thread policy and its models' ONNX Runtime sessions (what only a server needs; the
offline build keeps every runtime's defaults, one runtime at a time).

- `share_cores(models, spin_wait, blas_threads)`: set once the models are loaded, and again for each model
  loaded later (`app.services.Models`). ONNX Runtime, the cross-encoder (torch), MaxSim (numpy) and FAISS take
  turns on the same cores:
  - `spin_wait`: whether ONNX Runtime's intra-op threads busy-wait for work between runs (its default). A
    spinning thread holds a core that torch's next call needs: on 2 cores a 12-pair cross-encoder batch took
    ~35 ms longer right after a query encode (measured in process; docs/architecture.md, thread policy).
    Each of the models' sessions that was opened otherwise is released and reopens with it on next use.
  - `blas_threads`: threads of numpy's BLAS (not FAISS's own: it has its own library and threads). MaxSim's
    products are small; a multi-threaded OpenBLAS keeps its idle threads spinning, which slowed the
    cross-encoder running beside it by ~50 ms a reranked query. None leaves it alone.
- `release_sessions(models)`: a pre-fork master frees its models' sessions before forking, so that each
  worker opens its own instead of inheriting a dead one.

State lives on the models passed in (each ONNX module's `spin_wait` and session), none in this module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from indexer.runtime import _OnnxModuleMixin


def onnx_modules(*models: Any) -> list[_OnnxModuleMixin]:  # any model wrappers
    """The ONNX Runtime modules inside `models` (sentence-transformers wrappers, cross-encoders, the reader,
    MaxSim; torch-run models have none), each once."""
    found: dict[int, _OnnxModuleMixin] = {}
    torch = sys.modules.get("torch")
    pending = list(models)
    seen: set[int] = set()
    while pending:
        obj = pending.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _OnnxModuleMixin):
            found[id(obj)] = obj
        elif torch is not None and isinstance(obj, torch.nn.Module):
            found.update({id(m): m for m in obj.modules() if isinstance(m, _OnnxModuleMixin)})
        else:  # a wrapper holding its model (Reranker.model, ExtractiveReader.model, MaxSimReranker.encoder)
            pending.extend(getattr(obj, name, None) for name in ("model", "encoder"))
    return list(found.values())


def share_cores(models: Iterable[Any], spin_wait: bool = False, blas_threads: int | None = 1) -> dict[str, Any]:
    """Apply the thread policy to `models` and to this process's numpy BLAS; returns what was applied (see the
    module docstring)."""
    modules = onnx_modules(*models)
    for module in modules:
        if module.spin_wait != spin_wait:
            module.spin_wait = spin_wait
            module.release_session()  # reopens with the policy on its next run
    applied: dict[str, Any] = {"onnx_spin_wait": spin_wait, "onnx_sessions": len(modules), "numpy_blas_threads": None}
    if blas_threads is not None:
        import numpy
        from threadpoolctl import ThreadpoolController

        numpy_dir = str(Path(numpy.__file__).resolve().parent)
        for lib in ThreadpoolController().lib_controllers:
            # numpy's own BLAS lives in numpy/ or numpy.libs/ beside it
            if lib.user_api == "blas" and str(Path(lib.filepath).resolve()).startswith(numpy_dir):
                lib.set_num_threads(blas_threads)
                applied["numpy_blas_threads"] = blas_threads
    return applied


def release_sessions(models: Iterable[Any]) -> int:
    """Free the ONNX Runtime sessions of `models` (each reopens its own on next use); returns how many."""
    modules = onnx_modules(*models)
    for module in modules:
        module.release_session()
    return len(modules)
