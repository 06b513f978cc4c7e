"""HTTP layer: validate requests, call the pipeline, shape responses. No model or index code lives here."""

from app.api.main import create_app

__all__ = ["create_app"]
