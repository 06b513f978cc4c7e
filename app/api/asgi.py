"""ASGI entry point for uvicorn/gunicorn: `uvicorn app.api.asgi:app`. Settings come from `SIFT_CONFIG`
(default configs/default.yaml) and `SIFT_*` environment variables."""

from app.api.main import create_app

app = create_app()
