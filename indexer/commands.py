"""How a Sift process runs another Sift command: the quality gate's evaluation, the server's ingest applier
and the tests' command-line checks all start `sift` the same way; a background child yields the cores with
`lower_to_idle`."""

from __future__ import annotations

import os
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


def lower_to_idle() -> bool:
    """Put the calling thread, and every thread it starts later, under Linux's SCHED_IDLE policy (call it before
    starting any: threads already running keep theirs): the scheduler gives
    it a core only when no normal thread wants one, and a waking normal thread preempts it at once (niceness
    only lowers a thread's share: under it the searches' parallel operators still wait for their thread that
    shares a core with the child). Any process may lower itself to it. Returns False where the policy is
    unavailable (not Linux), leaving the process as it was."""
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True


__all__ = ["lower_to_idle", "sift_command"]
