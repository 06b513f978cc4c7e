"""Memory and size: peak RSS of `sift index build` on SciFact, RSS of the server with every configured model
loaded (bi-encoder, a cross-encoder reranker, the local generator), and the bundle's bytes on disk.

    python bench/memory.py [--skip-build]

Targets: server ≤ 1.5 GB RSS with all three models; build ≤ 2 GB; exact dense index ≤ 1.1× raw float32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sift_client import SiftClient  # noqa: E402

from bench.common import ROOT, SCIFACT, append_report, start_server  # noqa: E402
from bench.search_latency import make_cross_encoder  # noqa: E402


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-build", action="store_true", help="do not time a fresh SciFact build")
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_build:
            out = Path(tmp) / "index"
            cmd = [
                sys.executable,
                "-c",
                "from app.cli import main; main()",
                "index",
                "build",
                "--input",
                str(SCIFACT / "corpus.jsonl"),
                "--out",
                str(out),
            ]
            started = time.perf_counter()
            # the build's progress bars (stderr) stay visible; its summary (stdout) is not needed
            subprocess.run(
                cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL
            )
            seconds = time.perf_counter() - started
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            lines.append(
                f"| `sift index build` SciFact (5,183 docs), peak RSS | {peak_mb:,.0f} MB | ≤ 2,048 MB | {seconds:.0f} s wall |"
            )
            bundle = out
        else:
            bundle = next(iter(sorted((ROOT / ".cache").glob("scifact-*"))))
        ce = make_cross_encoder(Path(tmp) / "ce")
        env_backup = dict(os.environ)
        process, base = start_server(bundle, ce)  # default config: local generator loads too
        try:
            ready_kb = status_kb(process.pid, "VmRSS")
            # a failed request must not yield an "after" row: the memory it did not use would look like a win
            # (the client raises on any failure; no retries, so none hides one)
            with SiftClient(base, timeout=300, max_retries=0) as sift:
                sift.search("vitamin D and bone", rerank=True)
                answer = sift.answer(
                    "Does vitamin D affect bone density?", rerank=True, generation={"max_new_tokens": 32}
                )
            if not answer.answer:
                raise SystemExit(f"the answer request generated nothing: {answer.model_dump_json()[:300]}")
            info = httpx.get(f"{base}/v1/info", timeout=10).json()
            after_kb, peak_kb = status_kb(process.pid, "VmRSS"), status_kb(process.pid, "VmHWM")
        finally:
            process.terminate()
            process.wait(timeout=30)
            os.environ.clear()
            os.environ.update(env_backup)
        lines.append(
            f"| server RSS when ready (bi-encoder + reranker + SmolLM2 + bundle) | {ready_kb / 1024:,.0f} MB | ≤ 1,536 MB | models: {info['models']} |"
        )
        lines.append(
            f"| server RSS after a reranked search and a generated answer (peak) | {after_kb / 1024:,.0f} MB ({peak_kb / 1024:,.0f} MB) | ≤ 1,536 MB | |"
        )
        manifest = (
            json.loads((Path(bundle).resolve() / "manifest.json").read_text())
            if (Path(bundle) / "manifest.json").exists()
            else json.loads(((Path(bundle) / "current").resolve() / "manifest.json").read_text())
        )
        passages = manifest["counts"]["passages"]
        sizes: dict[str, int] = {}
        for name, entry in manifest["files"].items():
            part = name.split("/")[0] if "/" in name else name
            sizes[part] = sizes.get(part, 0) + entry["bytes"]
        raw = passages * manifest["dense"]["dimension"] * 4
        index_bytes = manifest["files"]["dense/index.faiss"]["bytes"]
        size_rows = [f"| {part} | {b / passages * 1000 / 1e6:.2f} MB |" for part, b in sorted(sizes.items())]
    body = "\n".join(
        [
            "| what | measured | target | note |",
            "|---|---:|---:|---|",
            *lines,
            f"| exact dense index vs raw float32 vectors | {index_bytes / raw:.3f}× | ≤ 1.1× | {index_bytes:,} B for {passages} × {manifest['dense']['dimension']} |",
            "",
            f"Bundle bytes on disk per 1,000 passages (SciFact, {passages} passages):",
            "",
            "| component | per 1,000 passages |",
            "|---|---:|",
            *size_rows,
            "",
            "`dense` includes `embeddings.f16.npy`, a float16 copy of the vectors kept for re-indexing (0.5× raw).",
        ]
    )
    append_report("Memory and bundle size (bench/memory.py)", body)


if __name__ == "__main__":
    main()
