"""Helpers shared by the benchmark scripts: timing medians, machine description, report appending."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks.md"
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}"


def progress(total: int, desc: str) -> Any:
    """A progress bar with ETA on stderr for a benchmark's measurement steps (`.update()` after each)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, mininterval=0.5)


def progress_iter(items: list, desc: str) -> Any:
    """`items` with a progress bar (ETA) on stderr."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, file=sys.stderr, mininterval=0.5)


def progress_range(n: int, desc: str) -> Any:
    return progress_iter(list(range(n)), desc)


def median_time(
    fn: Callable[[], Any], runs: int = 5, warmup: int = 1, desc: str | None = None
) -> tuple[float, list[float]]:
    """Median wall time of `runs` calls after `warmup` calls, and all the timings (with a progress bar)."""
    with progress(warmup + runs, desc or getattr(fn, "__name__", "runs")) as bar:
        for _ in range(warmup):
            fn()
            bar.update()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
            bar.update()
    return statistics.median(times), times


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def append_report(title: str, body: str) -> None:
    """Append a dated section (command, machine, body) to docs/benchmarks.md and print it."""
    section = (
        f"\n## {title}\n\n"
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- command: `{command_line()}`\n"
        f"- machine: {machine()}\n\n{body.strip()}\n"
    )
    print(section)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    if not REPORT.exists():
        REPORT.write_text(
            "# Sift benchmarks\n\nEvery section below was appended by a script in `bench/`; rerun the "
            "command shown to reproduce it. Figures are medians of the stated number of runs after a "
            "warm-up; ratios compare runs made in the same process.\n"
        )
    with open(REPORT, "a", encoding="utf-8") as handle:
        handle.write(section)
