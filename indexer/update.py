"""`indexer update`: a live catalog between nightly rebuilds (new, changed, removed items).

The nightly `indexer rebuild` stays the source of truth; an update publishes a *delta version*
(layout in `indexer.version`) that shares the base version's index and embeddings and holds
only what changed, so a new item, a retired item or a price change is served within seconds.
Every invariant of a rebuild holds: the served item vectors come from the served bundle's item
tower, a failed or killed update never touches what is served, and a version is one
consistent (model, index, catalog) triple.

Two inputs, one diff:

* `--data DATASET_DIR`: the dataset's whole `items.csv` (the nightly export, or a fresher one)
  is the new catalog;
* `--upsert FILE` and/or `--remove FILE` (a stream of item events): the current catalog, with
  the upsert rows (items.csv format: `item_id` + feature and attribute columns) added or
  replacing, and the ids of the remove file (a CSV with an `item_id` column; other columns are
  ignored, so an items.csv-shaped file works too) dropped.

The stages (each timed and logged, like a rebuild's):

1. **lock** `INDEX_ROOT/.lock` (the rebuild's lock: an update and a rebuild never interleave),
   remove `.tmp-*` leftovers of killed runs;
2. **load** the current version: its bundle (the item tower that embeds the delta), its base
   opened once (`indexer.version.open_base`: index, memory-mapped rows, id map — shared by the
   diff, the gate and the acceptance load), the base's feature fingerprints, its own delta;
3. **diff** by item id and feature fingerprint (`indexer.version.feature_fingerprints`): an
   item whose features are unchanged keeps its vector (base row or carried delta row) — an
   attribute-only change re-embeds nothing; a new or feature-changed item is embedded with the
   current version's item tower (a fresh id takes the out-of-vocabulary id path, exactly as at
   rebuild); the base rows of removed and changed items are tombstoned. The delta is always
   against the base, so a chain of updates stays one level deep. A delta over `max_delta` of
   the catalog (rows in the delta segment or tombstones, 5 % by default) is refused: the merged
   search costs more with every delta row, and past a few percent a `rebuild` (which compacts everything
   into a fresh base) is the right tool;
4. **gate**: recall@k of the merged search (base ANN with tombstones excluded ∪ the delta —
   exact, or above `indexer.topk.DELTA_EXACT_MAX_ROWS` rows over an IVF base a delta IVF on the
   base's centroids, approximate like the base)
   against an exact scan of the live catalog (`indexer.topk.exact_live_top_k`: one BLAS pass
   over the base rows, tombstones dropped, plus the delta), on user queries as at rebuild (an
   exact base index is exact by construction, as at rebuild);
5. **write** `.tmp-<version>/` (with the live catalog's `item_ids.txt` + `embeddings.npy`,
   INTERFACES §2), fsync, load it exactly as the service will (`indexer.version.load_version`,
   sharing the opened base), rename; **switch** `current`; **prune** (never a base a kept
   version references).

A SIGKILL at any point leaves `current` and its files untouched; the next run cleans up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from indexer import faiss_index as fi
from indexer import store
from indexer.attributes import AttributeTable
from indexer.itemids import ItemIds
from indexer.rebuild import (
    RebuildInputError,
    RecallGateError,
    _checkpoint,
    _embed,
    _service_accepts,
    _Timer,
    check_catalog,
    gate_queries,
    read_catalog,
)
from indexer.topk import DeltaTopK, TopK, recall_against_exact
from indexer.version import (
    FINGERPRINTS,
    MODEL_DIR,
    VerifiedBase,
    base_path,
    feature_fingerprints,
    open_attributes,
    open_base,
    open_delta,
    open_fingerprints,
    read_manifest,
)
from training.bundle import BundleError, load_bundle
from training.dataset import read_item_rows
from training.schema import AttributeSpec, DatasetError, Schema

log = logging.getLogger("indexer.update")

STAGES = ("locked", "embedded", "write:model", "write:embeddings", "write:manifest", "renamed", "switched")
DEFAULT_MAX_DELTA = 0.05


class UpdateInputError(RebuildInputError):
    """The index root, the current version or the update's input is unusable (exit 2)."""


class DeltaTooLargeError(RuntimeError):
    """The delta would exceed `max_delta` of the catalog: run `indexer rebuild` (exit 6)."""


def _current_rows(topk: TopK, ids: list[str]) -> np.ndarray:
    """The live row of each of `ids` in the served catalog `topk` (-1: not in it), by its id
    column in bulk (`ItemIds.rows_of`: 1M ids ~1-2 s; one `rows.get` each through the
    memory-mapped column: ~6 s): a delta catalog's live base rows, then its delta rows."""
    if isinstance(topk, DeltaTopK) and isinstance(topk.base.item_ids, ItemIds):
        out = topk.base.item_ids.rows_of(ids)
        found = out >= 0
        out[found & ~topk.live_base[np.maximum(out, 0)]] = -1  # tombstoned
        delta = topk.rows.delta
        in_delta = np.fromiter((delta.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        return np.where(in_delta >= 0, in_delta, out)
    if isinstance(topk.item_ids, ItemIds):
        return topk.item_ids.rows_of(ids)
    rows_of = topk.rows
    return np.fromiter((rows_of.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))


@dataclass
class UpdateConfig:
    """Options of `indexer update` (see `indexer update --help`)."""

    root: Path
    data: Path | None = None
    upsert: Path | None = None
    remove: Path | None = None
    max_delta: float = DEFAULT_MAX_DELTA
    recall_gate: float = 0.95
    gate_k: int = 100
    gate_queries: int = 200
    keep: int = 5
    seed: int = 0
    embed_batch: int = 65_536


@dataclass
class UpdateResult:
    path: Path
    manifest: dict
    stats: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    pruned: list[Path] = field(default_factory=list)
    cleaned: list[Path] = field(default_factory=list)


def _validate(cfg: UpdateConfig) -> None:
    if cfg.data is None and cfg.upsert is None and cfg.remove is None:
        raise UpdateInputError("give --data DATASET_DIR, or --upsert FILE and/or --remove FILE")
    if cfg.data is not None and (cfg.upsert is not None or cfg.remove is not None):
        raise UpdateInputError("--data (a whole catalog) and --upsert/--remove (item events) are exclusive")
    if cfg.data is not None and not Path(cfg.data).is_dir():
        raise UpdateInputError(f"--data {cfg.data}: no such directory")
    for what, p in (("--upsert", cfg.upsert), ("--remove", cfg.remove)):
        if p is not None and not Path(p).is_file():
            raise UpdateInputError(f"{what} {p}: no such file")
    if not 0.0 <= cfg.max_delta <= 1.0:
        raise UpdateInputError(f"--max-delta must be in [0, 1], got {cfg.max_delta}")
    if not 0.0 <= cfg.recall_gate <= 1.0:
        raise UpdateInputError(f"--recall-gate must be in [0, 1], got {cfg.recall_gate}")
    for name in ("gate_k", "gate_queries", "keep", "embed_batch"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UpdateInputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")


@dataclass
class _Previous:
    """The current version as the diff sees it: its row space (base rows, then its delta rows),
    searched by `topk` (its live id -> row map is what the diff looks items up in), and its base
    as opened once for the diff, the gate and the acceptance load (`indexer.version.open_base`)."""

    path: Path
    manifest: dict
    base: VerifiedBase
    topk: TopK  # the base's FaissTopK, or a DeltaTopK over it (current is a delta version)
    hashes: np.ndarray  # uint64 (rows,)
    delta_vectors: np.ndarray  # float32 (rows - nb, d)

    @property
    def base_rows(self) -> int:
        return int(self.base.manifest["count"])

    @property
    def live(self) -> np.ndarray:
        """bool (rows,): the rows current serves."""
        if isinstance(self.topk, DeltaTopK):
            return self.topk.live.mask
        return np.ones(self.topk.count, dtype=bool)

    @cached_property
    def ids(self) -> np.ndarray:
        return np.array(self.topk.item_ids, dtype=object)


def _read_previous(root: Path) -> _Previous:
    cur = store.read_current(root)
    if cur is None:
        raise UpdateInputError(f"{root}: no current index version to update; run indexer rebuild first")
    m = read_manifest(cur)
    base_dir = base_path(cur, m) if m.get("delta") is not None else cur
    bm = read_manifest(base_dir)
    if FINGERPRINTS not in bm["files"]:
        raise UpdateInputError(
            f"{base_dir.name} has no {FINGERPRINTS} (built before updates existed); run indexer rebuild once, then update"
        )
    base = open_base(base_dir, bm)
    hashes = np.asarray(open_fingerprints(base_dir / FINGERPRINTS, int(bm["count"])))
    vectors = np.zeros((0, int(bm["dim"])), dtype=np.float32)
    topk: TopK = base.topk
    if m.get("delta") is not None:
        vectors, d_ids, tomb, d_hash = open_delta(cur, m)
        try:
            topk = DeltaTopK(base.topk, vectors, d_ids, tomb)
        except ValueError as e:
            raise UpdateInputError(f"{cur.name}: {e}") from None
        hashes = np.concatenate([hashes, np.asarray(d_hash)])
    return _Previous(cur, m, base, topk, hashes, vectors)


def _read_removals(path: Path) -> list[str]:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError, UnicodeDecodeError) as e:
        raise UpdateInputError(f"--remove {path}: cannot be parsed: {str(e).splitlines()[0]}") from None
    if "item_id" not in df.columns:
        raise UpdateInputError(f"--remove {path}: needs an 'item_id' column (header line), has {list(df.columns)[:10]}")
    return df["item_id"].astype(str).tolist()


@dataclass
class _Catalog:
    """The new catalog: ids in catalog order, their fingerprints, attribute cells (row-aligned),
    and the rows to embed from (`features`, aligned by position `feature_offset` on)."""

    ids: np.ndarray
    hashes: np.ndarray
    attributes: pd.DataFrame | None
    specs: dict[str, AttributeSpec]
    features: pd.DataFrame
    feature_offset: int
    removed_unknown: int = 0


def _catalog_from_data(cfg: UpdateConfig, model) -> _Catalog:  # noqa: ANN001
    items, schema = read_catalog(Path(cfg.data), model)
    specs = dict(schema.item_attributes)
    attrs = items[list(specs)].reset_index(drop=True) if specs else None
    ids = items["item_id"].astype(str).to_numpy(dtype=object)
    return _Catalog(ids, feature_fingerprints(items, list(model.item_schema)), attrs, specs, items, 0)


def _catalog_from_events(cfg: UpdateConfig, model, prev: _Previous) -> _Catalog:  # noqa: ANN001
    entry = prev.manifest.get("attributes") or {}
    try:
        specs = {n: AttributeSpec.from_json(n, {k: v for k, v in d.items() if k in ("type", "separator")}, f"attribute {n!r}")
                 for n, d in entry.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UpdateInputError(f"{prev.path.name}: manifest attributes unreadable ({e})") from None
    schema = Schema(item=dict(model.item_schema), item_attributes=specs)
    if cfg.upsert is not None:
        try:
            ups = read_item_rows(cfg.upsert, schema)
        except (DatasetError, OSError) as e:
            raise UpdateInputError(f"--upsert: {e}") from None
        check_catalog(ups, schema, model, f"--upsert {cfg.upsert}")
    else:
        ups = pd.DataFrame({"item_id": pd.Series([], dtype=str), **{n: pd.Series([], dtype=str) for n in [*model.item_schema, *specs]}})
    removed = set(_read_removals(Path(cfg.remove))) if cfg.remove is not None else set()
    up_ids = ups["item_id"].astype(str).to_numpy(dtype=object)
    both = removed.intersection(up_ids.tolist())
    if both:
        raise UpdateInputError(f"item {sorted(both)[0]!r} is both upserted and removed ({len(both)} such ids)")
    live_rows = np.flatnonzero(prev.live)
    live_ids = prev.ids[live_rows]
    drop = pd.Index(live_ids).isin(list(removed | set(up_ids.tolist())))
    unknown = len(removed) - int(np.count_nonzero(pd.Index(live_ids).isin(list(removed))))
    keep_rows = live_rows[~drop]
    ids = np.concatenate([prev.ids[keep_rows], up_ids])
    hashes = np.concatenate([prev.hashes[keep_rows], feature_fingerprints(ups, list(model.item_schema))])
    attrs = None
    if specs:
        table = open_attributes(prev.path, prev.manifest)
        assert table is not None
        old = table.to_frame().iloc[keep_rows]
        attrs = pd.concat([old, ups[list(specs)]], ignore_index=True)
    return _Catalog(ids, hashes, attrs, specs, ups.reset_index(drop=True), len(keep_rows), unknown)


def update(cfg: UpdateConfig) -> UpdateResult:
    """Run the whole job (module docstring). Raises `store.LockHeldError`, `UpdateInputError`,
    `DeltaTooLargeError`, `RecallGateError` or `ServingCheckError`; in every failure case
    `current` is untouched and no partial version directory remains."""
    _validate(cfg)
    root = Path(cfg.root)
    if not root.is_dir():
        raise UpdateInputError(f"--root {root}: no such directory")
    timer = _Timer()
    t_start = time.perf_counter()
    with store.publishing(root) as cleaned:
        _checkpoint("locked")

        with timer.stage("load"):
            prev = _read_previous(root)
            try:
                bundle = load_bundle(prev.path / MODEL_DIR, verify=True)
            except BundleError as e:
                raise UpdateInputError(f"{prev.path.name}: {e}") from None
            model = bundle.model
            if cfg.data is not None:
                cat = _catalog_from_data(cfg, model)
            else:
                cat = _catalog_from_events(cfg, model, prev)

        with timer.stage("diff"):
            nb = prev.base_rows
            # each catalog item's row in the current version (-1: new)
            prev_row = _current_rows(prev.topk, cat.ids.tolist())
            known = prev_row >= 0
            same = known & (prev.hashes[np.maximum(prev_row, 0)] == cat.hashes)
            keep_base = same & (prev_row < nb)
            carry = same & (prev_row >= nb)
            embed = ~same
            tomb = np.ones(nb, dtype=bool)
            tomb[prev_row[keep_base]] = False
            delta_pos = np.flatnonzero(carry | embed)
            stats = {
                "catalog": len(cat.ids), "new": int(np.count_nonzero(~known)),
                "feature_changed": int(np.count_nonzero(known & ~same)),
                "removed": int(prev.topk.live_count - np.count_nonzero(known)),
                "embedded": int(np.count_nonzero(embed)), "delta_rows": len(delta_pos),
                "tombstones": int(np.count_nonzero(tomb)), "base": prev.base.path.name, "previous": prev.path.name,
            }
            if cat.removed_unknown:
                stats["removed_unknown_ids"] = cat.removed_unknown
            if len(cat.ids) == 0:
                raise UpdateInputError("the update would leave an empty catalog")
            fraction = max(len(delta_pos), stats["tombstones"]) / len(cat.ids)
            stats["delta_fraction"] = round(fraction, 6)
            log.info("diff against %s (base %s): %s", prev.path.name, prev.base.path.name, stats)
            if fraction > cfg.max_delta:
                raise DeltaTooLargeError(
                    f"the delta against base {prev.base.path.name} would be {max(len(delta_pos), stats['tombstones'])} rows "
                    f"({100 * fraction:.2f} % of {len(cat.ids)} items) > --max-delta {100 * cfg.max_delta:g} %; "
                    "run indexer rebuild (it compacts the catalog into a fresh base); current unchanged"
                )

        with timer.stage("embed"):
            dim = int(prev.base.manifest["dim"])
            vectors = np.empty((len(delta_pos), dim), dtype=np.float32)
            carried = carry[delta_pos]
            vectors[carried] = prev.delta_vectors[prev_row[delta_pos[carried]] - nb]
            todo = delta_pos[~carried]
            if len(todo):
                rows = cat.features.iloc[todo - cat.feature_offset]
                if (todo < cat.feature_offset).any():  # pragma: no cover - events only embed upserted rows
                    raise AssertionError("an unchanged item was scheduled for embedding")
                fresh = model.embed_items(rows) if len(rows) <= cfg.embed_batch else _embed(model, rows, cfg.embed_batch, False)
                try:
                    fresh = fi.as_matrix(fresh, name="item vectors from the model", dim=dim)
                    fi.check_unit_rows(fresh, name="item vectors from the model")
                except ValueError as e:
                    raise UpdateInputError(f"model {bundle.version}: {e}") from None
                vectors[~carried] = fresh
            vocab = set(model.item_encoder.ids.tokens)
            stats["fresh_ids"] = int(sum(1 for i in cat.ids[todo].tolist() if i not in vocab)) if len(todo) else 0
            delta_ids = [str(i) for i in cat.ids[delta_pos].tolist()]
            attributes = None
            if cat.attributes is not None:
                # merged row order: base rows (the item's cells if live, else missing), delta rows
                new_pos_of_base = np.full(nb, len(cat.ids), dtype=np.int64)
                new_pos_of_base[prev_row[keep_base]] = np.flatnonzero(keep_base)
                order = np.concatenate([new_pos_of_base, delta_pos])
                empty = pd.DataFrame({c: [""] for c in cat.attributes.columns})
                cells = pd.concat([cat.attributes, empty], ignore_index=True).iloc[order].reset_index(drop=True)
                attributes = AttributeTable.from_frame(cells, cat.specs)
        _checkpoint("embedded")

        with timer.stage("gate"):
            merged = DeltaTopK(prev.base.topk, vectors, delta_ids, tomb)
            k = min(cfg.gate_k, merged.live_count)
            if merged.approximate:
                rng = np.random.default_rng(cfg.seed)
                queries, kind = gate_queries(model, cfg.data, prev.base.topk.embeddings, cfg.gate_queries, rng)
                value = recall_against_exact(merged, queries, k)
                recall = {"k": k, "value": round(float(value), 6), "threshold": cfg.recall_gate,
                          "n_queries": len(queries), "queries": kind, "merged": True}
                log.info("recall gate (base %s + delta): recall@%d = %.4f on %d %s queries (threshold %.3f)",
                         fi.index_family(merged.index), k, value, len(queries), kind, cfg.recall_gate)
                if value < cfg.recall_gate:
                    raise RecallGateError(
                        f"recall gate failed: merged recall@{k} = {value:.4f} < {cfg.recall_gate}; current kept", recall
                    )
            else:
                recall = {"k": k, "value": 1.0, "threshold": cfg.recall_gate, "n_queries": 0,
                          "queries": "none (exact base index and exact delta)", "merged": True}
            del merged

        version = store.new_version_name()
        with timer.stage("write"):
            extra = {
                "catalog": {"items": len(cat.ids), "fresh_items": stats["fresh_ids"],
                            "data": str(Path(cfg.data).resolve()) if cfg.data is not None else None},
                "update": stats, "timings_s": timer.timings,
            }
            path = store.write_delta_version(
                root, version, base=prev.base, delta_embeddings=vectors, delta_ids=delta_ids,
                delta_fingerprints=cat.hashes[delta_pos].astype(np.uint64), tombstones=tomb,
                bundle_path=prev.path / MODEL_DIR, model_version=bundle.version,
                index_info=prev.base.manifest["index"], recall=recall, extra=extra, checkpoint=_checkpoint,
                accept=lambda tmp: _service_accepts(tmp, base=prev.base), attributes=attributes,
            )
        _checkpoint("renamed")

        with timer.stage("switch"):
            try:
                store.switch_current(root, version)
            except BaseException:
                try:
                    store.delete_version(root, path)
                except OSError as e:
                    log.warning("could not remove the unswitched version %s: %s", path, e)
                raise
        log.info("current -> %s (was %s; base %s)", version, prev.path.name, prev.base.path.name)
        _checkpoint("switched")
        pruned = store.prune(root, cfg.keep)
        if pruned:
            log.info("pruned %d old version(s): %s", len(pruned), [p.name for p in pruned])
    timer.timings["total"] = round(time.perf_counter() - t_start, 3)
    log.info("update done in %.1fs: %s", timer.timings["total"], timer.timings)
    return UpdateResult(path=path, manifest=read_manifest(path), stats=stats, timings=timer.timings, pruned=pruned,
                        cleaned=cleaned)
