"""Top-k retrieval with exclusions over one catalog: the one implementation (service, benchmarks, tests).

A catalog is its item ids and their unit vectors (`embeddings.npy`, row i = id i). `TopK` owns
everything a query's answer must satisfy, written once (the TFRS `TopK` pattern); a backend only
proposes candidate rows:

* **exclusions** are filtered after the search, so the backend is asked for `k + len(exclude)`
  rows (capped at the catalog): at most `len(exclude)` of those can be excluded, so at least
  `min(k, catalog − excluded)` remain;
* **exact scores**: the candidates are re-scored against their catalog rows (each score in
  float64 on its own, then rounded to float32: a score is a function of (query, item) only,
  never of which other rows were fetched), and ordered by score, ties by catalog row — so the
  ANN only chooses candidates and a quantized index still returns true cosines (a refine index
  with lossy codes is asked for more candidates than k, `faiss_index.rescore_fetch`; a large
  version's rows are read with pread rather than mapped, `FileRows`);
* **never short**: an approximate backend can come back short (HNSW pads with -1 when its
  candidate list runs dry, an IVF whose probed lists are nearly empty); the query is then
  answered by the exact scan, so a result never has fewer items than promised, a -1 row or a
  null score. When the fetch is a large share of the catalog the exact scan is used directly.

* **filters**: a query may carry the rows it is allowed to return (`Allowed`, a bool mask over
  the catalog: an attribute filter, `indexer.attributes`); the answer then holds exactly
  `min(k, |allowed − excluded|)` items, all allowed, at every selectivity and for every index
  type. The strategy is chosen here by the filter's size (`filter_strategy`): a selective filter
  is an exact scan of its allowed rows (`exact`); a broad one asks the backend for candidates
  among the allowed rows only (`ann`: a FAISS `IDSelectorBitmap`, with IVF's nprobe raised by
  1 / selectivity and HNSW's efSearch to ~2 k / selectivity, see `selector_params`); an ANN answer that comes back short is redone by the exact scan (`fallback`). The
  thresholds come from `python -m bench.filters` (docs/bench/filters.md).

`BruteForceTopK` is the exact backend (numpy over the rows; ties at the cut-off broken by row)
and doubles as the test oracle; `FaissTopK` proposes candidates from a FAISS index.

* **a live catalog** (`DeltaTopK`, `indexer update`): a base version's FAISS top-k, minus its
  tombstoned rows (removed or changed items), plus a small delta segment of new and changed
  items (scanned exactly while small, see below). Its row space is the base rows followed by the delta rows; the rows a
  query may return at all are `live` (an `Allowed`), and every query — filtered or not — is
  restricted to them through the same selector mechanism as a filter (`restrict`), so the
  filter guarantee carries over unchanged: exactly `min(k, |allowed ∩ live − excluded|)` items.
  The ANN strategy asks the base index for candidates among its live allowed rows (a bitmap
  selector) and the delta segment for its best allowed rows; `finish` merges both by exact
  cosine. The delta's cost follows the base's (docs/bench/update_1m.md): a small delta (up to
  `DELTA_EXACT_MAX_ROWS`) is scanned exactly; a larger one over an IVF base is searched through
  an IVF-Flat over the delta rows built on the *base's* coarse quantizer (same centroids, same
  nprobe: ~ delta/base of the base's cost, at the base's recall; an exact scan of a 5 % delta
  cost 10x the base search). The delta is then approximate like the base, which the recall gate
  of `indexer update` measures on the merged result. An unfiltered query excludes the
  tombstones by over-fetching from the base without a selector and dropping them
  (`TOMBSTONE_OVERFETCH_MAX_FRACTION`), redone with the selector if too many were dropped; over
  an IVF-Flat base the merged candidates are cut to the fetch by their float32 distances
  (`_cut`, a margin no rounding crosses) before the exact re-scoring.

Two entry points: `top_k(vecs, queries)` (a k and an exclusion set per query: the request path)
and `search(queries, k, exclude)` (one k and exclusion set for a matrix of queries: tools, tests).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import faiss
import numpy as np

from indexer import faiss_index as fi
from indexer.faiss_index import as_matrix
from indexer.itemids import ItemIds

__all__ = [
    "EXACT_FETCH_FRACTION", "PREAD_MIN_BYTES", "STRATEGIES", "Allowed", "BruteForceTopK", "DeltaTopK", "FaissTopK", "FileRows", "Query", "SegmentedRows",
    "TopK", "exact_live_top_k", "exact_scores", "recall_against_exact", "rescore_rows",
]

# Fetching more than this fraction of the catalog: an exact scan is as cheap and exact.
EXACT_FETCH_FRACTION = 0.25
EXACT_BLOCK_CELLS = 1 << 25  # scores per block of an exact scan over many queries (~128 MB)
EXACT_GATHER_ROWS = 1 << 16  # allowed rows scored per block of a filtered exact scan

# Filtered queries: which strategy, by the number of allowed rows. Measured by `python -m
# bench.filters` (docs/bench/filters.md: 1M items, 64-d, HNSW32 efSearch 128, one thread): the
# exact scan costs ~0.065 µs per allowed row (1 %: 0.8 ms, 3 %: ~2 ms, 5 %: 3.3 ms p50), the HNSW
# search with a bitmap selector ~ its efSearch (raised to 2 k / s: ~1.2 ms at 3 %, 0.2 ms at
# 10 %, at recall@20 1.0), so they cross near 3 %; below 20k rows the scan takes <= ~1.3 ms.
FILTER_EXACT_MAX_ROWS = 20_000
FILTER_EXACT_FRACTION = 0.03
# HNSW with a selector keeps searching until its candidate list holds efSearch *allowed* nodes,
# so it needs efSearch ~ k / s, not efSearch / s (bench.filters: at s = 3 % efSearch 512 gives
# recall@20 1.0, 256 0.94; at 10 % 128 gives 1.0): efSearch = max(manifest's, HNSW_FILTER_EF_PER_K × k / s)
HNSW_FILTER_EF_PER_K = 2.0
# raised search knobs never go beyond these (HNSW's candidate list; IVF is capped by nlist)
FILTER_MAX_EF_SEARCH = 4096

STRATEGIES = ("exact", "ann", "fallback")

# A live catalog's delta segment (`DeltaTopK`): scanned exactly up to this many rows; above,
# over an IVF base, searched through an IVF-Flat on the base's coarse quantizer. Measured at 1M
# items, IVF2048 nprobe 6, d 64, one thread (docs/bench/update_1m.md, 2026-12-03): the exact scan
# costs ~0.02 µs a row (10k rows ~0.2 ms, 50k ~0.9 ms), the delta IVF search ~0.03-0.05 ms at
# any delta size (its coarse step is the base's: 2048 centroids), so they cross near 2k rows.
DELTA_EXACT_MAX_ROWS = 2_000
# Unfiltered queries over a delta catalog: with tombstones at most this share of the base, the
# base is searched without a selector for fetch + margin rows (the tombstones expected among
# them, twice, + 8) and the tombstoned ones dropped; if fewer than fetch live rows remain the
# query is redone with the bitmap selector (never short). Above it: the selector directly.
TOMBSTONE_OVERFETCH_MAX_FRACTION = 0.10


class Allowed:
    """The catalog rows a query may return: their count, and (each computed on first use from
    the other) a bool mask over the rows, the sorted row numbers and the little-endian bitmap
    FAISS's `IDSelectorBitmap` reads. Built from a mask (`Allowed(mask)`) or from sorted rows
    (`Allowed.from_rows`: a selective filter answered by an index never touches the n-row
    mask). Read-only and shared: one instance may serve many requests (`indexer.attributes`
    caches them per filter)."""

    __slots__ = ("__dict__", "count", "size")

    def __init__(self, mask: np.ndarray) -> None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.ndim != 1:
            raise ValueError(f"an allowed-rows mask must be a 1-D bool array, got {mask.dtype} {mask.shape}")
        mask.setflags(write=False)
        self.__dict__["mask"] = mask
        self.size = len(mask)
        self.count = int(np.count_nonzero(mask))

    @classmethod
    def from_rows(cls, rows: np.ndarray, size: int) -> Allowed:
        """From sorted, unique row numbers of a catalog of `size` rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (len(rows) and (rows[0] < 0 or rows[-1] >= size or (np.diff(rows) <= 0).any())):
            raise ValueError(f"allowed rows must be sorted, unique and within [0, {size})")
        rows.setflags(write=False)
        out = cls.__new__(cls)
        out.__dict__["rows"] = rows
        out.size = int(size)
        out.count = len(rows)
        return out

    def __len__(self) -> int:
        return self.count

    @cached_property
    def mask(self) -> np.ndarray:
        mask = np.zeros(self.size, dtype=bool)
        mask[self.rows] = True
        mask.setflags(write=False)
        return mask

    @cached_property
    def rows(self) -> np.ndarray:
        rows = np.flatnonzero(self.mask)
        rows.setflags(write=False)
        return rows

    @cached_property
    def bitmap(self) -> np.ndarray:
        return np.packbits(self.mask, bitorder="little")

    @property
    def nbytes_estimate(self) -> int:
        """Bytes this holds once mask, rows and bitmap exist (for a cache's budget)."""
        return int(self.size + 8 * self.count + self.size // 8)

    @property
    def selectivity(self) -> float:
        return self.count / max(1, self.size)


@dataclass(frozen=True)
class Query:
    """One retrieval: how many items, the ids that must not appear, and optionally the only rows
    that may (`allowed`, over this catalog's rows; None: every row)."""

    k: int
    exclude: frozenset[str] = field(default_factory=frozenset)
    allowed: Allowed | None = field(default=None, compare=False)


def exact_scores(embeddings: np.ndarray, rows: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """float32 cosines of `rows`, each computed on its own in float64 and then rounded.

    A BLAS matrix-vector product rounds differently depending on how many rows it gets, so the
    same item would score 0.54550987 in one response and 0.54550981 in another (a batch, a
    different exclusion list). Row-by-row float64 sums make a score a function of (user vector,
    item row) only.
    """
    block = embeddings.take(rows, axis=0).astype(np.float64)  # take: ~3x cheaper than [rows]
    return np.einsum("ij,j->i", block, vec.astype(np.float64)).astype(np.float32)


# Above this size a version's embeddings.npy is read row by row for the exact re-scoring
# (`FileRows`) instead of through its memory map; see there. 1 GiB: ~4M items of d=64.
PREAD_MIN_BYTES = 1 << 30


class FileRows:
    """The rows of a memory-mapped .npy matrix read with one `pread` each, never mapped.

    Every answer re-scores its candidates from their float32 catalog rows. Read through the
    memory map, each row a worker ever touched stays mapped in its RSS, with its neighbours: a
    fault maps a whole 64 KiB window of cached pages (256 rows of d=64), so after some thousand
    requests at 10M items a worker maps the whole 2.4 GB embeddings.npy (docs/bench/memory.md).
    `pread` goes through the same page cache — one copy for every worker of the machine, which
    the kernel may evict — and maps nothing, so the worker's RSS holds only the index and the
    id column. The cost, measured on this machine (random rows of a cached 1M x 64 file): 20
    rows 26 µs p50, 100 rows 115 µs (the memory map's `take`: 3 and 6 µs), hence only for large
    files (`PREAD_MIN_BYTES`). Supports what `exact_scores` needs: `take(rows, axis=0)`.
    """

    def __init__(self, matrix: np.memmap) -> None:
        if matrix.ndim != 2 or matrix.dtype != np.float32 or not matrix.flags.c_contiguous or matrix.filename is None:
            raise ValueError(f"FileRows reads a C-ordered float32 (n, d) memory-mapped .npy, got {matrix.dtype} {matrix.shape}")
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.ndim, self.dtype = 2, np.dtype(np.float32)
        self.row_bytes = 4 * self.shape[1]
        self.offset = int(matrix.offset)
        self.path = str(matrix.filename)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - lives as long as the version
        self._fd = self._file.fileno()

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: np.ndarray, axis: int = 0) -> np.ndarray:
        """float32 (len(rows), d): the rows by number, read from the file."""
        if axis != 0:
            raise ValueError("FileRows takes rows (axis=0) only")
        flat = np.asarray(rows).ravel().tolist()
        if flat and (min(flat) < 0 or max(flat) >= self.shape[0]):
            raise IndexError(f"rows {min(flat)}..{max(flat)} outside the {self.shape[0]} rows of {self.path}")
        rb, off, fd, pread = self.row_bytes, self.offset, self._fd, os.pread
        buf = b"".join([pread(fd, rb, off + r * rb) for r in flat])
        if len(buf) != rb * len(flat):
            raise OSError(f"{self.path}: short read of {len(flat)} rows ({len(buf)} of {rb * len(flat)} bytes)")
        return np.frombuffer(buf, dtype=np.float32).reshape(*np.shape(rows), self.shape[1])


def rescore_rows(embeddings: np.ndarray) -> np.ndarray | FileRows:
    """Where `TopK.finish` reads candidate rows: `FileRows` over a memory-mapped embeddings file
    of at least PREAD_MIN_BYTES, else the matrix itself."""
    if isinstance(embeddings, np.memmap) and embeddings.nbytes >= PREAD_MIN_BYTES and embeddings.filename is not None:
        return FileRows(embeddings)
    return embeddings


class TopK:
    """Exclusions, exact re-scoring, ordering and the never-short guarantee over one catalog.

    `embeddings` (n, d) float32 unit rows and `item_ids` (n unique ids, row order). Subclasses
    implement `candidates`; `approximate` says whether those can miss (then an exact scan backs
    them up for catalogs of at most `exact_fallback_max_items`).
    """

    approximate = False
    selector_search = False  # whether `allowed_candidates` searches an index (else: exact scan)
    # a filter allowing at most max(rows, fraction * catalog) rows is scanned exactly (tests and
    # the benchmark set them per instance to force a strategy)
    filter_exact_max_rows = FILTER_EXACT_MAX_ROWS
    filter_exact_fraction = FILTER_EXACT_FRACTION
    _scan_map: mmap.mmap | None = None  # see __init__ (a subclass holding other arrays: none)

    def __init__(self, embeddings: np.ndarray, item_ids: Sequence[str], *, exact_fallback_max_items: int = 5_000_000) -> None:
        if embeddings.ndim != 2 or embeddings.dtype != np.float32:
            raise ValueError(f"catalog vectors must be a float32 (n, d) array, got {embeddings.dtype} {embeddings.shape}")
        if len(item_ids) != len(embeddings):
            raise ValueError(f"{len(item_ids)} item ids for {len(embeddings)} vectors; need one id per row")
        # row -> id and id -> row (POST /similar looks an item up) without a Python object per
        # item: a version's memory-mapped id column as it is, a list converted (which checks
        # uniqueness; a version's column was checked by its acceptance check)
        ids = item_ids if isinstance(item_ids, ItemIds) else ItemIds.from_list(item_ids)
        self.item_ids: Sequence[str] = ids
        self.rows: Mapping[str, int] = ids.rows
        # a plain ndarray over the same (possibly memory-mapped) pages: np.memmap's Python-level
        # __getitem__ costs ~5 µs per indexing on the request path
        self.embeddings = embeddings.view(np.ndarray)
        self.rescore_rows = rescore_rows(embeddings)
        # a large version's bulk scans (a filter scanned exactly, the exact fallback) still read
        # through the map, a whole-matrix product being far cheaper than a pread a row; the pages
        # they mapped are dropped from the worker afterwards (`_unmap_scanned`)
        scan_map = getattr(embeddings, "_mmap", None)
        large = isinstance(self.rescore_rows, FileRows) and hasattr(mmap, "MADV_DONTNEED")
        self._scan_map = scan_map if large and isinstance(scan_map, mmap.mmap) else None
        self.count = len(item_ids)
        self.dim = int(embeddings.shape[1])
        self.exact_ok = self.count <= exact_fallback_max_items

    def __len__(self) -> int:
        return self.count

    def vectors(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 (len(rows), d): catalog rows by number, read the way re-scoring reads them
        (`rescore_rows`: pread for a large version), so a check or a `/similar` lookup does not
        map pages into the worker's RSS either (at 10M items the load-time smoke test alone
        mapped 560 MiB of embeddings.npy through the memory map, docs/bench/memory.md)."""
        return np.asarray(self.rescore_rows.take(np.asarray(rows, dtype=np.int64), axis=0), dtype=np.float32)

    @property
    def live_count(self) -> int:
        """Items a query can return (the catalog size; a `DeltaTopK` leaves tombstones out)."""
        return self.count

    # ---- what a backend provides ---------------------------------------------------------------
    def candidates(self, vecs: np.ndarray, fetch: int) -> np.ndarray:
        """(n, >= fetch) candidate rows for each query row of `vecs`; -1 where fewer were found.
        The base proposes the exact ones (`exact_candidates`); approximate backends override."""
        return self.exact_candidates(vecs, fetch)

    def allowed_candidates(self, vec: np.ndarray, fetch: int, allowed: Allowed) -> np.ndarray:
        """Candidate rows among `allowed` only for one query (1-D; -1 where fewer were found).
        The base scans them exactly; approximate backends override with a selector search."""
        return self.exact_allowed_candidates(vec, fetch, allowed)

    def exact_allowed_candidates(self, vec: np.ndarray, fetch: int, allowed: Allowed) -> np.ndarray:
        """The allowed rows of the `fetch` highest exact scores (plus ties with the last),
        scoring the allowed rows a block at a time (a gather, then one matrix-vector product)."""
        rows = allowed.rows
        if fetch >= len(rows):
            return rows
        parts = [
            self.embeddings.take(rows[s : s + EXACT_GATHER_ROWS], axis=0) @ vec
            for s in range(0, len(rows), EXACT_GATHER_ROWS)
        ]
        self._unmap_scanned()
        scores = parts[0] if len(parts) == 1 else np.concatenate(parts)
        kth = np.partition(scores, len(rows) - fetch)[len(rows) - fetch]
        return rows[scores >= kth]

    def _unmap_scanned(self) -> None:
        """Drop the pages a bulk scan mapped of a large version's embeddings.npy from this
        worker (`MADV_DONTNEED` on a read-only file mapping: the page cache keeps them, a later
        read faults them in again; safe while other threads read the map). Measured at 10M
        items: a scan of 20k random rows maps all 2.4 GB (fault-around of large page-cache
        folios) in 177 ms cold / 22 ms warm; the madvise takes 1.4 ms and the worker's VmRSS
        falls from 2,447 to 33 MiB."""
        if self._scan_map is not None:
            self._scan_map.madvise(mmap.MADV_DONTNEED)

    def exact_candidates(self, vecs: np.ndarray, fetch: int) -> np.ndarray:
        """The rows of the `fetch` highest exact scores of each query, plus any row tied with the
        last (the final order breaks those ties by row), unordered, padded with -1 to one width.
        Queries are scored a block at a time (at most EXACT_BLOCK_CELLS scores at once)."""
        n = self.count
        if fetch >= n:
            return np.broadcast_to(np.arange(n, dtype=np.int64), (len(vecs), n))
        out: list[np.ndarray] = []
        block = max(1, min(len(vecs), EXACT_BLOCK_CELLS // max(1, n)))
        for s in range(0, len(vecs), block):
            scores = vecs[s : s + block] @ self.embeddings.T
            kth = np.partition(scores, n - fetch, axis=1)[:, n - fetch]
            out += [np.flatnonzero(row >= t) for row, t in zip(scores, kth, strict=True)]
        self._unmap_scanned()
        if len(out) == 1:
            return out[0][None, :]
        rows = np.full((len(out), max((len(r) for r in out), default=fetch)), -1, dtype=np.int64)
        for i, r in enumerate(out):
            rows[i, : len(r)] = r
        return rows

    # ---- the answer ----------------------------------------------------------------------------
    def fetch_size(self, q: Query) -> int:
        return min(q.k + len(q.exclude), self.count)

    def needs_exact(self, fetch: int) -> bool:
        """An approximate backend asked for a large share of the catalog: scan exactly instead."""
        return self.approximate and self.exact_ok and fetch > EXACT_FETCH_FRACTION * self.count

    def filter_strategy(self, allowed: Allowed) -> str:
        """'exact' (scan the allowed rows) or 'ann' (search the index among them), by size."""
        if not self.selector_search:
            return "exact"
        threshold = max(self.filter_exact_max_rows, self.filter_exact_fraction * self.count)
        return "exact" if allowed.count <= threshold else "ann"

    def top_k(self, vecs: np.ndarray, queries: Sequence[Query]) -> list[list[tuple[str, float]]]:
        """Results for each query (row i of `vecs`), each exactly min(k, allowed − excluded) long
        (allowed: the query's `allowed` rows, else the whole catalog)."""
        return self.top_k_strategies(vecs, queries)[0]

    def top_k_strategies(
        self, vecs: np.ndarray, queries: Sequence[Query]
    ) -> tuple[list[list[tuple[str, float]]], list[str | None]]:
        """`top_k`, and per query the strategy that answered a filtered one (`STRATEGIES`; None
        for a query without `allowed`), for the service's metrics."""
        if vecs.shape != (len(queries), self.dim) or not np.isfinite(vecs).all():
            raise ValueError(f"query vectors of shape {vecs.shape} must be finite (n, {self.dim}) = ({len(queries)}, {self.dim})")
        results: list[list[tuple[str, float]] | None] = [None] * len(queries)
        strategies: list[str | None] = [None] * len(queries)
        if self.count == 0:
            return [[] for _ in queries], strategies
        for i, q in enumerate(queries):
            if q.allowed is not None:
                if q.allowed.size != self.count:
                    raise ValueError(f"an allowed-rows mask of {q.allowed.size} rows for a catalog of {self.count}")
                results[i], strategies[i] = self._filtered(vecs[i], q)
        plain = [i for i, q in enumerate(queries) if q.allowed is None]
        if len(plain) < len(queries):
            if not plain:
                return results, strategies  # type: ignore[return-value]
            sub, _ = self.top_k_strategies(np.ascontiguousarray(vecs[plain]), [queries[i] for i in plain])
            for i, r in zip(plain, sub, strict=True):
                results[i] = r
            return results, strategies  # type: ignore[return-value]
        ann = [i for i, q in enumerate(queries) if not self.needs_exact(self.fetch_size(q))]
        if ann:
            fetch = max(self.fetch_size(queries[i]) for i in ann)
            rows = self.candidates(np.ascontiguousarray(vecs if len(ann) == len(queries) else vecs[ann]), fetch)
            for j, i in enumerate(ann):
                q = queries[i]
                res = self.finish(vecs[i], rows[j], q)
                short = len(res) < q.k and (rows[j] < 0).any()
                results[i] = None if (short and self.exact_ok) else res
        for i, q in enumerate(queries):
            if results[i] is None:
                results[i] = self.finish(vecs[i], self.exact_candidates(vecs[i : i + 1], self.fetch_size(q))[0], q)
        return results, strategies  # type: ignore[return-value]

    def _filtered(self, vec: np.ndarray, q: Query) -> tuple[list[tuple[str, float]], str]:
        """One query restricted to `q.allowed`: exactly min(k, allowed − excluded) allowed items.

        Fetching `min(k + len(exclude), allowed)` allowed rows leaves at least k once the excluded
        are dropped, or every allowed row; an ANN answer with fewer valid allowed rows than that
        and fewer than k results is redone exactly (`fallback`).
        """
        allowed = q.allowed
        assert allowed is not None
        fetch = min(q.k + len(q.exclude), allowed.count)
        if fetch == 0:
            return [], "exact"
        if self.filter_strategy(allowed) == "exact":
            return self.finish(vec, self.exact_allowed_candidates(vec, fetch, allowed), q), "exact"
        rows = self.allowed_candidates(vec, fetch, allowed)
        rows = rows[rows >= 0]
        rows = rows[allowed.mask[rows]]  # a selector guarantees it; never trust a backend with a filter
        res = self.finish(vec, rows, q)
        if len(res) < q.k and len(rows) < fetch:
            return self.finish(vec, self.exact_allowed_candidates(vec, fetch, allowed), q), "fallback"
        return res, "ann"

    def finish(self, vec: np.ndarray, rows: np.ndarray, q: Query) -> list[tuple[str, float]]:
        """Exact re-scoring, exclusion filter, order by (score desc, row asc), cut at k.

        Written for the request path's per-call overhead (~20 rows, every numpy call a few µs on a
        cache-cold request): one `lexsort` orders by score and breaks ties by row (no sort of the
        rows first), and a repeated row — which an ANN never returns; it would sit next to its twin
        in that order, having the same score — is only looked for there.
        """
        if len(rows) == 0:
            return []
        if rows.min() < 0:  # an ANN pads a short answer with -1
            rows = rows[rows >= 0]
            if len(rows) == 0:
                return []
        scores = exact_scores(self.rescore_rows, rows, vec)
        order = np.lexsort((rows, -scores))
        ranked = rows[order]
        if (ranked[1:] == ranked[:-1]).any():
            return self.finish(vec, np.unique(rows), q)
        exclude = q.exclude
        ids = self.item_ids
        if not exclude:
            k = q.k
            return list(zip(ids.take(ranked[:k]), scores[order[:k]].tolist(), strict=True))  # type: ignore[attr-defined]
        out: list[tuple[str, float]] = []
        for row, score in zip(ranked.tolist(), scores[order].tolist(), strict=True):
            item = ids[row]
            if item in exclude:
                continue
            out.append((item, score))
            if len(out) == q.k:
                break
        return out

    def search(
        self, queries: np.ndarray, k: int, exclude: Collection[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 (nq, k'), item_ids (nq, k') of str), k' = min(k, catalog − excluded),
        each row sorted by score then catalog row. `exclude`: ids removed from every query's
        result (ids not in the catalog are ignored)."""
        if isinstance(exclude, str):
            raise ValueError("exclude must be a collection of item ids, not a single string")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = as_matrix(queries, name="queries", dim=self.dim)
        query = Query(int(k), frozenset(str(i) for i in exclude or ()))
        results = self.top_k(q, [query] * len(q))
        width = min((len(r) for r in results), default=0)
        scores = np.array([[s for _, s in r[:width]] for r in results], dtype=np.float32).reshape(len(q), width)
        ids = np.array([[i for i, _ in r[:width]] for r in results], dtype=object).reshape(len(q), width)
        return scores, ids


class BruteForceTopK(TopK):
    """Exact retrieval in numpy: every query scans every row (the base's exact candidates). The
    test oracle of the approximate backends."""


class FaissTopK(TopK):
    """Candidates from a FAISS inner-product index over the same rows (thread-safe: per-call
    search parameters, the index is never mutated)."""

    selector_search = True

    def __init__(
        self,
        index: faiss.Index,
        embeddings: np.ndarray,
        item_ids: Sequence[str],
        *,
        exact_fallback_max_items: int = 5_000_000,
    ) -> None:
        super().__init__(embeddings, item_ids, exact_fallback_max_items=exact_fallback_max_items)
        if index.ntotal != self.count or index.d != self.dim:
            raise ValueError(
                f"index holds {index.ntotal} vectors of dimension {index.d}, catalog has {self.count} of dimension {self.dim}"
            )
        self.index = index
        inner = faiss.downcast_index(index)
        self.approximate = not isinstance(inner, faiss.IndexFlat)
        # The knobs of the index that chooses the candidates (behind IndexPreTransform and
        # IndexRefine wrappers); per-call parameters are built by `fi.search_parameters`, which
        # nests them the way a refined index needs.
        knobs = fi.get_search_params(index)
        self.refined = fi.is_refined(index)
        self.hnsw_ef_search = knobs.get("efSearch")
        self.ivf_nprobe = knobs.get("nprobe")
        ivf = faiss.try_extract_index_ivf(index)
        self.ivf_nlist = int(ivf.nlist) if ivf is not None else None

    def overfetch(self, fetch: int) -> int:
        """The candidates to ask of the index for `fetch` exactly re-scored ones (more for a
        refine index with lossy codes: `faiss_index.rescore_fetch`), capped at the catalog."""
        return min(fi.rescore_fetch(self.index, fetch), self.count)

    def candidates(self, vecs: np.ndarray, fetch: int) -> np.ndarray:
        # Per-call parameters only where the index's own knobs do not do: a refined index (its
        # parameters nest the base's), or HNSW asked for more than efSearch (it would return
        # fewer than k results, padded with -1). Building them costs ~22 µs, a tenth of a
        # miss's tower + search time, so the common case passes none.
        fetch = self.overfetch(fetch)
        params = None
        if self.refined or (self.hnsw_ef_search is not None and fetch > self.hnsw_ef_search):
            params = fi.search_parameters(self.index, fetch)
        _, rows = self.index.search(vecs, fetch, params=params)
        return rows

    def selector_params(self, fetch: int, allowed: Allowed) -> tuple[faiss.SearchParameters, faiss.IDSelector]:
        """Search parameters restricted to `allowed` (a bitmap selector). IVF: nprobe raised by
        1 / selectivity — the probed lists hold a share s of allowed vectors, so 1/s as many lists
        give an unfiltered search's candidates. HNSW: efSearch raised to HNSW_FILTER_EF_PER_K × k /
        s (see there). (Returned with the selector: the caller keeps both, and the bitmap, alive
        during the search.)"""
        sel = faiss.IDSelectorBitmap(self.count, faiss.swig_ptr(allowed.bitmap))
        boost = 1.0 / max(allowed.selectivity, 1e-9)
        if self.hnsw_ef_search is not None:
            ef = min(FILTER_MAX_EF_SEARCH, max(self.hnsw_ef_search, math.ceil(HNSW_FILTER_EF_PER_K * fetch * boost)))
            return fi.search_parameters(self.index, fetch, sel=sel, efSearch=max(ef, fetch)), sel
        if self.ivf_nprobe is not None and self.ivf_nlist is not None:
            nprobe = min(self.ivf_nlist, math.ceil(self.ivf_nprobe * boost))
            return fi.search_parameters(self.index, fetch, sel=sel, nprobe=nprobe), sel
        return fi.search_parameters(self.index, fetch, sel=sel), sel

    def allowed_candidates(self, vec: np.ndarray, fetch: int, allowed: Allowed) -> np.ndarray:
        fetch = min(self.overfetch(fetch), allowed.count)
        params, sel = self.selector_params(fetch, allowed)
        bitmap = allowed.bitmap  # noqa: F841 - the selector points into it
        _, rows = self.index.search(np.ascontiguousarray(vec[None, :], dtype=np.float32), fetch, params=params)
        del sel
        return rows[0]


class SegmentedRows:
    """Two row blocks read as one (n, d) float32 matrix: `base` (memory-mapped, never copied),
    then `delta` — a `DeltaTopK`'s catalog vectors. Supports what the top-k, `POST /similar` and
    the version checks do with a catalog matrix: `take(rows, axis=0)`, indexing by a row, a
    slice or row numbers, `len`, `shape`, `dtype`; `np.asarray` materializes both blocks (tools
    only: 4 bytes x d per row)."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, base: np.ndarray, delta: np.ndarray) -> None:
        if base.ndim != 2 or delta.ndim != 2 or base.shape[1] != delta.shape[1]:
            raise ValueError(f"row blocks of shapes {base.shape} and {delta.shape} do not stack")
        self.base = base
        self.delta = delta
        self.nb = len(base)
        self.shape = (self.nb + len(delta), int(base.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: np.ndarray, axis: int = 0) -> np.ndarray:
        """Rows by number (any shape of int array), as `np.take(matrix, rows, axis=0)`."""
        if axis != 0:
            raise ValueError("SegmentedRows.take gathers rows only (axis=0)")
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.empty((*rows.shape, self.shape[1]), dtype=np.float32)
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= self.shape[0]:
            raise IndexError(f"row {lo if lo < 0 else hi} out of range for {self.shape[0]} rows")
        nb = self.nb
        if hi < nb:
            return self.base.take(rows, axis=0)
        if lo >= nb:
            return self.delta.take(rows - nb, axis=0)
        in_delta = rows >= nb
        out = np.empty((*rows.shape, self.shape[1]), dtype=np.float32)
        out[~in_delta] = self.base.take(rows[~in_delta], axis=0)
        out[in_delta] = self.delta.take(rows[in_delta] - nb, axis=0)
        return out

    def __getitem__(self, key: object) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            row = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"row {key} out of range for {self.shape[0]} rows")
            return self.base[row] if row < self.nb else self.delta[row - self.nb]
        if isinstance(key, slice):
            return self.take(np.arange(self.shape[0])[key])
        if isinstance(key, tuple):
            raise TypeError("SegmentedRows supports row indexing only (a row, a slice or row numbers)")
        return self.take(np.asarray(key))

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        out = np.concatenate([self.base, self.delta]) if len(self.delta) else np.array(self.base)
        return out if dtype is None else out.astype(dtype)


class DeltaTopK(TopK):
    """A live catalog: `base` (a version's FAISS top-k) minus tombstoned base rows plus a delta
    segment of new and changed items, answered exactly (see the module docstring).

    Rows `0 .. nb-1` are the base's, `nb .. nb+nd-1` the delta's; `embeddings` reads both, in
    that order, as one matrix (`SegmentedRows`: the base's memory-mapped rows are not copied —
    at 1M items a copy cost 0.6-0.8 s per load and 256 MB per served version — and the base
    files stay untouched). A tombstoned row keeps its id in `item_ids` but is never returned: it
    is not in `live`, and `rows` (id -> row) maps each live id to its one live row.

    The delta segment is searched like the base (`delta_index`, module docstring): above
    `delta_exact_max_rows` rows over an IVF base, an IVF-Flat over the delta rows on the base's
    coarse quantizer, built here (at load: ~0.01 s per 1,000 rows, off the request path);
    otherwise (a small delta, a Flat or HNSW base) an exact scan. `tombstone_overfetch` (per
    instance: the benchmark compares both) chooses how an unfiltered query leaves tombstones out.
    """

    selector_search = True
    tombstone_overfetch = True

    def __init__(
        self,
        base: FaissTopK,
        delta_embeddings: np.ndarray,
        delta_ids: Sequence[str],
        tombstones: np.ndarray,
        *,
        delta_exact_max_rows: int | None = None,
    ) -> None:
        nb = base.count
        tomb = np.asarray(tombstones)
        if tomb.dtype != np.bool_ or tomb.shape != (nb,):
            raise ValueError(f"tombstones must be a bool array over the {nb} base rows, got {tomb.dtype} {tomb.shape}")
        delta = np.asarray(delta_embeddings)
        if delta.dtype != np.float32 or delta.ndim != 2 or delta.shape[1] != base.dim:
            raise ValueError(f"delta vectors must be float32 (nd, {base.dim}), got {delta.dtype} {delta.shape}")
        if len(delta_ids) != len(delta):
            raise ValueError(f"{len(delta_ids)} delta item ids for {len(delta)} delta vectors")
        rows = _DeltaRows(base.item_ids, tomb, {str(item): nb + j for j, item in enumerate(delta_ids)})
        if len(rows.delta) != len(delta_ids):
            raise ValueError("delta item ids must be unique")
        clash = next((item for item in rows.delta if rows.live_base_row(item) is not None), None)
        if clash is not None:
            raise ValueError(f"delta item {clash!r} is also a live base item; a changed item's base row must be tombstoned")
        self.rows = rows
        self.delta_embeddings = np.ascontiguousarray(delta)
        self.embeddings = SegmentedRows(base.embeddings, self.delta_embeddings)  # type: ignore[assignment]
        # the base's rows re-scored the way the base re-scores them (`rescore_rows`), then the delta's
        self.rescore_rows = (
            SegmentedRows(base.rescore_rows, self.delta_embeddings) if isinstance(base.rescore_rows, FileRows) else self.embeddings
        )
        self.item_ids = _DeltaIds(base.item_ids, [str(i) for i in delta_ids])
        self.count = nb + len(delta)
        self.dim = base.dim
        self.exact_ok = base.exact_ok
        self.approximate = base.approximate
        self.base = base
        self.index = base.index
        self.base_count = nb
        self.delta_count = len(delta)
        self.tombstone_count = int(np.count_nonzero(tomb))
        live = Allowed(np.concatenate([~tomb, np.ones(len(delta), dtype=bool)]))
        if live.count != len(rows):
            raise ValueError(f"{len(rows)} live ids for {live.count} live rows: delta item ids must be unique")
        live.within = live  # type: ignore[attr-defined]
        self.live = live
        self.delta_exact_max_rows = DELTA_EXACT_MAX_ROWS if delta_exact_max_rows is None else int(delta_exact_max_rows)
        self.delta_index = _delta_ivf(base, self.delta_embeddings) if self.delta_count > self.delta_exact_max_rows else None
        self.delta_nprobe = int(base.ivf_nprobe or 1)  # = the base's: one coarse step serves both
        self.live_base = live.mask[:nb]  # a view: True where a base row is live
        # a plain IVF base (no refinement, no transform) shares its coarse step with the delta IVF
        outer = faiss.downcast_index(base.index)
        self._plain_ivf = outer if self.delta_index is not None and isinstance(outer, faiss.IndexIVF) else None
        self._coarse = outer.quantizer if self._plain_ivf is not None else None
        # an IVF-Flat base's distances are float32 inner products, like the delta IVF's: the
        # merged candidates can be cut to the fetch by them (`_cut`) before the exact re-scoring
        self._exact_distances = isinstance(self._plain_ivf, faiss.IndexIVFFlat)

    @property
    def live_count(self) -> int:
        return self.live.count

    def fetch_size(self, q: Query) -> int:
        return min(q.k + len(q.exclude), self.live.count)

    def restrict(self, allowed: Allowed | None) -> Allowed:
        """`allowed` ∩ live (None: every live row). An `Allowed` this returned (or the attribute
        table built it with this function) is marked and passes through unchanged."""
        if allowed is None:
            return self.live
        if getattr(allowed, "within", None) is self.live:
            return allowed
        if allowed.size != self.count:
            raise ValueError(f"an allowed-rows mask of {allowed.size} rows for a catalog of {self.count}")
        if "rows" in allowed.__dict__ and "mask" not in allowed.__dict__:
            rows = allowed.rows
            out = Allowed.from_rows(rows[self.live.mask[rows]], self.count)
        else:
            out = Allowed(allowed.mask & self.live.mask)
        out.within = self.live  # type: ignore[attr-defined]
        return out

    def top_k_strategies(
        self, vecs: np.ndarray, queries: Sequence[Query]
    ) -> tuple[list[list[tuple[str, float]]], list[str | None]]:
        """Every query restricted to the live rows, then the base's filtered path; the strategy
        is reported only for queries that came with a filter."""
        restricted = [Query(q.k, q.exclude, self.restrict(q.allowed)) for q in queries]
        results, strategies = super().top_k_strategies(vecs, restricted)
        return results, [s if q.allowed is not None else None for s, q in zip(strategies, queries, strict=True)]

    def _filtered(self, vec: np.ndarray, q: Query) -> tuple[list[tuple[str, float]], str]:
        """An unfiltered query (restricted to `live` only) straight to `_live_candidates`: they
        hold min(fetch, live) distinct live rows, so `finish` leaves min(k, live − excluded);
        anything else (a filter, or the over-fetch not applying) takes the filter path."""
        if q.allowed is self.live:
            fetch = min(q.k + len(q.exclude), self.live.count)
            rows = self._live_candidates(vec, fetch) if fetch else None
            if rows is not None:
                return self.finish(vec, rows, q), "ann"
        return super()._filtered(vec, q)

    def _split(self, allowed: Allowed) -> tuple[Allowed, np.ndarray]:
        """(the allowed base rows as an `Allowed` over the base index, the allowed delta rows),
        cached on `allowed` (a cached filter or `live` is split once)."""
        cached = allowed.__dict__.get("_delta_split")
        if cached is not None:
            return cached
        nb = self.base_count
        if "rows" in allowed.__dict__ and "mask" not in allowed.__dict__:
            rows = allowed.rows
            cut = int(np.searchsorted(rows, nb))
            base_part = Allowed.from_rows(rows[:cut], nb)
            delta_rows = rows[cut:]
        else:
            base_part = Allowed(allowed.mask[:nb])
            delta_rows = np.flatnonzero(allowed.mask[nb:]) + nb
        delta_rows.setflags(write=False)
        allowed.__dict__["_delta_split"] = (base_part, delta_rows)
        return base_part, delta_rows

    def allowed_candidates(self, vec: np.ndarray, fetch: int, allowed: Allowed) -> np.ndarray:
        """The base index's candidates among its allowed live rows (a bitmap selector, as for a
        filter; an unfiltered query over-fetches instead, `_live_candidates`) and the allowed
        delta rows its search finds (`_delta_candidates`); `finish` merges them. Together they
        hold min(fetch, allowed) rows unless the base search came back short (then `_filtered`
        redoes the query exactly)."""
        if allowed is self.live:
            rows = self._live_candidates(vec, fetch)
            if rows is not None:
                return rows
        base_part, delta_rows = self._split(allowed)
        parts = []
        if base_part.count:
            rows = self.base.allowed_candidates(vec, min(fetch, base_part.count), base_part)
            parts.append(rows[rows >= 0])
        if len(delta_rows):
            need = min(fetch, allowed.count) - sum(len(r) for r in parts)
            parts.append(self._delta_candidates(vec, fetch, delta_rows, allowed, need=need))
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _live_candidates(self, vec: np.ndarray, fetch: int) -> np.ndarray | None:
        """An unfiltered query's candidates without a selector: the base is asked for
        min(fetch, live base rows) + twice the tombstones expected among them + 8, the
        tombstoned rows are dropped, and the delta rows its search finds are added. Over a plain
        IVF base with a delta IVF both segments are searched with one coarse quantization (the
        same centroids: `search_preassigned` on the lists the base probes). None when this does
        not apply (over-fetching disabled, tombstones over TOMBSTONE_OVERFETCH_MAX_FRACTION of
        the base, a fetch that large) or it found fewer live base rows than asked: the caller
        then searches with the bitmap selector, so a result is never short.

        A FAISS selector is checked for every vector scanned (IVF: every row of every probed
        list) and its 1/selectivity raises nprobe (4 -> 5 at 1-5 % tombstones); a few extra rows
        of one plain search cost less (docs/bench/update_1m.md)."""
        nb, dead = self.base_count, self.tombstone_count
        if not self.tombstone_overfetch or dead > TOMBSTONE_OVERFETCH_MAX_FRACTION * nb or nb == dead:
            return None
        base_fetch = min(fetch, nb - dead)
        ask = min(nb, base_fetch + (8 + 2 * math.ceil(base_fetch * dead / nb) if dead else 0))
        if self.base.needs_exact(ask):
            return None
        x = np.ascontiguousarray(vec[None, :], dtype=np.float32)
        ivf = self._plain_ivf
        if ivf is not None:
            dq, iq = _raw_search(self._coarse, x, self.delta_nprobe)
            dist, rows = _raw_search_preassigned(ivf, x, ask, iq, dq)
        else:
            dist, rows = None, self.base.candidates(x, ask)[0]
        if rows[-1] < 0:  # FAISS pads a short answer at the end
            keep = rows >= 0
            rows, dist = rows[keep], (None if dist is None else dist[keep])
        if dead:
            keep = self.live_base[rows]
            rows, dist = rows[keep], (None if dist is None else dist[keep])
        if len(rows) < base_fetch:
            return None
        if not self.delta_count:
            return rows
        need = min(fetch, self.live.count) - len(rows)
        if ivf is not None:
            ddist, found = _raw_search_preassigned(self.delta_index, x, min(fetch, self.delta_count), iq, dq)
            if found[-1] < 0:
                keep = found >= 0
                found, ddist = found[keep], ddist[keep]
            if len(found) >= need:
                if not self._exact_distances:
                    return np.concatenate([rows, found + nb])
                return _cut(np.concatenate([rows, found + nb]), np.concatenate([dist, ddist]), fetch, vec)
        return np.concatenate([rows, self._delta_candidates(vec, fetch, self._split(self.live)[1], self.live, need=need)])

    def _delta_candidates(self, vec: np.ndarray, fetch: int, rows: np.ndarray, allowed: Allowed, *, need: int) -> np.ndarray:
        """Candidates among the allowed delta `rows`: what the delta IVF finds of their best
        `fetch` in the lists it probes (all delta rows allowed, or a bitmap selector over them
        with nprobe raised by 1 / their share, as for a base filter) — like the base search, it
        may find fewer; else — no delta index, few allowed rows, or fewer than `need` found (the
        base part alone is short of the fetch: a tiny base, a large k) — the exact scan's best
        `fetch`.

        A delta IVF answer short of `fetch` needs no exact redo when the base part holds the
        fetch: the delta rows it misses sit in lists the base search did not probe either, as
        they would in an IVF over the whole live catalog (at 1 % of 1M items, ~5 delta rows a
        list: the 4 probed lists often hold fewer than k)."""
        index = self.delta_index
        if index is None or len(rows) <= self.delta_exact_max_rows:
            return self._scan_delta(vec, fetch, rows)
        want = min(fetch, len(rows))
        nd = self.delta_count
        if len(rows) == nd:
            params = bitmap = None  # the index's own nprobe: the base's
        else:
            bitmap = allowed.__dict__.get("_delta_bitmap")
            if bitmap is None:
                mask = np.zeros(nd, dtype=bool)
                mask[rows - self.base_count] = True
                bitmap = np.packbits(mask, bitorder="little")
                allowed.__dict__["_delta_bitmap"] = bitmap
            sel = faiss.IDSelectorBitmap(nd, faiss.swig_ptr(bitmap))
            nprobe = min(int(index.nlist), math.ceil(self.delta_nprobe * nd / len(rows)))
            params = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)
        _, found = index.search(vec[None, :], want, params=params)
        del bitmap  # kept alive through the search: the selector points into it
        found = found[0]
        found = found[found >= 0]
        if len(found) < need:
            return self._scan_delta(vec, fetch, rows)
        return found + self.base_count

    def _scan_delta(self, vec: np.ndarray, fetch: int, rows: np.ndarray) -> np.ndarray:
        """The `fetch` best of the delta `rows` (plus ties) by exact score; the whole delta
        segment is one contiguous block (no gather) when every delta row is allowed."""
        if len(rows) == self.delta_count:
            scores = self.delta_embeddings @ vec
        else:
            scores = self.delta_embeddings.take(rows - self.base_count, axis=0) @ vec
        if fetch >= len(rows):
            return rows
        kth = np.partition(scores, len(rows) - fetch)[len(rows) - fetch]
        return rows[scores >= kth]


# A candidate whose float32 FAISS inner product is this far (x the query's norm) below the
# fetch-th best cannot make the exact top-fetch: float32 sums of d <= 4096 unit-row products
# err by ~d x 6e-8 x |q| (64-d: 4e-6), so 1e-3 is a wide margin.
CUT_MARGIN = 1e-3


def _cut(rows: np.ndarray, dist: np.ndarray, fetch: int, vec: np.ndarray) -> np.ndarray:
    """The `rows` whose FAISS inner product `dist` is within CUT_MARGIN x |vec| of the
    fetch-th best: every row of the exact top-fetch among `rows` (re-scored in float64 by
    `finish`), in fewer rows to re-score (the base's fetch + the delta's -> ~fetch)."""
    if len(rows) <= fetch:
        return rows
    kth = np.partition(dist, len(dist) - fetch)[len(dist) - fetch]
    return rows[dist >= kth - CUT_MARGIN * math.sqrt(float(vec @ vec))]


def _raw_search(index: faiss.Index, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` for one contiguous float32 query without the Python wrapper's checks
    (distances (1, k), labels (1, k)): ~3 µs of a ~100 µs request, called twice per query."""
    dist = np.empty((1, k), dtype=np.float32)
    labels = np.empty((1, k), dtype=np.int64)
    index.search_c(1, faiss.swig_ptr(x), k, faiss.swig_ptr(dist), faiss.swig_ptr(labels))
    return dist, labels


def _raw_search_preassigned(
    index: faiss.IndexIVF, x: np.ndarray, k: int, iq: np.ndarray, dq: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`index.search_preassigned` for one query on the coarse lists `iq` (distances `dq`),
    without the wrapper: (distances (k,), labels (k,), -1 padded)."""
    dist = np.empty(k, dtype=np.float32)
    labels = np.empty(k, dtype=np.int64)
    index.search_preassigned_c(1, faiss.swig_ptr(x), k, faiss.swig_ptr(iq), faiss.swig_ptr(dq),
                               faiss.swig_ptr(dist), faiss.swig_ptr(labels), False, None)
    return dist, labels


def _delta_ivf(base: FaissTopK, delta: np.ndarray) -> faiss.IndexIVFFlat | None:
    """An IVF-Flat over the `delta` rows (ids 0..nd-1) sharing the coarse quantizer of the base's
    IVF (plain or behind a refinement; None for any other base: Flat, HNSW, a pre-transform).

    The same centroids put a delta row in the list its neighbours in the base occupy, so one
    nprobe serves both segments with the base's recall, and the delta search costs its share of
    the lists. The lists are assigned by one BLAS product with the centroids (exact argmax,
    blocks of 8,192 rows) and filled through `add_core`: FAISS's own `add` runs the quantizer row
    by row below its BLAS threshold (128,000 queries in this build)."""
    outer = faiss.downcast_index(base.index)
    inner = faiss.downcast_index(outer.base_index) if isinstance(outer, faiss.IndexRefine) else outer
    if not isinstance(inner, faiss.IndexIVF) or inner.metric_type != faiss.METRIC_INNER_PRODUCT or inner.d != delta.shape[1]:
        return None
    quantizer = inner.quantizer
    nlist = int(inner.nlist)
    centroids = quantizer.reconstruct_n(0, nlist)
    assign = np.concatenate([
        np.argmax(delta[s : s + 8192] @ centroids.T, axis=1) for s in range(0, len(delta), 8192)
    ]).astype(np.int64) if len(delta) else np.zeros(0, dtype=np.int64)
    index = faiss.IndexIVFFlat(quantizer, int(inner.d), nlist, faiss.METRIC_INNER_PRODUCT)  # keeps a reference to quantizer
    index.nprobe = int(inner.nprobe)
    x = np.ascontiguousarray(delta, dtype=np.float32)
    index.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(assign))
    index.referenced_objects.append(base.index)  # the quantizer's owner lives as long as this index
    return index


class _DeltaIds(Sequence[str]):
    """A delta catalog's ids: the base's id column, then the delta's ids (row order)."""

    def __init__(self, base: ItemIds, delta: list[str]) -> None:
        self.base, self.delta, self.nb = base, delta, len(base)

    def __len__(self) -> int:
        return self.nb + len(self.delta)

    def __getitem__(self, r):  # noqa: ANN001, ANN204 - Sequence's int / slice overloads
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        r = int(r)
        if r < 0:
            r += len(self)
        return self.base[r] if r < self.nb else self.delta[r - self.nb]

    def take(self, rows: np.ndarray) -> list[str]:
        """The ids of `rows` (1-D), in order: the base's in one `ItemIds.take`, the delta's by
        list lookup (an answer mixing both is the common case over a delta catalog)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0 or rows.max() < self.nb:
            return self.base.take(rows)
        in_delta = rows >= self.nb
        delta = self.delta
        got = [delta[r] for r in (rows[in_delta] - self.nb).tolist()]
        if len(got) == len(rows):
            return got
        base_ids, delta_ids = iter(self.base.take(rows[~in_delta])), iter(got)
        return [next(delta_ids) if d else next(base_ids) for d in in_delta.tolist()]

    def __iter__(self) -> Iterator[str]:
        yield from self.base
        yield from self.delta


class _DeltaRows(Mapping[str, int]):
    """id -> row over a delta catalog's live rows: a delta id's delta row, else an untombstoned
    base row (the base's id column), never a tombstoned one. No dict over the base is built."""

    def __init__(self, base: ItemIds, tombstones: np.ndarray, delta: dict[str, int]) -> None:
        self.base, self.tomb, self.delta = base, tombstones, delta
        self.n_live_base = len(base) - int(np.count_nonzero(tombstones))

    def live_base_row(self, item: str) -> int | None:
        r = self.base.row(item)
        return None if r is None or self.tomb[r] else r

    def __getitem__(self, item: str) -> int:
        r = self.get(item)
        if r is None:
            raise KeyError(item)
        return r

    def get(self, item: str, default=None):  # noqa: ANN001, ANN201 - Mapping.get
        r = self.delta.get(item)
        if r is None:
            r = self.live_base_row(item)
        return default if r is None else r

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and self.get(item) is not None

    def __iter__(self) -> Iterator[str]:
        live = np.flatnonzero(~self.tomb)
        for s in range(0, len(live), 1 << 16):
            yield from self.base.take(live[s : s + (1 << 16)])
        yield from self.delta

    def __len__(self) -> int:
        return self.n_live_base + len(self.delta)


def recall_against_exact(topk: TopK, queries: np.ndarray, k: int) -> float:
    """recall@k of `topk.top_k` against an exact scan of every row it may return (a
    `DeltaTopK`'s live rows): the recall gate of a merged base + delta search.

    The exact side is `exact_live_top_k`: one BLAS pass over the base rows as they are (memory
    mapped, no copy, no selector) plus the delta block. At 1M items and 200 queries it took
    0.45 s against 2.2 s for a FAISS flat search with the live rows as a bitmap selector (FAISS
    scans a selector row by row, without BLAS) plus 0.8 s to copy the rows into that flat index
    (docs/bench/update_1m.md).
    """
    q = as_matrix(queries, name="queries", dim=topk.dim)
    k = min(int(k), topk.live_count)
    if len(q) == 0 or k == 0:
        return 1.0
    got = topk.top_k(q, [Query(k)] * len(q))
    truth = exact_live_top_k(topk, q, k)
    hits = 0
    for i, row in enumerate(truth):
        want = {topk.item_ids[r] for r in row.tolist()}
        hits += len(want & {item for item, _ in got[i]})
    return hits / (len(q) * k)


def _blas_knn(queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of each query over `rows` by FAISS's BLAS path. FAISS takes it
    only from `distance_compute_blas_threshold` queries on (set to 128000 in this build: a
    200-query scan of 1M rows then runs row by row, 5x slower), so the threshold is lowered for
    this call (a process-wide knob; it picks the algorithm, not the result)."""
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1
    try:
        return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), rows, k, metric=faiss.METRIC_INNER_PRODUCT)
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def exact_live_top_k(topk: TopK, queries: np.ndarray, k: int) -> list[np.ndarray]:
    """Per query, the rows of the `k` highest exact scores among the rows `topk` may return
    (ties at the cut-off in any order): for a `DeltaTopK` its live rows — the base rows minus
    tombstones, plus the delta rows.

    The base is scanned as it is, tombstones included, for `k` plus a margin of rows (~2x the
    tombstones expected among k, + 8), and the tombstoned ones are dropped; a query left with
    fewer than k live base rows is scanned again with 4x the fetch (at most the whole base). The
    delta rows are scored exactly and merged by score.
    """
    q = as_matrix(queries, name="queries", dim=topk.dim)
    if isinstance(topk, DeltaTopK):
        base, delta = topk.base.embeddings, topk.delta_embeddings
        dead = ~topk.live.mask[: topk.base_count]
    else:
        base, delta = np.asarray(topk.embeddings), np.zeros((0, topk.dim), dtype=np.float32)
        dead = np.zeros(len(base), dtype=bool)
    nb, n_dead = len(base), int(np.count_nonzero(dead))
    k = min(int(k), nb - n_dead + len(delta))
    out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(q)
    if k <= 0 or len(q) == 0:
        return out
    delta_scores = q @ delta.T if len(delta) else np.zeros((len(q), 0), dtype=np.float32)
    need = min(k, nb - n_dead)  # live base rows each query's scan must yield
    fetch = min(nb, k + (8 + 2 * math.ceil(k * n_dead / nb) if n_dead else 0))
    todo = np.arange(len(q))
    while len(todo):
        if nb:
            scores, rows = _blas_knn(q[todo], base, fetch)
            live = rows >= 0
            live[live] = ~dead[rows[live]]
        else:
            scores, rows = np.zeros((len(todo), 0), np.float32), np.zeros((len(todo), 0), np.int64)
            live = np.zeros((len(todo), 0), dtype=bool)
        enough = (live.sum(axis=1) >= need) | (fetch >= nb)
        cand_rows = np.concatenate([rows, np.broadcast_to(nb + np.arange(len(delta)), (len(todo), len(delta)))], axis=1)
        cand = np.concatenate([np.where(live, scores, -np.inf), delta_scores[todo]], axis=1)
        top = np.argpartition(-cand, k - 1, axis=1)[:, :k]
        for j, i in enumerate(todo.tolist()):
            if enough[j]:
                out[i] = cand_rows[j, top[j]]
        todo = todo[~enough]
        fetch = min(nb, 4 * fetch)
    return out
