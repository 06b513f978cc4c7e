"""How a Sift process runs another Sift command: the quality gate's evaluation, the server's ingest applier
and the tests' command-line checks all start `sift` the same way."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def sift_command() -> list[str]:
    """The argv prefix that runs `sift` with this interpreter's installation: the `sift` script beside
    `sys.executable` (a virtual environment's), else the one on PATH, else `python -c` on the entry point."""
    sift = Path(sys.executable).with_name("sift")
    if sift.exists():
        return [str(sift)]
    found = shutil.which("sift")
    return [found] if found else [sys.executable, "-c", "from app.cli import main; main()"]


__all__ = ["sift_command"]
