"""`sift`: the command line. `sift index`, `sift serve`, `sift eval`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from indexer.cli import app as index_app

app = typer.Typer(help="Sift: two-stage neural retrieval (BM25 + dense, fusion, reranking).", no_args_is_help=True)
app.add_typer(index_app, name="index")


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=level.upper(), format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":%(message)r}'
    )


@app.command("serve")
def serve(
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help="bundle folder or index folder with `current`"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (default configs/default.yaml)"),
    host: str | None = typer.Option(None, help="interface to bind (default from config: 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (default from config: 8000)"),
    workers: int | None = typer.Option(None, help="uvicorn worker processes; each loads the models"),
) -> None:
    """Serve the HTTP API with uvicorn."""
    import uvicorn

    from app.settings import load_settings

    settings = load_settings(config)
    if bundle is not None:
        os.environ["SIFT_BUNDLE"] = str(bundle)
    if config is not None:
        os.environ["SIFT_CONFIG"] = str(config)
    settings = load_settings(config)
    setup_logging(settings.server.log_level)
    uvicorn.run(
        "app.api.asgi:app",
        host=host or settings.server.host,
        port=port or settings.server.port,
        workers=workers or settings.server.workers,
        log_level=settings.server.log_level,
        factory=False,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
