"""Hot reload of the served version.

Everything a request needs from one index version — the user tower, the top-k over the catalog,
the two version strings — lives in one immutable `indexer.version.ServedVersion`. The
`VersionHolder` has exactly one reference to the current one; a request reads that reference
once, at its start, and uses nothing else, so every response names exactly one
`(model_version, index_version)` and its items come from that pair, even while a reload swaps
the reference under it.

The `Reloader` polls `INDEX_ROOT/current` from a background thread. When it points at a new
version directory, the version is loaded off to the side with `indexer.version.load_version` —
the same acceptance check `indexer rebuild` runs before it switches `current` (checksums, counts,
dimensions, the tower's model version against the index's, finite unit user vectors, the index
agreeing with `embeddings.npy`) — and only then swapped in. A delta version (`indexer update`)
on the base the served version already searches reuses that base as it was checked and opened
(`load_version(..., base=)`): only the delta's own files are read and hashed, so a catalog
update is served within a fraction of a second of `current` switching, whatever the base's size. A version that fails is refused —
counted, logged, remembered so it is not retried every poll — and the old one keeps serving.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from indexer import store
from indexer.version import ServedVersion, load_version
from service.metrics import ServiceMetrics

log = logging.getLogger("service.state")


class VersionHolder:
    """The single reference to the served version (reads and writes of it are atomic)."""

    def __init__(self) -> None:
        self.current: ServedVersion | None = None


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
        exact_fallback_max_items: int = 5_000_000,
        freeze_gc: bool = True,
    ) -> None:
        self.root = Path(root)
        self.holder = holder
        self.metrics = metrics
        self.interval_s = interval_s
        self.ef_search_override = ef_search_override
        self.exact_fallback_max_items = exact_fallback_max_items
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
                # a delta version on the base already served shares that base's checked,
                # opened index and rows instead of reading and hashing them again
                version = load_version(
                    target, ef_search_override=self.ef_search_override,
                    exact_fallback_max_items=self.exact_fallback_max_items,
                    base=current.verified_base if current is not None else None,
                )
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
    """Collect what is not frozen yet, then exempt everything alive from the cyclic GC.

    A process holds hundreds of thousands of long-lived objects (the imported libraries, the
    loaded version's vocabularies and config). CPython's full (generation 2) collection walks
    all of them, ~150 ms per pass on a 20k-item catalog, triggered every few seconds under load,
    stalling the event loop. `gc.freeze()` moves them to a permanent generation the collector
    skips; they are still freed by reference counting when the version is dropped (a swapped-out
    `ServedVersion` holds no reference cycle: tests/service/test_reload.py checks it is freed at
    the swap with the collector off).

    What is collected here is only what came since the last swap — the new version and the
    requests' garbage — because the objects frozen at earlier swaps stay frozen. (Unfreezing
    first, as this did before, made every swap walk the whole heap again: six swaps of a
    20k-item version in one process took 132-187 ms each, now 0.4-0.7 ms after the first;
    `python -m bench.serve --scenarios retrieve_miss,retrieve_miss_swaps` reports the tail latency
    with a swap every `--swap-every` seconds next to none, docs/bench/swap.md.) The
    collection before the freeze keeps cyclic garbage of that interval from being frozen
    forever. Runs in the reloader thread, once per swap; returns its duration in ms.
    """
    t0 = time.perf_counter()
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
