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
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer import faiss_index as fi

log = logging.getLogger(__name__)

FORMAT = "twotower-index/1"
CURRENT = "current"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
DATA_FILES = ("index.faiss", "embeddings.npy", "item_ids.txt")
MODEL_DIR = "model"
MANIFEST_KEYS = ("format", "index_version", "model_version", "created_at", "count", "dim", "index", "recall", "files")
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]*$")


class IndexVersionError(ValueError):
    """An index version (or the root / `current` pointer) is missing, incomplete or corrupt."""


class VersionNotFoundError(IndexVersionError):
    """The requested version (or a rollback target) does not exist, or the name is invalid."""


class LockHeldError(RuntimeError):
    """Another rebuild / rollback holds INDEX_ROOT/.lock."""


# ---------------------------------------------------------------------------------------------
# small file helpers (durability)


def sha256_file(path: str | os.PathLike[str]) -> str:
    from training.artifacts import sha256_file as _sha

    return _sha(path)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory (a directory fsync makes names created in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes_durable(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_npy_durable(path: Path, array: np.ndarray) -> None:
    with open(path, "xb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _copy_durable(src: Path, dst: Path) -> None:
    with open(src, "rb") as fi_, open(dst, "xb") as fo:
        shutil.copyfileobj(fi_, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())


# ---------------------------------------------------------------------------------------------
# names, listing, pointer


def new_version_name() -> str:
    """`<UTC time with ms>Z-<6 hex>`, the same scheme as model versions: sorts chronologically."""
    from training.bundle import new_version

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
    fsync_path(root)


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


def remove_stale_tmp(root: str | os.PathLike[str]) -> list[Path]:
    """Delete `.tmp-*` leftovers of killed runs. Call only while holding the lock."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if not p.name.startswith(TMP_PREFIX):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p)
    if removed:
        fsync_path(root)
    return removed


def delete_version(root: Path, path: Path) -> None:
    """Delete one version directory under `root`. Renamed first, so a crash mid-delete leaves a
    .tmp-* (cleaned by the next run), not a half-deleted directory that still looks like a version."""
    trash = root / f"{TMP_PREFIX}deleted-{path.name}"
    os.rename(path, trash)
    shutil.rmtree(trash)


def prune(root: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest `keep` versions, never the one `current` points to.

    Deleting a directory is safe for a reader that still has its files open or mapped (the
    inodes live on until closed). Call only while holding the lock.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    cur = read_current(root)
    versions = list_versions(root)
    doomed = [p for p in versions[:-keep] if cur is None or p.resolve() != cur]
    for p in doomed:
        delete_version(root, p)
    if doomed:
        fsync_path(root)
    return doomed


# ---------------------------------------------------------------------------------------------
# verification and loading


def _read_manifest(path: Path) -> dict:
    try:
        with open(path / MANIFEST, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise IndexVersionError(f"{path}: no {MANIFEST} (not an index version)") from None
    except (OSError, ValueError) as e:
        raise IndexVersionError(f"{path}: unreadable {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict):
        raise IndexVersionError(f"{path}: {MANIFEST} is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise IndexVersionError(f"{path}: manifest format {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise IndexVersionError(f"{path}: manifest lacks {missing}")
    return manifest


def _listed_files(path: Path) -> set[str]:
    return {
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.relative_to(path).as_posix() != MANIFEST
    }


def read_item_ids(path: str | os.PathLike[str]) -> list[str]:
    """The ids of `item_ids.txt`: one per line, newline-terminated, in embeddings row order."""
    data = Path(path).read_bytes().decode("utf-8")
    if not data:
        return []
    if not data.endswith("\n"):
        raise IndexVersionError(f"{path}: last line is not newline-terminated (truncated file?)")
    return data[:-1].split("\n")


def verify_version(path: str | os.PathLike[str], *, check_hashes: bool = True) -> dict:
    """Check that a version directory is complete and consistent; return its manifest.

    Checks: manifest format and keys; the name matches `index_version`; every file listed in
    `files` exists with the listed sha256 and no unlisted file exists; `embeddings.npy` is
    float32 (count, dim), finite and unit-norm; `item_ids.txt` has `count` unique ids; the
    index reads back as a supported inner-product index with `count` vectors of `dim` and valid
    search parameters; the copied bundle in `model/` has `model_version` and `dim`, and its own
    checksums. Raises IndexVersionError naming the first problem.

    `check_hashes=False` skips re-hashing the data files (used right after writing them, when
    the hashes were just computed from the same bytes); the copied bundle is always hashed.
    """
    path = Path(path)
    if not path.is_dir():
        raise IndexVersionError(f"{path}: no such index version directory")
    m = _read_manifest(path)
    name = path.resolve().name
    if name not in (m["index_version"], TMP_PREFIX + str(m["index_version"])):
        raise IndexVersionError(f"{path}: directory name does not match manifest index_version {m['index_version']!r}")
    files = m["files"]
    if not isinstance(files, dict):
        raise IndexVersionError(f"{path}: manifest 'files' must be an object")
    required = {*DATA_FILES, f"{MODEL_DIR}/{MANIFEST}"}
    if not required <= set(files):
        raise IndexVersionError(f"{path}: manifest files lack {sorted(required - set(files))}")
    present = _listed_files(path)
    if present - set(files):
        raise IndexVersionError(f"{path}: unlisted file(s) {sorted(present - set(files))}")
    for rel in sorted(files):
        p = path / rel
        if not p.is_file() or p.is_symlink():
            raise IndexVersionError(f"{path}: {rel} is missing")
        if check_hashes and sha256_file(p) != files[rel]:
            raise IndexVersionError(f"{path}: {rel} sha256 mismatch (corrupt or modified)")
    count, dim = m["count"], m["dim"]
    if not isinstance(count, int) or not isinstance(dim, int) or count < 1 or dim < 1:
        raise IndexVersionError(f"{path}: manifest count={count!r}, dim={dim!r} must be positive integers")

    try:
        emb = np.load(path / "embeddings.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexVersionError(f"{path}: embeddings.npy unreadable ({e})") from None
    if emb.dtype != np.float32 or emb.shape != (count, dim):
        raise IndexVersionError(f"{path}: embeddings.npy is {emb.dtype} {emb.shape}, manifest says float32 ({count}, {dim})")
    for s in range(0, count, 1 << 16):
        block = np.asarray(emb[s : s + (1 << 16)])
        try:
            fi.check_unit_rows(fi.as_matrix(block, name="embeddings.npy rows"), name="embeddings.npy rows")
        except ValueError as e:
            raise IndexVersionError(f"{path}: {e}") from None

    ids = read_item_ids(path / "item_ids.txt")
    if len(ids) != count:
        raise IndexVersionError(f"{path}: item_ids.txt has {len(ids)} ids, manifest count is {count}")
    if len(set(ids)) != count:
        raise IndexVersionError(f"{path}: item_ids.txt has duplicate ids")

    try:
        index = fi.read_index(path / "index.faiss")
        fi.validate_search_params(index, (m["index"] or {}).get("search_params"))
    except ValueError as e:
        raise IndexVersionError(f"{path}: {e}") from None
    if index.ntotal != count or index.d != dim:
        raise IndexVersionError(f"{path}: index.faiss holds {index.ntotal} vectors of dim {index.d}, manifest says {count} of {dim}")
    del index

    model_dir = path / MODEL_DIR
    try:
        from training.bundle import BundleError, verify_bundle

        bm = verify_bundle(model_dir)  # small next to the index: always hashed
    except BundleError as e:
        raise IndexVersionError(f"{path}: copied model bundle: {e}") from None
    except (OSError, ValueError) as e:
        raise IndexVersionError(f"{path}: copied model bundle manifest unreadable ({e})") from None
    if bm.get("version") != m["model_version"]:
        raise IndexVersionError(f"{path}: model/ is version {bm.get('version')!r}, manifest model_version is {m['model_version']!r}")
    if bm.get("embedding_dim") not in (None, dim):
        raise IndexVersionError(f"{path}: model embedding_dim {bm.get('embedding_dim')} != index dim {dim}")
    return m


@dataclass
class LoadedIndex:
    """A verified index version in memory: what the service searches and embeds users with.

    `embeddings` is memory-mapped (read-only); `index` has the manifest's search parameters
    applied. `retriever()` wraps both in a `FaissRetriever` (exact scores, exclusions, and a
    guaranteed min(k, catalog − excluded) results).
    """

    path: Path
    manifest: dict
    index: faiss.Index
    item_ids: list[str]
    bundle: Any  # training.bundle.Bundle (None when loaded with load_model=False)
    embeddings: np.ndarray
    _retriever: fi.FaissRetriever | None = field(default=None, repr=False)

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    @property
    def index_version(self) -> str:
        return self.manifest["index_version"]

    @property
    def search_params(self) -> dict:
        return dict((self.manifest.get("index") or {}).get("search_params") or {})

    def retriever(self) -> fi.FaissRetriever:
        if self._retriever is None:
            self._retriever = fi.FaissRetriever(self.index, self.item_ids, self.embeddings)
        return self._retriever


def load_version(path: str | os.PathLike[str], *, verify: bool = True, load_model: bool = True) -> LoadedIndex:
    """Load an index version (a version directory, or `INDEX_ROOT/current`).

    The path is resolved first, so passing `current` loads one consistent version even if a
    rebuild switches the pointer meanwhile. With `verify` (default) every checksum is checked
    first (seconds for a 1M-item catalog).
    """
    path = Path(path).resolve()
    manifest = verify_version(path) if verify else _read_manifest(path)
    index = fi.read_index(path / "index.faiss")
    fi.apply_search_params(index, (manifest["index"] or {}).get("search_params"))
    ids = read_item_ids(path / "item_ids.txt")
    emb = np.load(path / "embeddings.npy", mmap_mode="r", allow_pickle=False)
    bundle = None
    if load_model:
        from training.bundle import load_bundle

        bundle = load_bundle(path / MODEL_DIR, verify=False)  # its files were just verified
        if bundle.version != manifest["model_version"]:
            raise IndexVersionError(f"{path}: model/ is version {bundle.version!r}, manifest says {manifest['model_version']!r}")
    return LoadedIndex(path=path, manifest=manifest, index=index, item_ids=ids, bundle=bundle, embeddings=emb)


# ---------------------------------------------------------------------------------------------
# writing


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
    accept: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete version directory and return its final path (not yet `current`).

    Everything goes to `root/.tmp-<version>/`; each file is fsynced as written, the directories
    are fsynced, the result is verified as a reader would, then `accept(tmp_dir)` runs (the
    indexer passes the service's own acceptance check, which raises to refuse the version), and
    only then is it renamed to `root/<version>` (and `root` fsynced): a refused version never
    appears under a version name. Call while holding the lock.
    `checkpoint(stage)` is a test hook called between steps.
    """
    root = Path(root)
    check_version_name(version)
    final = root / version
    tmp = root / f"{TMP_PREFIX}{version}"
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
    cb = checkpoint or (lambda stage: None)

    tmp.mkdir(parents=True)
    try:
        (tmp / MODEL_DIR).mkdir()
        src = Path(bundle_path)
        for p in sorted(src.iterdir()):
            if p.is_dir() or p.is_symlink() or p.name.startswith("."):
                continue
            _copy_durable(p, tmp / MODEL_DIR / p.name)
        fsync_path(tmp / MODEL_DIR)
        cb("write:model")
        _save_npy_durable(tmp / "embeddings.npy", emb)
        _write_bytes_durable(tmp / "item_ids.txt", "".join(i + "\n" for i in ids).encode("utf-8"))
        cb("write:embeddings")
        fi.write_index(index, tmp / "index.faiss")
        files = {rel: sha256_file(tmp / rel) for rel in sorted(_listed_files(tmp))}
        manifest = {
            "format": FORMAT,
            "index_version": version,
            "model_version": model_version,
            "created_at": _utc_now(),
            "count": len(ids),
            "dim": int(emb.shape[1]),
            "index": index_info,
            "recall": recall,
            **(extra or {}),
            "files": files,
        }
        _write_bytes_durable(tmp / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        fsync_path(tmp)
        cb("write:manifest")
        # read back as a reader would; the data files' hashes were just computed from these
        # bytes, so only the copied bundle is re-hashed (against its own manifest)
        try:
            verify_version(tmp, check_hashes=False)
        except IndexVersionError as e:
            # the temp directory is deleted below: name the version, not a path that is gone
            raise IndexVersionError(str(e).replace(str(tmp), f"new version {version}")) from None
        if accept is not None:
            accept(tmp)
        os.rename(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _utc_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


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


