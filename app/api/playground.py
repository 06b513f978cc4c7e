"""The playground page: `/ui` (and `/` redirects there). A static page shipped inside the package (no CDN,
so offline machines work) that talks to the public API like any client."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)
assets = StaticFiles(directory=STATIC)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/ui")
async def playground() -> FileResponse:
    return FileResponse(STATIC / "playground.html", media_type="text/html", headers={"cache-control": "no-cache"})
