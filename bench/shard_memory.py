"""Peak memory of a sharded build against an unsharded one: SciFact built unsharded and with `--shards 3`
(the shipped index config, its token-vector form included), each in a fresh process (ru_maxrss), one after the other;
then the unsharded build resharded into 3 by this checkout (streamed `ShardWriter`) and by an earlier commit
(`--baseline`, whose `write_shards` held the whole corpus: docstore rows, BM25 token lists, vectors, and the
memory-mapped token vectors), which isolates the write stage from the encoder. A probe that only loads the
bi-encoder and encodes a few passages gives the floor every build stands on.

    python bench/shard_memory.py            # ~2 SciFact builds: 15-50 min on a busy 2-core CPU (log to a file)
    python bench/shard_memory.py --from-log shard_memory.log   # report the figures a logged run printed
    python bench/shard_memory.py --copy-tokens INDEX            # seconds: copying a bundle's token vectors

`--copy-tokens` measures what an update and a reshard do for every kept passage: copy the parent's stored
token vectors (`TokenWriter.add_stored`), this checkout against `--copy-baseline` (which read them through
the store's memory map, making every page of the file resident in the process).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, SCIFACT, append_report, source_tree  # noqa: E402

BASELINE = "6876f11"  # the last commit before the shared pipeline (write_shards materialised the corpus)
COPY_BASELINE = "e8ec517"  # the last commit whose TokenWriter.add_stored read through the memory map

PROBE = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
kind, corpus, out, shards = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
from indexer.config import load_index_config
config = load_index_config(Path(sys.argv[1]) / "configs" / "default.yaml")
t = time.perf_counter()
if kind == "encoder":
    from indexer.encoders import encode_passages, load_encoder
    encoder = load_encoder(config.dense.model, config.dense.device, config.dense.runtime)
    encode_passages(encoder, ["a short passage"] * 64, config.dense)
    result = {"timings": {}}
elif kind == "build":
    from indexer.build import build_bundle
    r = build_bundle(corpus, out, config, shards=shards, show_progress=False)
    result = {"documents": r.documents, "passages": r.passages, "timings": r.timings}
elif kind == "copy-tokens":
    from indexer.bundle import open_bundle
    from indexer.tokens import TokenStore, TokenWriter
    info = open_bundle(corpus, verify=False)
    store = TokenStore.open(info.path("dense"), info.manifest["counts"]["passages"])
    with TokenWriter(out, store.dtype) as writer:
        writer.add_stored(store, list(range(len(store.offsets) - 1)))
        meta = writer.close()
    result = {"passages": meta["passages"], "tokens": meta["tokens"], "bytes": store.nbytes, "timings": {}}
else:
    from indexer.build import reshard_bundle
    r = reshard_bundle(corpus, out, shards, show_progress=False)
    result = {"documents": r.documents, "passages": r.passages, "timings": r.timings}
result["seconds"] = round(time.perf_counter() - t, 1)
result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print("RESULT " + json.dumps(result))
"""


def probe(code: Path, kind: str, corpus: Path, out: Path, shards: int) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(code), kind, str(corpus), str(out), str(shards)],
        capture_output=True,
        text=True,
        cwd=code,
        timeout=4 * 3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} probe failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    print(f"{kind} (shards={shards}, {code}): {result} [{time.perf_counter() - started:.0f} s]", flush=True)
    return result


def from_log(path: Path) -> dict[str, dict]:
    """The results a run printed (`probe`'s lines), by what was measured."""
    names = {("encoder", False): "floor", ("reshard", True): "before", ("reshard", False): "resharded"}
    results: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        head, _, rest = line.partition(": {")
        if not rest or " (shards=" not in head:
            continue
        kind, shards = head.split(" (shards=")[0], int(head.split(" (shards=")[1].split(",")[0])
        result = ast.literal_eval("{" + rest.rsplit(" [", 1)[0])
        baseline = str(ROOT) not in head
        name = names.get((kind, baseline)) or ("one" if shards == 1 else "many")
        results[name] = {**result, "shards": shards}
    return results


def report_builds(results: dict[str, dict], corpus: Path, shards: int, baseline: str, note: str = "") -> None:
    floor, one, many, resharded = (results[k] for k in ("floor", "one", "many", "resharded"))
    before = results.get("before")
    ratio = many["peak_mb"] / one["peak_mb"]

    def timings(result: dict) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items())

    from indexer.config import load_index_config

    dense = load_index_config(ROOT / "configs" / "default.yaml").dense
    lines = [
        f"`{corpus}`: {one['documents']:,} documents, {one['passages']:,} passages; the shipped index config "
        f"(configs/default.yaml: {dense.token_vectors} token vectors, {dense.index_type} FAISS, {dense.runtime} on "
        "the CPU). Each row is one fresh process (ru_maxrss: Python, torch and the model included), run one after "
        f"the other.{note}",
        "",
        "| run | code | peak RSS MB | wall s | stage timings s |",
        "|---|---|---:|---:|---|",
        f"| load the bi-encoder, encode 64 passages (the floor) | this checkout | {floor['peak_mb']:,} | "
        f"{floor['seconds']:.0f} | |",
        f"| build, unsharded | this checkout | **{one['peak_mb']:,}** | {one['seconds']:.0f} | {timings(one)} |",
        f"| build, {shards} shards (streamed) | this checkout | **{many['peak_mb']:,}** | {many['seconds']:.0f} | "
        f"{timings(many)} |",
        f"| reshard the unsharded build into {shards} | this checkout (streamed `ShardWriter`) | "
        f"{resharded['peak_mb']:,} | {resharded['seconds']:.0f} | {timings(resharded)} |",
    ]
    if before is not None:
        lines.append(
            f"| reshard the unsharded build into {shards} | `{baseline}` (before: `write_shards` held the "
            f"corpus) | {before['peak_mb']:,} | {before['seconds']:.0f} | {timings(before)} |"
        )
    lines += [
        "",
        f"A {shards}-shard build peaks at {ratio:.2f}× the unsharded build's RSS. "
        + (
            "With pq token vectors both peaks come at the token writers' close, where the codebook is trained "
            f"on up to {dense.token_pq_sample:,} tokens (float32, plus faiss's OPQ working set): the sharded build "
            "trains it once, over every shard's spilled tokens; with int8 vectors the same builds peak at the encoder (measure them with "
            "`SIFT_INDEX__DENSE__TOKEN_VECTORS=int8`). "
            if dense.token_vectors == "pq"
            else "Both peaks are the encoder's (the floor above plus its activations and outputs while encoding). "
        )
        + "The sharded build streams each block of passages to its shard and never holds more than one shard's "
        "vectors; the unsharded one keeps every passage's index text and vector until BM25 and FAISS are built "
        "over the whole corpus (tens of MB for SciFact).",
        "",
        "The reshard rows copy the parent's stored token vectors through its file in bounded chunks (the "
        "section 'Copying stored token vectors', `--copy-tokens`) and stream the rest to the shards.",
    ]
    summary = [
        {
            "claim": f"{shards}-shard SciFact build peak RSS vs unsharded (streamed shard writes)",
            "figure": f"{many['peak_mb']:,} vs {one['peak_mb']:,} MB ({ratio:.2f}×)",
            "target": "≤ 1.05× (no more than unsharded, within noise)",
            "holds": "yes" if ratio <= 1.05 else "no",
        }
    ]
    append_report(
        f"Sharded builds stream: peak RSS of a {shards}-shard vs an unsharded SciFact build (bench/shard_memory.py)",
        "\n".join(lines),
        summary,
    )


def copy_tokens(index: Path, baseline: str) -> None:
    with tempfile.TemporaryDirectory(prefix="sift-token-copy-") as tmp:
        new = probe(ROOT, "copy-tokens", index, Path(tmp) / "new", 1)
        with source_tree(baseline) as old_tree:
            old = probe(old_tree, "copy-tokens", index, Path(tmp) / "old", 1)
    lines = [
        f"Every stored token vector of `{index}` ({new['passages']:,} passages, {new['tokens']:,} tokens, "
        f"{new['bytes'] / 1e6:,.0f} MB on disk) copied with `TokenWriter.add_stored`, as an update does for its kept "
        "passages and a reshard for all of them; each in a fresh process (ru_maxrss: Python and numpy included).",
        "",
        "| code | peak RSS MB | wall s |",
        "|---|---:|---:|",
        f"| this checkout (reads the file, adjacent passages at once, 8 MB at a time) | **{new['peak_mb']:,}** | "
        f"{new['seconds']:.1f} |",
        f"| `{baseline}` (before: read through the memory map, passage by passage) | {old['peak_mb']:,} | "
        f"{old['seconds']:.1f} |",
    ]
    summary = [
        {
            "claim": "copying a bundle's stored token vectors (update, reshard): peak RSS vs before",
            "figure": f"{new['peak_mb']:,} vs {old['peak_mb']:,} MB ({new['bytes'] / 1e6:,.0f} MB of token vectors)",
            "target": "does not grow with the store",
            "holds": "yes" if new["peak_mb"] < old["peak_mb"] - new["bytes"] / 2e6 else "no",
        }
    ]
    append_report(
        "Copying stored token vectors: peak RSS (bench/shard_memory.py --copy-tokens)", "\n".join(lines), summary
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=SCIFACT / "corpus.jsonl")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="commit whose reshard is measured too ('' to skip)")
    parser.add_argument("--from-log", type=Path, help="report the results an earlier run printed (its stdout)")
    parser.add_argument("--copy-tokens", type=Path, help="an index folder: measure copying its token vectors only")
    parser.add_argument("--copy-baseline", default=COPY_BASELINE, help="commit compared with --copy-tokens")
    parser.add_argument("--note", default="", help="a sentence for the report, e.g. what else ran on the machine")
    args = parser.parse_args()
    if args.copy_tokens:
        copy_tokens(args.copy_tokens.resolve(), args.copy_baseline)
        return
    if args.from_log:
        results = from_log(args.from_log)
        note = f" Figures of the run logged in `{args.from_log.name}`, reported again by `--from-log`. {args.note}"
        report_builds(results, args.corpus, args.shards, args.baseline, note)
        return
    with tempfile.TemporaryDirectory(prefix="sift-shard-memory-") as tmp:
        work = Path(tmp)
        results = {
            "floor": probe(ROOT, "encoder", args.corpus, work / "none", 1),
            "one": probe(ROOT, "build", args.corpus, work / "one", 1),
            "many": probe(ROOT, "build", args.corpus, work / "many", args.shards),
            "resharded": probe(ROOT, "reshard", work / "one", work / "re", args.shards),
        }
        note = f" {args.note}" if args.note else ""
        if args.baseline:
            try:
                with source_tree(args.baseline) as old:
                    results["before"] = probe(old, "reshard", work / "one", work / "re-old", args.shards)
            except RuntimeError as error:  # e.g. a tree older than the bundle's config (pq token vectors)
                lines = str(error).strip().splitlines()
                errors = [i for i, line in enumerate(lines) if "validation error" in line]
                picked = lines[errors[-1] :] if errors else lines[-1:]
                reason = "; ".join(line.strip() for line in picked if "errors.pydantic.dev" not in line)[:400]
                note += (
                    f" The `{args.baseline}` reshard row is missing: that tree could not reshard this build ({reason})."
                )
    report_builds(results, args.corpus, args.shards, args.baseline, note)


if __name__ == "__main__":
    main()
