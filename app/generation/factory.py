"""Build the configured generator."""

from __future__ import annotations

from app.generation.base import Generator
from app.settings import GeneratorSettings


def load_generator(settings: GeneratorSettings, device: str | None = None) -> Generator | None:
    """The generator named by settings, or None when `backend` is `none`."""
    if settings.backend == "none":
        return None
    if settings.backend == "openai":
        from app.generation.remote import OpenAICompatibleGenerator

        if not settings.base_url:
            raise ValueError("generator.base_url is required for the openai backend (e.g. http://localhost:8001/v1)")
        return OpenAICompatibleGenerator(
            settings.base_url,
            settings.model,
            api_key_env=settings.api_key_env,
            timeout_s=settings.timeout_s,
            max_retries=settings.max_retries,
            backoff_s=settings.backoff_s,
            context_window=settings.context_window,
            deadline_s=settings.deadline_s,
        )
    from app.generation.local import LocalGenerator

    return LocalGenerator.load(settings.model, settings.cache_dir, settings.device or device, settings.grounding)
