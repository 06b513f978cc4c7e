"""Peak memory while reading a large input: `read_documents` over synthetic JSONL and CSV files of
`--sizes` MB (default 100 and 1000), each in a fresh process (ru_maxrss), for this checkout and for an
earlier commit (`--baseline`) in the same run. Streaming input means the peak does not grow with the file.

(This measures the input layer. A whole build also holds every passage's index text for BM25 and the
encoder, which grows with the corpus; see docs/benchmarks.md.)

    python bench/ingest_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, append_report, progress  # noqa: E402

BASELINE = "6daa8f0"
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud light".split()

PROBE = """
import resource, sys, time
sys.path.insert(0, sys.argv[1])
from indexer.sources import read_documents
t = time.perf_counter()
n = sum(1 for _ in read_documents(sys.argv[2]))
print(n, round(time.perf_counter() - t, 2), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def make_jsonl(path: Path, megabytes: int) -> int:
    target, n = megabytes * 1_000_000, 0
    line = " ".join(WORDS * 7)
    with path.open("w", encoding="utf-8") as handle:
        while handle.tell() < target:
            handle.write(json.dumps({"_id": f"d{n}", "title": f"doc {n}", "text": f"{n} {line}"}) + "\n")
            n += 1
    return n


def make_csv(path: Path, megabytes: int) -> int:
    target, n = megabytes * 1_000_000, 0
    line = " ".join(WORDS * 7)
    with path.open("w", encoding="utf-8") as handle:
        handle.write("id,title,text\n")
        while handle.tell() < target:
            handle.write(f'd{n},doc {n},"{n} {line}\nsecond line"\n')
            n += 1
    return n


def probe(code: Path, path: Path) -> tuple[int, float, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(code), str(path)], capture_output=True, text=True, cwd=code, timeout=3600
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    n, seconds, peak_mb = out.stdout.split()
    return int(n), float(seconds), int(peak_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000", help="file sizes in MB")
    parser.add_argument("--baseline", default=BASELINE, help="commit measured for comparison ('' to skip)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    versions = [("this checkout", ROOT)]
    worktree = None
    if args.baseline:
        worktree = tempfile.mkdtemp(prefix="sift-baseline-")
        subprocess.run(["git", "worktree", "add", "--detach", worktree, args.baseline], cwd=ROOT, check=True)
        versions.append((f"`{args.baseline}` (before)", Path(worktree)))
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bar = progress(len(sizes) * 2 * (1 + len(versions)), "files and probes")
            for size in sizes:
                for kind, make in (("JSONL", make_jsonl), ("CSV", make_csv)):
                    path = Path(tmp) / f"corpus-{size}.{kind.lower()}"
                    t = time.perf_counter()
                    records = make(path, size)
                    bar.update()
                    made = time.perf_counter() - t
                    for name, code in versions:
                        n, seconds, peak = probe(code, path)
                        rows.append((kind, size, records, name, n, seconds, peak))
                        bar.update()
                    path.unlink()
                    del made
    finally:
        if worktree:
            subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=ROOT, check=False)
    lines = [
        "`read_documents` over a synthetic file, each probe in a fresh process; peak RSS is the process's "
        "ru_maxrss (Python, the package and the parser included).",
        "",
        "| input | file MB | records | code | documents read | seconds | peak RSS MB |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for kind, size, records, name, n, seconds, peak in rows:
        lines.append(f"| {kind} | {size} | {records:,} | {name} | {n:,} | {seconds:.1f} | **{peak}** |")
    append_report("Input streaming: peak memory while reading large inputs", "\n".join(lines))


if __name__ == "__main__":
    main()
