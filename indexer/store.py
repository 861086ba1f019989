"""Index version directories and the `current` pointer (docs/design.md, "Index version").

Layout of an index root::

    INDEX_ROOT/
      current -> 20261123T093012123Z-3f9a1c     relative symlink, switched atomically
      20261122T020000456Z-a1b2c3/                an older version, kept for rollback
      20261123T093012123Z-3f9a1c/
        manifest.json   model/   index.faiss   embeddings.npy   item_ids.txt
      .lock                                      flock'ed by rebuild / rollback / prune
      .tmp-<version>/                            a version being written (or left by a crash)

Invariants, which make a rebuild killed at any instant harmless:

- a version directory appears under its final name only complete, fsynced and verified
  (written as `.tmp-<version>`, then renamed);
- `current` only ever points at such a directory and is switched with `os.replace` of a
  temporary symlink, which POSIX makes atomic: a reader sees the old or the new target;
- a version directory is never modified after its rename. The service may have
  memory-mapped its files, and rewriting a mapped file in place crashes the reader (SIGBUS);
  retention deletes whole old directories, which is safe for open mappings on POSIX.

Readers should resolve `current` once (`read_current`) and read every file from the resolved
directory, never through `current/…` paths, so one load cannot mix two versions.

What is inside one version directory, and what makes it servable, is `indexer.version`'s; this
module manages the root: names, the pointer, the lock, retention, publishing and rollback.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import faiss
import numpy as np

from indexer import faiss_index as fi
from indexer.attributes import AttributeTable
from indexer.version import (
    MANIFEST,
    IndexVersionError,
    VerifiedBase,
    read_manifest,
    verify_version,
    write_delta_files,
    write_files,
)
from training.artifacts import TMP_PREFIX, atomic_directory, fsync_dir, remove_stale_temps
from training.bundle import new_version

log = logging.getLogger(__name__)

CURRENT = "current"
LOCK_FILE = ".lock"
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]*$")

__all__ = [
    "CURRENT", "IndexVersionError", "LockHeldError", "VersionNotFoundError", "check_version_name", "delete_version",
    "list_versions", "locked", "new_version_name", "prune", "publishing", "read_current", "remove_stale_temps", "rollback",
    "switch_current", "version_path", "write_delta_version", "write_version",
]


class VersionNotFoundError(IndexVersionError):
    """The requested version (or a rollback target) does not exist, or the name is invalid."""


class LockHeldError(RuntimeError):
    """Another rebuild / rollback holds INDEX_ROOT/.lock."""


# ---------------------------------------------------------------------------------------------
# names, listing, pointer


def new_version_name() -> str:
    """`<UTC time with ms>Z-<6 hex>`, the same scheme as model versions: sorts chronologically."""
    return new_version()


def check_version_name(name: str) -> str:
    """Reject names that could escape the root or collide with our own entries."""
    if not isinstance(name, str) or not _VERSION_RE.match(name) or name == CURRENT or name.startswith(TMP_PREFIX):
        raise VersionNotFoundError(f"invalid index version name {name!r}")
    return name


def list_versions(root: str | os.PathLike[str]) -> list[Path]:
    """Complete-looking version directories under `root`, oldest first (by name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.name.startswith(".") or p.name == CURRENT or p.is_symlink() or not p.is_dir():
            continue
        if (p / MANIFEST).is_file():
            out.append(p)
    return sorted(out, key=lambda p: p.name)


def read_current(root: str | os.PathLike[str]) -> Path | None:
    """The version directory `INDEX_ROOT/current` points to (resolved), or None if unset.

    Raises IndexVersionError when `current` exists but is not a symlink to a version
    directory inside `root` (a dangling or hand-edited pointer must not look like "no index").
    """
    root = Path(root)
    link = root / CURRENT
    if not link.is_symlink():
        if link.exists():
            raise IndexVersionError(f"{link} exists but is not a symlink")
        return None
    target = os.readlink(link)
    if "/" in target or target in (".", ".."):
        raise IndexVersionError(f"{link} points to {target!r}; expected a version directory name in {root}")
    path = root / target
    if not path.is_dir():
        raise IndexVersionError(f"{link} points to {target!r}, which does not exist")
    return path.resolve()


def version_path(root: str | os.PathLike[str], version: str) -> Path:
    """`root/version`, checked to be an existing version directory."""
    path = Path(root) / check_version_name(version)
    if not (path / MANIFEST).is_file():
        raise VersionNotFoundError(f"no index version {version!r} in {root}")
    return path


def switch_current(root: str | os.PathLike[str], version: str) -> None:
    """Point `root/current` at `version` atomically (temp symlink + os.replace + dir fsync)."""
    root = Path(root)
    version_path(root, version)
    tmp = root / f"{TMP_PREFIX}current-{secrets.token_hex(4)}"
    os.symlink(version, tmp)
    try:
        os.replace(tmp, root / CURRENT)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(root)


# ---------------------------------------------------------------------------------------------
# lock, cleanup, retention


@contextmanager
def locked(root: str | os.PathLike[str]) -> Iterator[None]:
    """Hold INDEX_ROOT/.lock exclusively, failing fast (LockHeldError) if another holder exists.

    flock is released by the kernel when the holder dies, even by SIGKILL, so a crashed
    rebuild never leaves a stale lock behind (unlike a pid file).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                raise LockHeldError(
                    f"{root / LOCK_FILE} is held by another indexer run ({holder or 'pid unknown'}); not starting"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def publishing(root: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """What every job that publishes into an index root (rebuild, update) does first: hold the
    lock (`locked`: fails fast with LockHeldError) and remove the `.tmp-*` leftovers of runs
    that were killed; yields the removed paths. Only a lock holder may remove temps: without
    the lock they could be another run's work in progress."""
    root = Path(root)
    with locked(root):
        cleaned = remove_stale_temps(root)
        if cleaned:
            log.info("removed %d leftover temp entr(ies) of an interrupted run: %s", len(cleaned), [p.name for p in cleaned])
        yield cleaned


def delete_version(root: Path, path: Path) -> None:
    """Delete one version directory under `root`. Renamed first, so a crash mid-delete leaves a
    .tmp-* (cleaned by the next run), not a half-deleted directory that still looks like a version."""
    trash = root / f"{TMP_PREFIX}deleted-{path.name}"
    os.rename(path, trash)
    shutil.rmtree(trash)


def base_of(path: Path) -> str | None:
    """The base version a delta version references (None: a full version, or unreadable)."""
    try:
        return (read_manifest(path).get("delta") or {}).get("base")
    except IndexVersionError:
        return None


def prune(root: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest `keep` versions, never the one `current` points to, nor a base
    that a kept delta version (or `current`) shares its index with.

    Deleting a directory is safe for a reader that still has its files open or mapped (the
    inodes live on until closed). Call only while holding the lock.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    cur = read_current(root)
    versions = list_versions(root)
    kept = [p for p in versions[-keep:]] + ([cur] if cur is not None else [])
    referenced = {b for b in (base_of(p) for p in kept) if b}
    doomed = [
        p for p in versions[:-keep] if (cur is None or p.resolve() != cur) and p.name not in referenced
    ]
    for p in doomed:
        delete_version(root, p)
    if doomed:
        fsync_dir(root)
    return doomed


# ---------------------------------------------------------------------------------------------
# publishing


def write_version(
    root: str | os.PathLike[str],
    version: str,
    *,
    index: faiss.Index,
    embeddings: np.ndarray,
    item_ids: Sequence[str],
    bundle_path: str | os.PathLike[str],
    model_version: str,
    index_info: dict,
    recall: dict | None,
    extra: dict | None = None,
    checkpoint: Callable[[str], None] | None = None,
    accept: Callable[[Path], object] | None = None,
    attributes: AttributeTable | None = None,
    fingerprints: np.ndarray | None = None,
) -> Path:
    """Write a complete version directory and return its final path (not yet `current`).

    Everything goes to a `root/.tmp-<version>.*` directory (`training.artifacts.atomic_directory`:
    each file fsynced, the directory fsynced, renamed, `root` fsynced). Before the rename the
    written files are checked as a reader would: by `accept(tmp_dir)` when given (the indexer
    passes `indexer.version.load_version`, the service's own acceptance check, which raises to
    refuse the version), else by `verify_version`; a refused version never appears under a version
    name. Call while holding the lock. `checkpoint(stage)` is a test hook called between steps.
    """
    root = Path(root)
    check_version_name(version)
    final = root / version
    if final.exists():
        raise IndexVersionError(f"{final} already exists; version directories are never overwritten")
    emb = fi.as_matrix(embeddings, name="embeddings")
    ids = [str(i) for i in item_ids]
    if len(ids) != len(emb):
        raise ValueError(f"{len(ids)} item ids for {len(emb)} embedding rows")
    bad = next((i for i in ids if "\n" in i or "\r" in i), None)
    if bad is not None:
        raise ValueError(f"item id {bad!r} contains a line break; item_ids.txt holds one id per line")
    if index.ntotal != len(emb) or index.d != emb.shape[1]:
        raise ValueError(f"index holds {index.ntotal}x{index.d}, embeddings are {emb.shape}")
    with atomic_directory(final) as tmp:
        write_files(
            tmp, index=index, embeddings=emb, item_ids=ids, bundle_path=bundle_path, checkpoint=checkpoint,
            attributes=attributes, fingerprints=fingerprints,
            manifest={"index_version": version, "model_version": model_version, "index": index_info, "recall": recall,
                      **(extra or {})},
        )
        _accept(tmp, version, accept)
    return final


def _accept(tmp: Path, version: str, accept: Callable[[Path], object] | None) -> None:
    """Read a just-written version back as a reader would, before it is renamed into place
    (`accept`, e.g. the service's own load, or `verify_version`). The data files' hashes were
    just computed from these bytes, so only the copied bundle is re-hashed. The temp directory
    is deleted on the way out: an error names the version, not a path that is gone."""
    try:
        if accept is not None:
            accept(tmp)
        else:
            verify_version(tmp, check_hashes=False)
    except IndexVersionError as e:
        raise type(e)(str(e).replace(str(tmp), f"new version {version}")) from None


def write_delta_version(
    root: str | os.PathLike[str],
    version: str,
    *,
    base: VerifiedBase,
    delta_embeddings: np.ndarray,
    delta_ids: Sequence[str],
    delta_fingerprints: np.ndarray,
    tombstones: np.ndarray,
    bundle_path: str | os.PathLike[str],
    model_version: str,
    index_info: dict,
    recall: dict | None = None,
    extra: dict | None = None,
    checkpoint: Callable[[str], None] | None = None,
    accept: Callable[[Path], object] | None = None,
    attributes: AttributeTable | None = None,
) -> Path:
    """`write_version` for a delta version (`indexer.version.write_delta_files`) over `base`, a
    full version in `root` as opened by `indexer.version.open_base`: the same temp directory,
    fsync, acceptance check before the rename."""
    root = Path(root)
    check_version_name(version)
    final = root / version
    if final.exists():
        raise IndexVersionError(f"{final} already exists; version directories are never overwritten")
    bad = next((i for i in delta_ids if "\n" in i or "\r" in i), None)
    if bad is not None:
        raise ValueError(f"item id {bad!r} contains a line break; item_ids.txt holds one id per line")
    with atomic_directory(final) as tmp:
        write_delta_files(
            tmp, base=base, delta_embeddings=delta_embeddings, delta_ids=delta_ids,
            delta_fingerprints=delta_fingerprints, tombstones=tombstones, bundle_path=bundle_path,
            checkpoint=checkpoint, attributes=attributes,
            manifest={"index_version": version, "model_version": model_version, "index": index_info, "recall": recall,
                      **(extra or {})},
        )
        _accept(tmp, version, accept)
    return final


# ---------------------------------------------------------------------------------------------
# rollback


def rollback(root: str | os.PathLike[str], version: str | None = None) -> Path:
    """Point `current` at `version`, or at the newest version older than the current one.

    The target is fully verified first; a corrupt target leaves `current` unchanged. Takes
    the lock, so it cannot interleave with a rebuild's switch or retention.
    """
    root = Path(root)
    with locked(root):
        cur = read_current(root)
        if version is None:
            if cur is None:
                raise VersionNotFoundError(f"{root}: no current index version to roll back from")
            older = [p for p in list_versions(root) if p.name < cur.name]
            if not older:
                raise VersionNotFoundError(f"{root}: no version older than the current {cur.name} to roll back to")
            target = older[-1]
        else:
            target = version_path(root, version)
        verify_version(target)
        switch_current(root, target.name)
        log.info("current -> %s (was %s)", target.name, cur.name if cur else None)
        return target.resolve()


