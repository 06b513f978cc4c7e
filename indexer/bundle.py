"""The on-disk index bundle: layout, manifest, atomic publish, load and verification.

Layout under an output folder::

    <out>/<build-id>/manifest.json   format version, models, counts, parameters, sha256 of every file
    <out>/<build-id>/docstore.sqlite
    <out>/<build-id>/bm25/...
    <out>/<build-id>/dense/index.faiss, embeddings.f16.npy
    <out>/current -> <build-id>       symlink, switched atomically after a build completes

A build writes into `<out>/.building-<build-id>/` and is renamed into place only when complete, then
`current` is swapped with `os.replace`; a killed build therefore never touches what is published.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCSTORE = "docstore.sqlite"
BM25_DIR = "bm25"
DENSE_DIR = "dense"
CURRENT = "current"
BUILDING_PREFIX = ".building-"
PID_FILE = ".pid"  # in a build folder until it is published: the building process (stale-build cleanup reads it)
LOCK = ".lock"
UPDATE_LOCK = ".update.lock"  # one update of an index folder at a time (CLI updates, ingest applies)


class BundleError(RuntimeError):
    """A bundle that is missing, incomplete or damaged; the message says what to do."""


def publish_folder(work: Path, target: Path, ready: str) -> None:
    """Move the finished folder `work` to `target` in one rename. Another process may have published the same
    content first (its `target/ready` file exists): that copy is kept and `work` removed."""
    try:
        os.replace(work, target)
    except OSError:
        if not (target / ready).exists():
            raise
    shutil.rmtree(work, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    """The files a manifest lists: all but the manifest and a build folder's owner file (`.pid`)."""
    owner = root / PID_FILE
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST and p != owner)


def link_tree(source: Path, target: Path) -> None:
    """Copy the build folder `source` into `target` (created, or kept if it exists) by hard links: published
    files are never written again, so sharing them is safe. Every `manifest.json` (the build's, a shard's) is
    copied instead: a `BuildLease` locks its inode, so the copy's lease is not the source's, and a manifest
    sealed afresh over it leaves the source's alone. A file system without hard links gets copies."""

    def place(src: str, dst: str) -> None:
        if Path(src).name != MANIFEST:
            try:
                os.link(src, dst)
                return
            except OSError:
                pass
        shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=place, dirs_exist_ok=True)


def _fsync_tree(root: Path) -> None:
    for path in [*_files(root), root / MANIFEST]:
        if path.exists():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def new_build_id() -> str:
    """Sortable, unique: UTC time plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def seal_folder(root: Path, manifest: dict[str, Any], build_id: str) -> None:
    """Write `root/manifest.json`: `manifest` plus the format version, the build id and the sha256 and size of
    every file under `root` (a shard's own manifest excepted: each shard seals its own folder), then fsync."""
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["build_id"] = build_id
    manifest["files"] = {
        str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in _files(root)
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _fsync_tree(root)


class BundleWriter:
    """Owns the temporary build folder; `publish()` makes it visible atomically, `abort()` removes it."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.build_id = new_build_id()
        self.root = self.out / f"{BUILDING_PREFIX}{self.build_id}"
        with folder_lock(self.out):  # created with its owner's pid under the lock, so that another build's
            # cleanup (under the same lock) never sees it without one and takes it for a killed build's
            self.root.mkdir()
            (self.root / PID_FILE).write_text(str(os.getpid()))
            cleanup_stale_builds(self.out)

    def publish(self, manifest: dict[str, Any], switch: bool = True) -> Path:
        """Write the manifest with checksums, move the build into place and (unless `switch` is False, e.g.
        while a quality gate decides) switch `current` to it."""
        seal_folder(self.root, manifest, self.build_id)  # the owner file stays (unlisted) until the rename,
        final = self.out / self.build_id  # so that no other build's cleanup takes this one for a killed build's
        with folder_lock(self.out):
            (self.root / PID_FILE).unlink(missing_ok=True)
            os.rename(self.root, final)
            if switch:
                _switch_current(self.out, self.build_id)
        return final

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _switch_current(out: Path, build_id: str) -> None:
    link_tmp = out / f".{CURRENT}-{build_id}"
    os.symlink(build_id, link_tmp)
    os.replace(link_tmp, out / CURRENT)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def switch_current(out: Path, build_id: str) -> None:
    """Point `out/current` at a published build (atomically, under the folder lock)."""
    with folder_lock(out):
        if not (Path(out) / build_id / MANIFEST).exists():
            raise BundleError(f"{out}/{build_id}: no published build to switch to")
        _switch_current(Path(out), build_id)


def discard_build(out: Path, build_id: str) -> None:
    """Remove a published build that never became current (e.g. refused by the quality gate)."""
    with folder_lock(out):
        current = os.readlink(Path(out) / CURRENT) if (Path(out) / CURRENT).is_symlink() else None
        if build_id == current:
            raise BundleError(f"{build_id} is current; refusing to delete it")
        _delete_build(Path(out), build_id)


def _delete_build(out: Path, build_id: str) -> None:
    """Renamed first (a reader never sees a half-deleted build under its published name), then removed;
    a crash in between leaves a temporary folder the next build cleans up. Call under `folder_lock`."""
    doomed = out / f"{BUILDING_PREFIX}deleted-{build_id}"
    os.rename(out / build_id, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on an index folder (`<out>/.lock`, flock: released when the process dies) held
    while a build publishes, stale builds are cleaned up or old builds are pruned, so that concurrent
    builds into one folder never remove each other's files."""
    fd = os.open(Path(out) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def update_lock(out: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """The exclusive lock of an index folder's updates (`<out>/.update.lock`, flock: released when the process
    dies), held from reading the parent build to publishing the child, so that two updates (`sift index update`,
    or the server's applying of ingested batches) never both derive from one parent and lose each other's
    changes. `on_wait` is called once if another update holds it."""
    fd = os.open(Path(out) / UPDATE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class BuildLease:
    """A shared lock on a published build's manifest, held by every process that serves the build.
    `prune_builds` never deletes a build somebody holds; the lock dies with the process. Taking it only
    opens the manifest read-only: the server never writes into a bundle."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._fd: int | None = os.open(self.root / MANIFEST, os.O_RDONLY)
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def build_in_use(root: Path) -> bool:
    """True when some process holds a `BuildLease` on the build."""
    try:
        fd = os.open(Path(root) / MANIFEST, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def prune_builds(out: Path, keep: int) -> tuple[list[str], list[str]]:
    """Delete all but the newest `keep` published builds (never the one `current` points at, never one a
    server holds a lease on). Returns (deleted ids, kept-because-in-use ids)."""
    if keep < 1:
        raise ValueError("keep must be at least 1 (the current build is never deleted)")
    out = Path(out)
    deleted, in_use = [], []
    with folder_lock(out):
        current = os.readlink(out / CURRENT) if (out / CURRENT).is_symlink() else None
        builds = list_builds(out)
        for build_id in builds[: max(0, len(builds) - keep)]:
            if build_id == current:
                continue
            if build_in_use(out / build_id):
                in_use.append(build_id)
                continue
            _delete_build(out, build_id)
            deleted.append(build_id)
    return deleted, in_use


def cleanup_stale_builds(out: Path) -> list[Path]:
    """Remove leftovers of killed builds (temporary folders whose process is gone, dangling link temps).
    Call with `folder_lock(out)` held."""
    removed = []
    for path in Path(out).glob(f"{BUILDING_PREFIX}*"):
        pid_file = path / PID_FILE
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            pid = -1
        if pid != os.getpid() and (pid < 0 or not _pid_alive(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for link in Path(out).glob(f".{CURRENT}-*"):
        link.unlink(missing_ok=True)
        removed.append(link)
    return removed


def resolve_bundle(path: Path) -> Path:
    """A bundle folder from either the folder itself or an output folder holding `current`."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    if (path / CURRENT).exists():
        return (path / CURRENT).resolve()
    if not path.exists():
        raise BundleError(f"{path}: no such bundle; build one with `sift index build --input DOCS --out {path}`")
    raise BundleError(
        f"{path}: neither a bundle (no {MANIFEST}) nor an index folder with a '{CURRENT}' link; "
        f"build one with `sift index build --input DOCS --out {path}`"
    )


@dataclass(frozen=True)
class BundleInfo:
    """A resolved, verified bundle folder and its manifest."""

    root: Path
    manifest: dict[str, Any]

    @property
    def build_id(self) -> str:
        return str(self.manifest["build_id"])

    def path(self, relative: str) -> Path:
        return self.root / relative


def open_bundle(path: Path, verify: bool = True) -> BundleInfo:
    """Resolve and check a bundle: manifest readable, format known, every file present with its sha256."""
    root = resolve_bundle(path)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{root}/{MANIFEST}: unreadable manifest ({exc}); rebuild the bundle") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{root}: bundle format {version!r}, this Sift reads format {FORMAT_VERSION}; rebuild with this version"
        )
    files = manifest.get("files") or {}
    shards = [entry["name"] for entry in (manifest.get("shards") or {}).get("map") or []]
    for name in shards:  # a sharded build: each shard is a bundle of its own, checked by its own manifest
        if not (root / name / MANIFEST).is_file():
            raise BundleError(f"{root}/{name}: shard listed in the manifest but missing; rebuild the bundle")
    if not shards and DOCSTORE not in files:
        raise BundleError(f"{root}: manifest lists no {DOCSTORE}; rebuild the bundle")
    for relative, entry in files.items():
        file = root / relative
        if not file.is_file():
            raise BundleError(f"{file}: listed in the manifest but missing; the bundle is incomplete, rebuild it")
        if file.stat().st_size != entry["bytes"]:
            raise BundleError(
                f"{file}: size {file.stat().st_size} bytes, manifest says {entry['bytes']}; "
                "the bundle is damaged, rebuild it"
            )
        if verify and sha256_file(file) != entry["sha256"]:
            raise BundleError(f"{file}: sha256 does not match the manifest; the bundle is damaged, rebuild it")
    return BundleInfo(root=root, manifest=manifest)


def list_builds(out: Path) -> list[str]:
    """Published build ids under an output folder, oldest first."""
    return sorted(
        p.name
        for p in Path(out).iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and (p / MANIFEST).exists()
    )


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
