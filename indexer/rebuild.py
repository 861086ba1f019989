"""The nightly index rebuild: catalog + model bundle → a new, verified, gated index version.

A rebuild must never hurt serving: it either produces a better, verified index and switches
`INDEX_ROOT/current` to it, or changes nothing. The stages, each timed and logged:

1. **lock** `INDEX_ROOT/.lock` (fail fast if another run holds it); remove `.tmp-*` leftovers
   of killed runs;
2. **load** the model bundle (the newest in a models directory) and read the catalog
   (`items.csv` / `.parquet`), checking the model's item features are columns of it, and its
   declared attributes (`schema.json` `item.attributes`) into the columnar attribute table;
3. **embed** every catalog item with the item tower. Items added since training have
   out-of-vocabulary ids and get their vector from their features alone, so new items are
   retrievable the next night without retraining; removed items simply are not embedded;
4. check every vector is finite and unit-norm;
5. **build** the index (`--index auto` picks by catalog size, see `faiss_index.auto_spec`);
6. **tune** efSearch / nprobe (unless given) on one query sample, then **gate**: recall@k of
   the new index against exact search on a disjoint sample. Queries are real user vectors
   (users of `users.csv`, or trained user ids, through the user tower) — what the service
   will search with — falling back to item vectors. Below the threshold the run fails and
   `current` stays;
7. **write** `.tmp-<version>/` (bundle copy, embeddings, ids, index, attributes, manifest), fsync, verify,
   load it exactly as the service will (`indexer.version.load_version`: the service's own
   acceptance check, so a version it would refuse is never published), rename to `<version>/`;
8. **switch** `current` atomically; **prune** to the newest `keep` versions (never `current`).

A SIGKILL at any point leaves `current` and its files untouched; the next run cleans up.

Under `torchrun --nproc_per_node=N -m indexer.cli rebuild ...` (`rebuild_on_ranks`) step 3 is
shared: rank 0 runs the job, preallocates the catalog's vectors as one memory-mapped `.npy`
under INDEX_ROOT and hands every rank a contiguous run of whole `embed_batch` chunks; each rank
embeds its chunks into the array with its own copy of the bundle; rank 0 then checks the count
and, as always, finiteness and unit norm, and does every other step alone. Chunks are the unit
of work, so every row is computed in the same item-tower call as in one process and the
embeddings are byte-identical to a one-process rebuild with the same `--embed-batch`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from tqdm import tqdm

from indexer import faiss_index as fi
from indexer import store
from indexer.attributes import AttributeTable
from indexer.version import (
    IndexVersionError,
    VerifiedBase,
    check_model_servable,
    feature_fingerprints,
    load_version,
    read_manifest,
)
from training.artifacts import TMP_PREFIX, check_output_dir
from training.bundle import Bundle, BundleError, find_bundle, load_bundle
from training.dataset import read_items, read_schema, read_users
from training.distributed import RankFailedError, Ranks, ShardMismatchError
from training.model import TwoTowerModel
from training.schema import DatasetError, Schema

log = logging.getLogger("indexer.rebuild")

# Test-only hook: INDEXER_TEST_HOOK="kill:<stage>" makes the process SIGKILL itself at that
# stage; "pause:<stage>" writes INDEXER_TEST_HOOK_FILE and sleeps so a test can kill it (or
# race it) from outside. Never set in production.
TEST_HOOK_ENV = "INDEXER_TEST_HOOK"
TEST_HOOK_FILE_ENV = "INDEXER_TEST_HOOK_FILE"
STAGES = ("locked", "embedded", "built", "write:model", "write:embeddings", "write:manifest", "renamed", "switched")


class RebuildInputError(ValueError):
    """The model, the catalog or the options are unusable (bad input: fix and re-run)."""


class ServingCheckError(IndexVersionError):
    """The service's acceptance check refused the new version; nothing was switched (exit 5)."""


class RecallGateError(RuntimeError):
    """The new index's recall is below the gate; nothing was switched."""

    def __init__(self, message: str, recall: dict) -> None:
        super().__init__(message)
        self.recall = recall


@dataclass
class RebuildConfig:
    """Options of `indexer rebuild` (see `indexer rebuild --help`)."""

    model: Path
    data: Path
    out: Path
    index: str = "auto"
    ef_search: int | None = None
    nprobe: int | None = None
    ef_construction: int | None = None
    recall_gate: float = 0.95
    gate_k: int = 100
    gate_queries: int = 1000
    tune_queries: int = 500
    tune_margin: float = 0.01
    keep: int = 5
    seed: int = 0
    threads: int | None = None
    embed_batch: int = 65_536
    progress: bool | None = None  # None: only when stderr is a terminal


@dataclass
class RebuildResult:
    path: Path
    manifest: dict
    timings: dict[str, float] = field(default_factory=dict)
    pruned: list[Path] = field(default_factory=list)
    cleaned: list[Path] = field(default_factory=list)


def _checkpoint(stage: str) -> None:
    hook = os.environ.get(TEST_HOOK_ENV, "")
    if not hook or ":" not in hook:
        return
    action, _, at = hook.partition(":")
    if at != stage:
        return
    marker = os.environ.get(TEST_HOOK_FILE_ENV)
    if marker:
        Path(marker).write_text(f"{stage} {os.getpid()}\n")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "pause":
        time.sleep(float(os.environ.get("INDEXER_TEST_PAUSE_S", "60")))


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        yield
        dt = time.perf_counter() - t0
        self.timings[name] = round(dt, 3)
        log.info("stage %s done in %.2fs", name, dt)


def _progress_enabled(cfg: RebuildConfig) -> bool:
    if cfg.progress is not None:
        return cfg.progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _validate(cfg: RebuildConfig) -> None:
    if not 0.0 <= cfg.recall_gate <= 1.0:
        raise RebuildInputError(f"--recall-gate must be in [0, 1], got {cfg.recall_gate}")
    for name in ("gate_k", "gate_queries", "tune_queries", "keep", "embed_batch"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise RebuildInputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    for name in ("ef_search", "nprobe", "ef_construction", "threads"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise RebuildInputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    # numpy's and FAISS's seeds are unsigned: without this, -1 fails deep inside numpy with a
    # message that names no option
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**31:
        raise RebuildInputError(f"--seed must be an integer in [0, 2^31), got {cfg.seed!r}")


def _check_out(root: Path) -> None:
    """Refuse an INDEX_ROOT the run could not publish into, before any work is done.

    A regular file as `--out` made `mkdir` fail with a bare FileExistsError; a `current` that is
    a real directory (not the symlink `switch_current` replaces) was only found at the switch,
    after the whole build, leaving an orphan version directory behind.
    """
    try:
        check_output_dir(root, "--out")
    except ValueError as e:
        raise RebuildInputError(str(e)) from None
    link = root / store.CURRENT
    if link.exists() and not link.is_symlink():
        raise RebuildInputError(
            f"--out {root}: {link} is not a symlink (a real {'directory' if link.is_dir() else 'file'}); "
            "move it away so the indexer can manage the current pointer"
        )


def _load_catalog(data: Path, model: TwoTowerModel) -> tuple[pd.DataFrame, AttributeTable | None]:
    """The checked catalog, and its attribute table when schema.json declares attributes."""
    items, schema = read_catalog(data, model)
    attributes = AttributeTable.from_frame(items, schema.item_attributes) if schema.item_attributes else None
    return items, attributes


def read_catalog(data: Path, model: TwoTowerModel) -> tuple[pd.DataFrame, Schema]:
    """The catalog of a dataset directory, checked against the model (RebuildInputError)."""
    try:
        schema = read_schema(data)
        items = read_items(data, schema)
    except (DatasetError, OSError) as e:
        raise RebuildInputError(str(e)) from None
    check_catalog(items, schema, model, str(data))
    return items, schema


def check_catalog(items: pd.DataFrame, schema: Schema, model: TwoTowerModel, data: str) -> None:
    """The model's item features are columns of `items` with the trained types; ids one-line."""
    # the item tower silently treats an absent column as all-missing; refuse instead
    missing = [n for n in model.item_schema if n not in items.columns]
    if missing:
        raise RebuildInputError(f"{data}: items lack the model's item feature column(s) {missing}")
    for name, spec in model.item_schema.items():
        declared = schema.item.get(name)
        if declared is not None and declared.type != spec.type:
            raise RebuildInputError(
                f"{data}/schema.json: item feature {name!r} is {declared.type}, the model was trained with {spec.type}"
            )
    bad = items["item_id"].astype(str).str.contains("[\r\n]", regex=True)
    if bad.any():
        raise RebuildInputError(f"{data}: item id {items['item_id'][bad].iloc[0]!r} contains a line break")


def _embed(
    model: TwoTowerModel, items: pd.DataFrame, batch: int, progress: bool,
    out: np.ndarray | None = None, rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """Item vectors of the catalog in `batch`-row chunks, into `out` (default: a new array);
    `rows` [lo, hi): only those rows (lo a multiple of `batch`: a rank's share)."""
    n = len(items)
    lo, hi = rows or (0, n)
    out = np.empty((n, model.embedding_dim), dtype=np.float32) if out is None else out
    with tqdm(total=hi - lo, desc="embed items", unit="item", disable=not progress, file=sys.stderr) as bar:
        for s in range(lo, hi, batch):
            chunk = items.iloc[s : min(s + batch, hi)]
            out[s : s + len(chunk)] = model.embed_items(chunk)
            bar.update(len(chunk))
    return out


def rank_rows(n: int, batch: int, ranks: Ranks) -> tuple[int, int]:
    """Catalog rows [lo, hi) this rank embeds: a contiguous run of whole `batch`-row chunks
    (the chunks split as evenly as whole chunks allow; a rank may get none)."""
    chunks = -(-n // batch)
    first, last = chunks * ranks.rank // ranks.world, chunks * (ranks.rank + 1) // ranks.world
    return min(first * batch, n), min(last * batch, n)


class RankEmbedding:
    """Rank 0's side of the shared embedding step (the others run `serve_embedding`).

    `embed` preallocates the memory-mapped array, sends the job (array, bundle, catalog, row
    count, chunk size) to every rank, embeds rank 0's chunks, collects every rank's status and
    checks the rows written add up to the catalog. `close` (always called) releases ranks still
    waiting for a job that will never come (rank 0 failed before the embedding step) and
    deletes the array.
    """

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.sent = False
        self.path: Path | None = None

    def embed(self, root: Path, bundle_path: Path, data: Path, model: TwoTowerModel, items: pd.DataFrame, batch: int,
              progress: bool) -> np.ndarray:
        n, dim = len(items), model.embedding_dim
        self.path = root / f"{TMP_PREFIX}embeddings-{os.getpid()}.npy"
        out = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(n, dim))
        self.sent = True
        self.ranks.broadcast({"array": str(self.path), "bundle": str(bundle_path), "data": str(data), "n": n,
                              "dim": dim, "batch": batch})
        status = _embed_rank(self.ranks, lambda: (model, items), out, batch, progress)
        statuses = self.ranks.gather_objects(status)
        failed = [s for s in statuses if not isinstance(s, int)]
        if failed:
            raise RebuildInputError("; ".join(failed))
        if sum(statuses) != n:
            raise RebuildInputError(f"the ranks embedded {sum(statuses)} rows ({statuses}) of a {n}-item catalog")
        log.info("embedded %d items on %d ranks: %s rows each", n, self.ranks.world, statuses)
        return out

    def close(self) -> None:
        if not self.sent:
            self.ranks.broadcast({"error": "rank 0 stopped before the embedding step"})
            self.sent = True
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _embed_rank(ranks: Ranks, load, out: np.ndarray, batch: int, progress: bool) -> int | str:
    """Embed this rank's chunks into `out`; the rows written, or what went wrong, naming the rank."""
    try:
        model, items = load()
        if len(items) != len(out):
            raise ShardMismatchError(f"unequal shards: rank {ranks.rank} read {len(items)} catalog items, rank 0 {len(out)}")
        lo, hi = rank_rows(len(out), batch, ranks)
        _embed(model, items, batch, progress, out, (lo, hi))
        if isinstance(out, np.memmap):
            out.flush()
        return hi - lo
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which fails the run naming it
        return f"rank {ranks.rank}: {type(e).__name__}: {e}"


def serve_embedding(ranks: Ranks) -> None:
    """A rank other than 0: wait for rank 0's job, embed this rank's chunks with its own copy of
    the bundle and catalog, report. Raises if this rank failed (rank 0 fails the run too)."""
    job = ranks.broadcast(None)
    if "error" in job:
        log.info("rank %d: nothing to embed (%s)", ranks.rank, job["error"])
        return

    def load() -> tuple[TwoTowerModel, pd.DataFrame]:
        model = load_bundle(job["bundle"], verify=True).model
        return model, read_catalog(Path(job["data"]), model)[0]

    out = np.load(job["array"], mmap_mode="r+")
    status = _embed_rank(ranks, load, out, job["batch"], False)
    del out
    ranks.gather_objects(status)
    if not isinstance(status, int):
        raise RankFailedError(status)


def rebuild_on_ranks(cfg: RebuildConfig, ranks: Ranks) -> RebuildResult | None:
    """`rebuild` under torchrun: rank 0 runs the job (and returns its result), every other rank
    serves its embedding step (and returns None). One process: `rebuild(cfg)`."""
    if ranks.world == 1:
        return rebuild(cfg)
    if not ranks.is_main:
        serve_embedding(ranks)
        return None
    job = RankEmbedding(ranks)
    try:
        return rebuild(cfg, ranks_embedding=job)
    finally:
        job.close()


def gate_queries(
    model: TwoTowerModel, data: Path | None, item_vectors: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """Up to `n` query vectors: users through the user tower if possible (users.csv of `data`,
    else the trained user ids), else catalog items."""
    try:
        users = read_users(data, read_schema(data)) if data is not None else None
        if users is not None and len(users):
            take = np.sort(rng.choice(len(users), size=min(n, len(users)), replace=False))
            rows = users.iloc[take].reset_index(drop=True)
            q = model.embed_user_table(rows["user_id"].astype(str).to_numpy(), rows)
            kind = "users"
        else:
            tokens = list(model.user_encoder.ids.tokens)
            if not tokens:
                raise LookupError("the model has no trained user ids")
            take = rng.choice(len(tokens), size=min(n, len(tokens)), replace=False)
            q = model.embed_user_table([tokens[i] for i in take], None)
            kind = "users (trained ids)"
        q = fi.as_matrix(q, name="user query vectors", dim=item_vectors.shape[1])
        return q, kind
    except Exception as e:  # noqa: BLE001 - users are optional; fall back, loudly
        log.warning("cannot embed user queries (%s: %s); gating on item vectors instead", type(e).__name__, e)
    take = rng.choice(len(item_vectors), size=min(n, len(item_vectors)), replace=False)
    return np.ascontiguousarray(item_vectors[np.sort(take)]), "items"


def rebuild(cfg: RebuildConfig, *, ranks_embedding: RankEmbedding | None = None) -> RebuildResult:
    """Run the whole job (see the module docstring); `ranks_embedding`: share step 3 with the
    other torchrun ranks (`rebuild_on_ranks`). Raises:

    `store.LockHeldError` (another run holds the lock), `RebuildInputError` (bad model, catalog
    or options), `RecallGateError` (recall below the gate). In every failure case `current` is
    untouched and no partial version directory remains.
    """
    _validate(cfg)
    for what, p in (("--model", cfg.model), ("--data", cfg.data)):
        if not Path(p).is_dir():
            raise RebuildInputError(f"{what} {p}: no such directory")
    root = Path(cfg.out)
    _check_out(root)
    timer = _Timer()
    progress = _progress_enabled(cfg)
    threads = fi.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    with store.publishing(root) as cleaned:
        _checkpoint("locked")

        with timer.stage("load"):
            bundle_path = Path(cfg.model)  # named by the error below if find_bundle itself fails
            try:
                bundle_path = find_bundle(cfg.model)
                bundle = load_bundle(bundle_path, verify=True)
            except BundleError as e:
                raise RebuildInputError(str(e)) from None
            except Exception as e:  # noqa: BLE001 - any loader failure is a bad bundle, named
                raise RebuildInputError(f"{bundle_path}: model bundle unloadable ({type(e).__name__}: {e})") from None
            model = bundle.model
            _check_bundle_servable(bundle, bundle_path)
            items, attributes = _load_catalog(Path(cfg.data), model)
            ids = items["item_id"].astype(str).tolist()
            fingerprints = feature_fingerprints(items, list(model.item_schema))
            vocab = set(model.item_encoder.ids.tokens)
            fresh = sum(1 for i in ids if i not in vocab)
            log.info("model %s (dim %d); catalog %d items, %d not in the training vocabulary (embedded from features)",
                     bundle.version, model.embedding_dim, len(ids), fresh)

        with timer.stage("embed"):
            if ranks_embedding is None:
                vectors = _embed(model, items, cfg.embed_batch, progress)
            else:
                vectors = ranks_embedding.embed(root, bundle_path, Path(cfg.data), model, items, cfg.embed_batch, progress)
            try:
                vectors = fi.as_matrix(vectors, name="item vectors from the model", dim=model.embedding_dim)
                fi.check_unit_rows(vectors, name="item vectors from the model")
            except ValueError as e:
                raise RebuildInputError(f"model {bundle.version}: {e}") from None
        del items
        _checkpoint("embedded")

        spec = _index_spec(cfg, len(ids), vectors.shape[1])
        with timer.stage("build"):
            index = _build(spec, vectors, progress)
        _checkpoint("built")

        rng = np.random.default_rng(cfg.seed)
        with timer.stage("gate"):
            recall, search_params = _tune_and_gate(cfg, spec, index, vectors, model, rng)
        if recall is not None and recall["value"] < cfg.recall_gate:
            raise RecallGateError(
                f"recall gate failed: recall@{recall['k']} = {recall['value']:.4f} < {cfg.recall_gate} "
                f"({spec.factory} {search_params}, {recall['n_queries']} {recall['queries']} queries); current index kept",
                recall,
            )

        version = store.new_version_name()
        with timer.stage("write"):
            index_info = {"factory": spec.factory, "search_params": search_params, "build_params": spec.build_params,
                          "family": fi.index_family(index)}
            extra = {
                "catalog": {"items": len(ids), "fresh_items": fresh, "data": str(Path(cfg.data).resolve())},
                "timings_s": timer.timings,
                "threads": threads,
            }
            path = store.write_version(
                root, version, index=index, embeddings=vectors, item_ids=ids, bundle_path=bundle_path,
                model_version=bundle.version, index_info=index_info, recall=recall, extra=extra,
                checkpoint=_checkpoint, accept=_service_accepts, attributes=attributes, fingerprints=fingerprints,
            )
        _checkpoint("renamed")

        with timer.stage("switch"):
            try:
                previous = store.read_current(root)
            except store.IndexVersionError as e:  # a dangling pointer: the switch repairs it
                log.warning("replacing a broken current pointer: %s", e)
                previous = None
            try:
                store.switch_current(root, version)
            except BaseException:
                _discard(root, path)  # never leave a version that was not switched to behind
                raise
        log.info("current -> %s (was %s)", version, previous.name if previous else None)
        _checkpoint("switched")
        pruned = store.prune(root, cfg.keep)
        if pruned:
            log.info("pruned %d old version(s): %s", len(pruned), [p.name for p in pruned])
    total = time.perf_counter() - t_start
    timer.timings["total"] = round(total, 3)
    log.info("rebuild done in %.1fs: %s", total, timer.timings)
    manifest = read_manifest(path)
    return RebuildResult(path=path, manifest=manifest, timings=timer.timings, pruned=pruned, cleaned=cleaned)


def _check_bundle_servable(bundle: Bundle, bundle_path: Path) -> None:
    """Refuse, before any work, a bundle the service would refuse (exit 2, naming the bundle).

    The user tower goes through the service's own check plus the parity of the numpy tower the
    service will run with the torch tower (`indexer.version.check_model_servable`);
    the manifest's `embedding_dim` is compared here because otherwise it is only caught when
    the copied bundle is verified inside the temporary version directory, whose name the
    message then gave — a directory deleted by the time anyone reads it.
    """
    manifest = bundle.manifest if isinstance(bundle.manifest, dict) else {}
    declared = manifest.get("embedding_dim")
    if declared is not None and declared != bundle.model.embedding_dim:
        raise RebuildInputError(
            f"{bundle_path}/manifest.json: embedding_dim {declared!r}, but config.json's model has "
            f"embedding_dim {bundle.model.embedding_dim}"
        )
    try:
        check_model_servable(bundle.model, f"model bundle {bundle_path}")
    except IndexVersionError as e:
        raise RebuildInputError(f"{e}; the service would refuse it") from None


def _service_accepts(tmp: Path, base: VerifiedBase | None = None) -> None:
    """Load the written version exactly as the service does; ServingCheckError if it refuses.

    Runs before the rename and the switch, so a refused version is never published. The data
    files' hashes were computed from these bytes just before, hence `check_hashes=False`.
    `base`: `indexer update`'s opened base, shared by the delta it wrote (`load_version`).
    """
    try:
        load_version(tmp, check_hashes=False, base=base)
    except Exception as e:  # noqa: BLE001 - whatever the service would refuse on, we refuse on
        raise ServingCheckError(
            f"the service would refuse the new version ({type(e).__name__}: {e}); current unchanged"
        ) from None


def _discard(root: Path, path: Path) -> None:
    """Delete a version directory that was written but could not be switched to."""
    try:
        store.delete_version(root, path)
    except OSError as e:  # the next run's cleanup or retention gets it
        log.warning("could not remove the unswitched version %s: %s", path, e)


def _index_spec(cfg: RebuildConfig, n: int, dim: int) -> fi.IndexSpec:
    spec = fi.auto_spec(n, dim) if cfg.index == "auto" else fi.IndexSpec(cfg.index)
    build_params = dict(spec.build_params)
    if cfg.ef_construction is not None:
        build_params["efConstruction"] = cfg.ef_construction
    build_params.setdefault("seed", cfg.seed)
    return fi.IndexSpec(spec.factory, dict(spec.search_params), build_params)


def _build(spec: fi.IndexSpec, vectors: np.ndarray, progress: bool) -> faiss.Index:
    with tqdm(total=len(vectors), desc=f"build {spec.factory}", unit="vec", disable=not progress, file=sys.stderr) as bar:
        done = [0]

        def step(n_added: int) -> None:
            bar.update(n_added - done[0])
            done[0] = n_added

        try:
            return fi.build_index(vectors, spec.factory, build_params=spec.build_params, progress=step)
        except ValueError as e:
            raise RebuildInputError(str(e)) from None


def _tune_and_gate(cfg: RebuildConfig, spec: fi.IndexSpec, index, vectors: np.ndarray, model, rng: np.random.Generator):
    """Apply or tune the search parameters, then measure recall on a disjoint query sample."""
    fam = fi.index_family(index)
    k = min(cfg.gate_k, len(vectors))
    given = {}
    if cfg.ef_search is not None:
        given["efSearch"] = cfg.ef_search
    if cfg.nprobe is not None:
        given["nprobe"] = cfg.nprobe
    try:
        if given:
            search_params = fi.apply_search_params(index, given)
        else:
            search_params = fi.apply_search_params(index, spec.search_params)
    except ValueError as e:
        raise RebuildInputError(f"{spec.factory}: {e}") from None
    if fam == "flat":
        return {"k": k, "value": 1.0, "threshold": cfg.recall_gate, "n_queries": 0, "queries": "none (exact index)"}, {}

    queries, kind = gate_queries(model, Path(cfg.data), vectors, cfg.tune_queries + cfg.gate_queries, rng)
    n_tune = min(cfg.tune_queries, len(queries) // 2) if len(queries) >= 2 else 0
    tune_q, gate_q = queries[:n_tune], queries[n_tune:]
    if not given and n_tune:
        target = min(1.0, cfg.recall_gate + cfg.tune_margin)
        search_params, tuned = fi.tune_search_params(index, vectors, tune_q, k, target)
        log.info("tuned %s on %d %s queries: recall@%d = %.4f (target %.3f)", search_params, n_tune, kind, k, tuned, target)
    value = fi.measure_recall(index, vectors, gate_q, k)
    log.info("recall gate: recall@%d = %.4f on %d %s queries (threshold %.3f)", k, value, len(gate_q), kind, cfg.recall_gate)
    recall = {"k": k, "value": round(float(value), 6), "threshold": cfg.recall_gate, "n_queries": len(gate_q), "queries": kind}
    return recall, search_params
