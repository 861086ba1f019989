"""The served version and its hot reload.

Everything a request needs from one index version — the FAISS index, the item ids, the item
embeddings, the user tower and the two version strings — lives in one immutable
`ServingVersion`. The `VersionHolder` has exactly one reference to the current one; a request
reads that reference once, at its start, and uses nothing else, so every response names exactly
one `(model_version, index_version)` and its items come from that pair, even while a reload
swaps the reference under it.

The `Reloader` polls `INDEX_ROOT/current` from a background thread. When it points at a new
version directory, the version is loaded off to the side (`indexer.store.load_version`, which
checks the manifest and every file's sha256), verified again here (dimensions, counts, the
tower's model version against the index's, finite unit user vectors, the index agreeing with
`embeddings.npy`), and only then swapped in. A version that fails is refused — counted, logged,
remembered so it is not retried every poll — and the old one keeps serving.

`load_serving_version` is also the indexer's last step before it switches `current` (and
`check_user_tower` its first, right after loading the bundle): one acceptance check, run by
both, so `indexer rebuild` can never publish a version the service would refuse.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from indexer import store
from service.metrics import ServiceMetrics
from service.tower import TowerError, UserTower
from training.model import FeatureError

log = logging.getLogger("service.state")

SCORE_CHECK_TOL = 1e-4
# A lossy index must find each of these catalog rows (queried with its own embeddings.npy vector)
# in its top 10 at least this often: a correct SQ/PQ index nearly always does, an index over
# other vectors or another row order almost never (see _check_rows_align).
ALIGNMENT_SAMPLE = 32
ALIGNMENT_MIN_HITS = 0.5


class VersionError(RuntimeError):
    """A version directory that must not be served; the message says why."""


@dataclass(frozen=True, eq=False)
class ServingVersion:
    """One verified (model, index) pair, immutable once built."""

    path: Path
    model_version: str
    index_version: str
    index: faiss.Index
    item_ids: list[str]
    embeddings: np.ndarray  # (count, dim) float32, embeddings.npy (memory-mapped; an ndarray view)
    tower: UserTower
    dim: int
    count: int
    hnsw_ef_search: int | None  # the index's efSearch if it is an HNSW index, else None
    exact_index: bool  # a flat index: its top-k is exact, no fallback ever needed
    loaded_at: float = field(default_factory=time.time)


def _hnsw_of(index: faiss.Index) -> faiss.IndexHNSW | None:
    inner = faiss.downcast_index(index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _version_name(path: Path) -> str:
    """The version a directory holds: the indexer checks `.tmp-<version>` before its rename."""
    return Path(path).name.removeprefix(store.TMP_PREFIX)


def check_user_tower(model: object, name: str) -> UserTower:
    """The version's `UserTower`, or VersionError saying why the service cannot use it.

    Shared with `indexer rebuild`, which calls it right after loading the bundle: a tower the
    service would refuse (e.g. NaN feature statistics in features.json, which make every probe
    user a validation error) must fail the rebuild, not the service after the switch.
    """
    try:
        return UserTower(model)  # type: ignore[arg-type]
    except (TowerError, FeatureError) as e:
        raise VersionError(f"{name}: user tower unusable: {e}") from None


def load_serving_version(
    path: Path, *, ef_search_override: int | None = None, verify: bool = True
) -> ServingVersion:
    """Load and verify one version directory; raise VersionError (or the loader's error).

    `verify=False` skips re-hashing the files (the indexer calls this on a version it has just
    written and verified); every serving check below still runs.
    """
    loaded = store.load_version(path, verify=verify)
    manifest = loaded.manifest
    bundle = loaded.bundle
    model = bundle.model
    name = _version_name(path)

    tower_version = bundle.version
    if loaded.model_version != tower_version or manifest.get("model_version") != tower_version:
        raise VersionError(
            f"{name}: index manifest names model_version {manifest.get('model_version')!r} "
            f"but the bundled user tower is {tower_version!r}"
        )
    index = loaded.index
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise VersionError(f"{name}: index metric is {index.metric_type}, expected inner product")
    dim = int(model.embedding_dim)
    dims = {"user tower": dim, "index": int(index.d), "manifest": manifest.get("dim")}
    embeddings = getattr(loaded, "embeddings", None)
    if embeddings is None:  # an older LoadedIndex without the mapped embeddings
        try:
            embeddings = np.load(Path(loaded.path) / "embeddings.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise VersionError(f"{name}: embeddings.npy unreadable: {e}") from None
    if embeddings.ndim != 2 or embeddings.dtype != np.float32:
        raise VersionError(f"{name}: embeddings.npy is {embeddings.dtype} {embeddings.shape}, expected float32 (n, d)")
    # a plain ndarray over the same mapped pages: np.memmap's Python-level __getitem__ costs ~5 µs
    # per indexing on the request path
    embeddings = embeddings.view(np.ndarray)
    dims["embeddings.npy"] = int(embeddings.shape[1])
    if len(set(dims.values())) != 1:
        raise VersionError(f"{name}: dimension mismatch: {dims}")
    item_ids = list(loaded.item_ids)
    counts = {
        "index": int(index.ntotal),
        "item_ids": len(item_ids),
        "embeddings.npy": int(embeddings.shape[0]),
        "manifest": manifest.get("count"),
    }
    if len(set(counts.values())) != 1:
        raise VersionError(f"{name}: item count mismatch: {counts}")
    if len(set(item_ids)) != len(item_ids):
        raise VersionError(f"{name}: item_ids.txt has duplicate ids")
    tower = check_user_tower(model, name)

    hnsw = _hnsw_of(index)
    ef = None
    if hnsw is not None:
        if ef_search_override is not None:
            hnsw.hnsw.efSearch = int(ef_search_override)
        ef = int(hnsw.hnsw.efSearch)

    version = ServingVersion(
        path=Path(loaded.path),
        model_version=tower_version,
        index_version=str(loaded.index_version),
        index=index,
        item_ids=item_ids,
        embeddings=embeddings,
        tower=tower,
        dim=dim,
        count=len(item_ids),
        hnsw_ef_search=ef,
        exact_index=isinstance(faiss.downcast_index(index), faiss.IndexFlat),
    )
    _smoke_test(version)
    return version


def _smoke_test(version: ServingVersion) -> None:
    """One real query through the whole path: the index must agree with embeddings.npy.

    Every returned row must be a catalog row (no duplicates), and its index score must be within
    `SCORE_CHECK_TOL + ||x̂ − x||` of the exact cosine with its embeddings.npy row `x`, where `x̂`
    is the vector the index stores for that row (`search_and_reconstruct`). For a Flat / HNSW
    flat / IVF flat index `x̂ = x` and this is the 1e-4 check; a quantized index (SQ, PQ) scores
    against `x̂`, and by Cauchy–Schwarz (`q` is a unit vector) its score can differ from the exact
    cosine by at most `||x̂ − x||`, so the tolerance is the index's own quantization error, not
    a guess per index type. That bound holds for any `x̂`, so a lossy index must also show that
    its rows are embeddings.npy's rows (`_check_rows_align`). Served scores are recomputed from
    embeddings.npy in any case (service.retrieval): a quantized index only chooses candidates.
    """
    if version.count == 0:
        return
    from service.tower import UserRecord  # local: keeps the import graph obvious

    name = _version_name(version.path)
    q = version.tower.embed([UserRecord(None, {})])
    k = min(10, version.count)
    try:
        scores, rows, stored = version.index.search_and_reconstruct(q, k)
    except RuntimeError:  # an index type that cannot reconstruct: treat it as exact storage
        scores, rows = version.index.search(q, k)
        stored = None
    rows0, scores0 = rows[0], scores[0]
    valid = rows0 >= 0
    if not valid.any():
        raise VersionError(f"{name}: the index returns no results")
    found = rows0[valid]
    if (found >= version.count).any() or len(np.unique(found)) != len(found):
        raise VersionError(f"{name}: the index returns rows that are not catalog rows: {found.tolist()}")
    exact_rows = np.asarray(version.embeddings[found], dtype=np.float32)
    exact = exact_rows @ q[0]
    error = np.zeros(len(found), dtype=np.float32)
    if stored is not None:
        error = np.linalg.norm(stored[0][valid] - exact_rows, axis=1)
        if not np.isfinite(error).all():
            raise VersionError(f"{name}: the index stores non-finite vectors")
    gap = np.abs(exact - scores0[valid])
    if not np.isfinite(scores0[valid]).all() or (gap > SCORE_CHECK_TOL + error).any():
        raise VersionError(f"{name}: index scores disagree with embeddings.npy (by up to {float(gap.max()):.3g})")
    if error.max() > SCORE_CHECK_TOL:
        _check_rows_align(version)


def _check_rows_align(version: ServingVersion) -> None:
    """A lossy index's row i must hold (an approximation of) embeddings.npy row i.

    Queried with a row's own vector, a correct index returns a row with that vector among its
    top 10 (the row itself, or an identical duplicate); an index built over other vectors, or
    the same vectors in another order, returns rows whose embeddings.npy vectors are others.
    A sample spread over the catalog must mostly succeed (ANN misses are allowed).
    """
    n = version.count
    sample = np.unique(np.linspace(0, n - 1, min(ALIGNMENT_SAMPLE, n)).astype(np.int64))
    queries = np.ascontiguousarray(version.embeddings[sample], dtype=np.float32)
    _, rows = version.index.search(queries, min(10, n))
    hits = 0
    for query, found in zip(queries, rows, strict=True):
        found = found[(found >= 0) & (found < n)]
        if len(found) and float((np.asarray(version.embeddings[found]) @ query).max()) >= 1.0 - SCORE_CHECK_TOL:
            hits += 1
    if hits < ALIGNMENT_MIN_HITS * len(sample):
        raise VersionError(
            f"{_version_name(version.path)}: the index does not hold embeddings.npy's rows: queried with {len(sample)} "
            f"catalog vectors it found the row itself for {hits} (built from other vectors or another row order?)"
        )


class VersionHolder:
    """The single reference to the served version (reads and writes of it are atomic)."""

    def __init__(self) -> None:
        self.current: ServingVersion | None = None


@dataclass
class _Refused:
    target: str
    stamp: float


class Reloader:
    """Polls INDEX_ROOT/current and swaps in new, verified versions (see module docstring)."""

    def __init__(
        self,
        root: Path,
        holder: VersionHolder,
        metrics: ServiceMetrics,
        *,
        interval_s: float,
        ef_search_override: int | None = None,
        freeze_gc: bool = True,
    ) -> None:
        self.root = Path(root)
        self.holder = holder
        self.metrics = metrics
        self.interval_s = interval_s
        self.ef_search_override = ef_search_override
        self.freeze_gc = freeze_gc
        self.last_error: str | None = None
        self._refused: _Refused | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- one poll (what the thread runs; tests call it directly) ------------------------------
    def check_once(self) -> str:
        """Look at `current` once: 'unchanged', 'swapped', 'refused', 'skipped' or 'no-current'."""
        with self._lock:
            try:
                target = store.read_current(self.root)
            except Exception as e:  # noqa: BLE001 - a broken pointer must not kill the poller
                self._note_error(f"reading {self.root}/current failed: {e}")
                return "no-current"
            if target is None:
                if self.holder.current is None:
                    self.last_error = f"{self.root}/current does not exist (run `indexer rebuild`)"
                return "no-current"
            target = Path(target)
            current = self.holder.current
            if current is not None and _same_dir(current.path, target):
                return "unchanged"
            stamp = _stamp(target)
            if self._refused is not None and self._refused.target == str(target) and self._refused.stamp == stamp:
                return "skipped"
            t0 = time.perf_counter()
            try:
                version = load_serving_version(target, ef_search_override=self.ef_search_override)
            except Exception as e:  # noqa: BLE001 - any failure refuses the version, never the service
                self._refused = _Refused(str(target), stamp)
                self.metrics.reloads.labels("failure").inc()
                self._note_error(f"refused index version {target.name}: {e}")
                return "refused"
            self._refused = None
            self.last_error = None
            # Published before the swap, which cannot fail: whoever sees the new version (a
            # /readyz poll) also sees it counted. (After the swap, they lagged it by the GC
            # pass below — hundreds of ms on a loaded machine — and a test reading the counter
            # right after /readyz changed failed now and then.)
            self.metrics.reloads.labels("success").inc()
            self.metrics.set_version(version.model_version, version.index_version, version.count, time.time())
            previous = self.holder.current
            self.holder.current = version  # the swap: one reference assignment
            previous_name = previous.index_version if previous else None
            del previous, version
            gc_ms = _freeze_heap() if self.freeze_gc else None
            version = self.holder.current
            log.info(
                "serving new version",
                extra={
                    "fields": {
                        "model_version": version.model_version,
                        "index_version": version.index_version,
                        "items": version.count,
                        "previous_index_version": previous_name,
                        "load_ms": round((time.perf_counter() - t0) * 1000, 1),
                        "gc_freeze_ms": gc_ms,
                        "numpy_tower": version.tower.fast is not None,
                    }
                },
            )
            return "swapped"

    def _note_error(self, message: str) -> None:
        self.last_error = message
        log.error(message)

    # ---- background thread ----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="index-reloader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                self.check_once()
            except Exception:  # noqa: BLE001 - keep polling whatever happens
                log.exception("reload poll failed")
            if self._stop.wait(self.interval_s):
                return


def _freeze_heap() -> float:
    """Collect the previous version's garbage, then exempt everything alive from the cyclic GC.

    A loaded version is hundreds of thousands of long-lived objects (vocabularies, id lists,
    config). CPython's full (generation 2) collection walks all of them: ~100 ms at 1M items,
    triggered every few seconds under load, stalling the event loop (and timing out Redis calls
    that were in flight). `gc.freeze()` moves them to a permanent generation the collector skips;
    they are still freed by reference counting when the version is dropped. The full collection
    here runs once per swap, in the reloader thread. Returns its duration in ms.
    """
    t0 = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return round((time.perf_counter() - t0) * 1000, 1)


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _stamp(path: Path) -> float:
    """Changes when a refused directory is replaced (a rebuild reusing the name)."""
    try:
        return (path / "manifest.json").stat().st_mtime
    except OSError:
        return -1.0
