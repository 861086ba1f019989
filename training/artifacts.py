"""Crash-safe artifact writing shared by the trainer, the indexer and the tools.

Every artifact (model bundle, index version, prepared dataset) is written to a temporary path,
fsynced, and only then renamed into place. A rename within one filesystem is atomic on POSIX, so
a reader sees either the old complete artifact or the new complete one, never a half-written
file, and a crash leaves at most a `.tmp-*` directory that the next run removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

TMP_PREFIX = ".tmp-"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed so that multi-GB embeddings do not load into memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that the names created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under `root` (bottom-up), then `root` itself."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def write_bytes_durable(path: str | os.PathLike[str], data: bytes) -> None:
    """Create `path` (it must not exist) with `data` and fsync it: a file inside a temp directory
    that `atomic_directory` renames as a whole."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def copy_file_durable(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy `src` to the new file `dst` in 1 MiB blocks and fsync it."""
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())


def write_npy_durable(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """`array` as a new .npy file (no pickles), fsynced."""
    with open(path, "xb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` through a fsynced temp file in the same directory + rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _ignore_missing():
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Plain JSON write, for files inside a temp directory that is fsynced and renamed as a whole."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_hashes(root: str | os.PathLike[str], exclude: tuple[str, ...] = ("manifest.json",)) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by '/'-separated relative path, sorted."""
    root = Path(root)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel not in exclude:
                out[rel] = sha256_file(p)
    return out


def check_hashes(root: str | os.PathLike[str], expected: dict[str, str]) -> list[str]:
    """Problems found comparing the files under `root` with `expected` hashes ([] if none)."""
    root = Path(root)
    problems = []
    for rel, digest in sorted(expected.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 mismatch")
    return problems


@contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success fsync it and rename it to `final`.

    On any exception the temp directory is removed and `final` is never created, so a
    directory at `final` is always complete. `final` must not exist yet.
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"refusing to overwrite existing artifact directory {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(path: str | os.PathLike[str], label: str, *, probe: bool = False) -> None:
    """Raise ValueError (naming `label` and `path`) unless `path` is a directory or can be made one.

    For commands that write an artifact only after long work (a fit, an index build): a path that
    is a file, or lies under one, must fail before that work, not at the final write. `probe`
    also creates and removes a temp directory in the nearest existing ancestor, which catches
    read-only or virtual filesystems (/proc) that no permission bit predicts when run as root.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{label} {path}: exists and is not a directory")
    ancestor = path.absolute()
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{label} {path}: cannot be created, {ancestor} is not a directory")
    if probe:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}probe.", dir=ancestor))
        except OSError as e:
            where = "" if ancestor == path.absolute() else f" in {ancestor}"
            raise ValueError(f"{label} {path}: cannot write{where}: {e.strerror or e}") from None


def remove_stale_temps(parent: str | os.PathLike[str], min_age_s: float = 0.0) -> list[Path]:
    """Remove `.tmp-*` leftovers of crashed writers under `parent`; return what was removed.

    Where several writers may share `parent` without a lock (two `trainer fit` runs saving to
    one models directory), pass `min_age_s`: a temp whose newest entry is younger than that may
    belong to a writer still at work, and removing it would make that writer fail.
    """
    removed = []
    parent = Path(parent)
    now = time.time()
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(TMP_PREFIX):
                if min_age_s > 0 and now - _newest_mtime(p) < min_age_s:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with _ignore_missing():
                        p.unlink()
                removed.append(p)
    if removed:
        fsync_dir(parent)
    return removed


def _newest_mtime(path: Path) -> float:
    """Latest modification time of `path` or anything directly inside it (0 if it is gone)."""
    try:
        times = [path.lstat().st_mtime]
        if path.is_dir() and not path.is_symlink():
            times += [c.lstat().st_mtime for c in path.iterdir()]
    except FileNotFoundError:
        return 0.0
    return max(times)


def _ignore_missing() -> contextlib.suppress:
    return contextlib.suppress(FileNotFoundError)
