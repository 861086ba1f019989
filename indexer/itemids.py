"""A catalog's item ids as a memory-mapped column: row -> id and id -> row without Python objects.

A served version answers "which id is row r" for every result and "which row is id x" for
`POST /similar` and the delta checks. Held as a Python list of str plus a dict, that costs ~70
bytes of private memory an item in every serving worker (docs/bench/bigindex.md: 61-70 MiB a
million items; 7 GB at 100M) and a `gc.freeze` over 100M objects. `ItemIds` answers both from
numpy arrays over files that are memory-mapped (page cache, shared by every worker on the
machine, paged in only where a lookup touches them):

* the ids themselves are `item_ids.txt` (INTERFACES.md §2: one utf-8 id a line, row order),
  memory-mapped as bytes; `ids/offsets.npy` (int64, n + 1) holds where each line starts (and
  the end of the file), so id r is `blob[offsets[r] : offsets[r + 1] - 1]`;
* `ids/hashes.npy` (uint64, n, ascending) holds a 64-bit BLAKE2b hash of every id in sorted
  order and `ids/rows.npy` (int64, n) the row of each: id -> row is a binary search
  (`np.searchsorted`) for the id's hash and a byte comparison of the candidates (a collision
  only costs one more comparison). No dict of n entries is ever built.

A version written before the column existed (no `ids/`) still loads: `ItemIds.from_text` builds
the same arrays in private memory from item_ids.txt (~24 bytes an item plus the text, a third
of the list's cost; building them hashes every id, ~1 µs each). The acceptance check
(`check`, called by `indexer.version.verify_version`) validates the arrays against each other
and the text: shapes, dtypes, offsets increasing and ending on newlines, exactly n newlines,
hashes ascending, rows a permutation, a sample of ids hashing to their entries, and no two
equal ids (equal ids have equal, hence adjacent, hashes: only those pairs are compared). The
files' bytes are pinned by the manifest's sha256 in any case.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

__all__ = ["COLUMN_DIR", "COLUMN_FILES", "COLUMN_FORMAT", "ItemIds", "id_hash", "id_hashes", "write_id_column"]

COLUMN_FORMAT = "twotower-ids/1"  # the manifest's `item_id_column`
COLUMN_DIR = "ids"
COLUMN_FILES = tuple(f"{COLUMN_DIR}/{f}" for f in ("offsets.npy", "hashes.npy", "rows.npy"))
CHECK_BLOCK = 1 << 22  # elements per block of the column checks (bounded temporary memory)
CHECK_SAMPLE = 64  # ids re-hashed by `check`
NEWLINE = 10


def id_hash(item_id: bytes) -> int:
    """The 64-bit hash of one utf-8 encoded id (BLAKE2b, 8-byte digest, little-endian)."""
    return int.from_bytes(hashlib.blake2b(item_id, digest_size=8).digest(), "little")


def id_hashes(encoded: Sequence[bytes]) -> np.ndarray:
    """`id_hash` of every id, as a uint64 array (~1 µs an id)."""
    digests = b"".join(hashlib.blake2b(b, digest_size=8).digest() for b in encoded)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def _encode(ids: Sequence[str]) -> tuple[bytes, list[bytes]]:
    encoded = [str(i).encode("utf-8") for i in ids]
    bad = next((b for b in encoded if b"\n" in b), None)
    if bad is not None:
        raise ValueError(f"item id {bad.decode()!r} contains a line break; item_ids.txt holds one id per line")
    return b"".join(b + b"\n" for b in encoded), encoded


def _lookup_arrays(encoded: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(b) + 1 for b in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    hashes = id_hashes(encoded)
    rows = np.argsort(hashes, kind="stable").astype(np.int64)
    return offsets, hashes[rows], rows


def write_id_column(directory: Path, ids: Sequence[str], write_npy: Any) -> None:
    """Write `directory/ids/` for the ids of `directory/item_ids.txt` (same order).
    `write_npy(path, array)` writes one .npy durably (`training.artifacts.write_npy_durable`)."""
    _, encoded = _encode(ids)
    offsets, hashes, rows = _lookup_arrays(encoded)
    (directory / COLUMN_DIR).mkdir(exist_ok=True)
    for rel, arr in zip(COLUMN_FILES, (offsets, hashes, rows), strict=True):
        write_npy(directory / rel, arr)


def _map_bytes(path: Path) -> bytes | mmap.mmap:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class ItemIds(Sequence[str]):
    """The ids of a catalog's rows (module docstring): a read-only sequence of str (`ids[r]`,
    `ids.take(rows)`) with an id -> row lookup (`ids.row(x)`, `ids.rows`: a Mapping view)."""

    def __init__(self, blob: bytes | mmap.mmap, offsets: np.ndarray, hashes: np.ndarray, rows: np.ndarray) -> None:
        self._blob = blob
        self._offsets = offsets.view(np.ndarray)
        self._hashes = hashes.view(np.ndarray)
        self._rows = rows.view(np.ndarray)
        self._n = len(offsets) - 1

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_list(cls, ids: Sequence[str]) -> ItemIds:
        """In memory, from ids in row order; ValueError for a duplicate or a line break."""
        blob, encoded = _encode(ids)
        out = cls(blob, *_lookup_arrays(encoded))
        dup = out.first_duplicate()
        if dup is not None:
            raise ValueError(f"item ids must be unique; {dup!r} appears more than once")
        return out

    @classmethod
    def from_text(cls, path: str | os.PathLike[str]) -> ItemIds:
        """In memory, from an item_ids.txt (a version written before the column existed)."""
        data = Path(path).read_bytes()
        if data and not data.endswith(b"\n"):
            raise ValueError(f"{path}: last line is not newline-terminated (truncated file?)")
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == NEWLINE)
        offsets = np.concatenate([[0], ends + 1]).astype(np.int64)
        encoded = [data[s:e] for s, e in zip(offsets[:-1].tolist(), (offsets[1:] - 1).tolist(), strict=True)]
        hashes = id_hashes(encoded)
        rows = np.argsort(hashes, kind="stable").astype(np.int64)
        return cls(data, offsets, hashes[rows], rows)

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> ItemIds:
        """Memory-map `directory`'s item_ids.txt and ids/ column (call `check` before trusting
        files that were not just written). OSError/ValueError for a missing or unreadable file."""
        d = Path(directory)
        arrays = [np.load(d / rel, mmap_mode="r", allow_pickle=False) for rel in COLUMN_FILES]
        return cls(_map_bytes(d / "item_ids.txt"), *arrays)

    # ---- the acceptance check --------------------------------------------------------------
    def check(self, count: int) -> None:
        """ValueError naming the first inconsistency (module docstring) for a catalog of `count`."""
        n, off, h, rows = self._n, self._offsets, self._hashes, self._rows
        blob = np.frombuffer(self._blob, dtype=np.uint8)
        newlines = sum(int(np.count_nonzero(blob[s : s + CHECK_BLOCK * 8] == NEWLINE))
                       for s in range(0, len(blob), CHECK_BLOCK * 8))
        if newlines != count:
            raise ValueError(f"item_ids.txt has {newlines} ids, manifest count is {count}")
        for name, arr, dtype, shape in (("offsets", off, np.int64, (count + 1,)), ("hashes", h, np.uint64, (count,)),
                                        ("rows", rows, np.int64, (count,))):
            if arr.dtype != dtype or arr.shape != shape:
                raise ValueError(f"{COLUMN_DIR}/{name}.npy is {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}")
        if n == 0:
            return
        if off[0] != 0 or off[-1] != len(blob):
            raise ValueError(f"{COLUMN_DIR}/offsets.npy spans [{off[0]}, {off[-1]}], item_ids.txt holds {len(blob)} bytes")
        seen = np.zeros(n, dtype=bool)
        for s in range(0, n, CHECK_BLOCK):
            o = np.asarray(off[s : s + CHECK_BLOCK + 1])
            if (np.diff(o) < 1).any():
                raise ValueError(f"{COLUMN_DIR}/offsets.npy is not increasing near row {s}")
            if (blob[o[1:] - 1] != NEWLINE).any():
                raise ValueError(f"{COLUMN_DIR}/offsets.npy does not match item_ids.txt's lines near row {s}")
            hb = np.asarray(h[s : s + CHECK_BLOCK + 1])
            if (hb[1:] < hb[:-1]).any():
                raise ValueError(f"{COLUMN_DIR}/hashes.npy is not sorted near entry {s}")
            rb = np.asarray(rows[s : s + CHECK_BLOCK])
            if rb.min() < 0 or rb.max() >= n:
                raise ValueError(f"{COLUMN_DIR}/rows.npy holds rows outside [0, {n})")
            seen[rb] = True
        if not seen.all():
            raise ValueError(f"{COLUMN_DIR}/rows.npy is not a permutation of the {n} rows")
        for i in np.unique(np.linspace(0, n - 1, min(CHECK_SAMPLE, n)).astype(np.int64)).tolist():
            if id_hash(self._bytes(int(rows[i]))) != int(h[i]):
                raise ValueError(f"{COLUMN_DIR}/hashes.npy entry {i} is not the hash of row {int(rows[i])}'s id")
        dup = self.first_duplicate()
        if dup is not None:
            raise ValueError(f"item_ids.txt has duplicate ids ({dup!r})")

    def first_duplicate(self) -> str | None:
        """An id that appears twice, or None (only ids with equal hashes are compared)."""
        h = self._hashes
        for s in range(0, self._n, CHECK_BLOCK):
            hb = np.asarray(h[s : s + CHECK_BLOCK + 1])
            for j in (np.flatnonzero(hb[1:] == hb[:-1]) + s).tolist():
                a, b = self._bytes(int(self._rows[j])), self._bytes(int(self._rows[j + 1]))
                if a == b:
                    return a.decode("utf-8")
                # a hash collision of two different ids: a third equal hash could still repeat one
                run = self._rows[j : np.searchsorted(h, h[j], side="right")]
                names = [self._bytes(int(r)) for r in run]
                if len(set(names)) != len(names):
                    return next(x for x in names if names.count(x) > 1).decode("utf-8")
        return None

    # ---- row -> id -------------------------------------------------------------------------
    def _bytes(self, r: int) -> bytes:
        off = self._offsets
        return self._blob[int(off[r]) : int(off[r + 1]) - 1]

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, r: int) -> str: ...
    @overload
    def __getitem__(self, r: slice) -> list[str]: ...
    def __getitem__(self, r: Any) -> Any:
        if isinstance(r, slice):
            return self.take(np.arange(self._n)[r])
        r = int(r)
        if r < 0:
            r += self._n
        if not 0 <= r < self._n:
            raise IndexError(f"row {r} outside the catalog's {self._n} rows")
        return self._bytes(r).decode("utf-8")

    def take(self, rows: Any) -> list[str]:
        """The ids of `rows` (valid row numbers), one gather of their offsets."""
        rows = np.asarray(rows, dtype=np.int64)
        off, blob = self._offsets, self._blob
        # ~0.2 µs an id (a slice of the mapped text and its decode) + ~3 µs a call, against
        # ~0.07 µs an id for a list of str: ~20 µs more for k = 100 (docs/bench/memory.md)
        return [blob[s:e].decode("utf-8") for s, e in zip(off[rows].tolist(), (off[rows + 1] - 1).tolist(), strict=True)]

    def __iter__(self) -> Iterator[str]:
        for s in range(0, self._n, 1 << 16):
            yield from self.take(np.arange(s, min(s + (1 << 16), self._n)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (ItemIds, list, tuple)):
            return len(other) == self._n and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ItemIds({self._n} ids)"

    # ---- id -> row -------------------------------------------------------------------------
    def row(self, item_id: str) -> int | None:
        """The row of `item_id`, or None when the catalog does not hold it."""
        if not isinstance(item_id, str):
            return None
        b = item_id.encode("utf-8")
        hv = np.uint64(id_hash(b))
        h = self._hashes
        i = int(np.searchsorted(h, hv))
        while i < self._n and h[i] == hv:
            r = int(self._rows[i])
            if self._bytes(r) == b:
                return r
            i += 1
        return None

    def rows_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """`row` of every id at once (int64, -1 where the catalog does not hold it): one hash
        per id, one `searchsorted`, the hits' bytes compared in one gather. `indexer update`'s
        diff looks up every catalog id (1M: ~6 s through `row`, ~6 µs an id)."""
        encoded = [str(i).encode("utf-8") for i in item_ids]
        out = np.full(len(encoded), -1, dtype=np.int64)
        if not encoded or not self._n:
            return out
        hv = id_hashes(encoded)
        h = self._hashes
        pos = np.minimum(np.searchsorted(h, hv), self._n - 1)
        cand = np.flatnonzero(h[pos] == hv)
        rows = self._rows[pos[cand]]
        lens = np.fromiter((len(encoded[j]) for j in cand.tolist()), dtype=np.int64, count=len(cand))
        starts = self._offsets[rows]
        ok = (self._offsets[rows + 1] - starts - 1) == lens
        sel = np.flatnonzero(ok & (lens > 0))
        if len(sel):
            n_bytes = lens[sel]
            first = np.zeros(len(sel), dtype=np.int64)
            np.cumsum(n_bytes[:-1], out=first[1:])
            idx = np.repeat(starts[sel] - first, n_bytes) + np.arange(int(n_bytes.sum()))
            got = np.frombuffer(self._blob, dtype=np.uint8)[idx]
            want = np.frombuffer(b"".join(encoded[j] for j in cand[sel].tolist()), dtype=np.uint8)
            ok[sel] = np.add.reduceat((got != want).astype(np.int64), first) == 0
        out[cand[ok]] = rows[ok]
        for j in cand[~ok].tolist():  # a hash shared by several ids (or a 64-bit collision)
            r = self.row(encoded[j].decode("utf-8"))
            out[j] = -1 if r is None else r
        return out

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        r = self.row(value)
        if r is None or r < start or (stop is not None and r >= stop):
            raise ValueError(f"{value!r} is not in the catalog")
        return r

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and self.row(value) is not None

    @property
    def rows(self) -> Mapping[str, int]:
        """id -> row as a read-only Mapping (lookups by `row`; iterating walks every id)."""
        return _Rows(self)


class _Rows(Mapping[str, int]):
    __slots__ = ("ids",)

    def __init__(self, ids: ItemIds) -> None:
        self.ids = ids

    def __getitem__(self, item: str) -> int:
        r = self.ids.row(item)
        if r is None:
            raise KeyError(item)
        return r

    def get(self, item: str, default: Any = None) -> Any:  # noqa: D102 - Mapping.get, without the exception
        r = self.ids.row(item)
        return default if r is None else r

    def __contains__(self, item: object) -> bool:
        return item in self.ids

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)
