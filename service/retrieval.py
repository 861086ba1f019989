"""The request path: validate features → user vector (cache or tower) → top-k → response.

A request's `filter` is checked against the answering version's attribute table and turned into
its allowed rows (`allowed_rows`) before the search; a version without attributes refuses any
filter (422 at `body.filter`). `/similar` takes its query vector from the version's own
`embeddings.npy` row of the item, which is then excluded.

Routes stay thin; this module does the work, always against one `ServedVersion` that the caller
read once (see service.state), never against "whatever is current now". The top-k itself —
exclusions, exact cosine scores, the never-short guarantee — is `indexer.topk`'s, the one
implementation the benchmarks and tests use too; here it only decides whether a search is big
enough to leave the event loop for a worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from starlette.concurrency import run_in_threadpool

from indexer.attributes import Condition, FilterError
from indexer.topk import Allowed, Query
from indexer.version import ServedVersion
from service.cache import VectorCache, cache_key, features_digest, history_digest
from service.metrics import ServiceMetrics
from service.observability import request_context
from service.schemas import BatchRetrieveRequest, EmbedRequest, RetrieveRequest, SimilarRequest
from service.settings import Settings
from training.features import FeatureError
from training.numpy_tower import UserRecord

# Searches fetching more rows than this run in the threadpool, not on the event loop.
INLINE_FETCH_MAX = 2048
# Filtered exact scans of more allowed rows than this run in the threadpool.
INLINE_FILTER_ROWS_MAX = 50_000


class RequestFieldError(ValueError):
    """A request value rejected by the service (not by the schema): becomes a 422 naming `loc`."""

    def __init__(self, loc: Sequence[str | int], msg: str, type_: str = "value_error") -> None:
        super().__init__(msg)
        self.loc = tuple(loc)
        self.msg = msg
        self.type = type_


class UnknownItemError(LookupError):
    """POST /similar named an item the served version does not hold (a 404 naming it)."""

    def __init__(self, item_id: str, index_version: str) -> None:
        shown = item_id if len(item_id) <= 100 else item_id[:100] + "…"
        super().__init__(f"item {shown!r} is not in index version {index_version}")
        self.item_id = item_id


class NonFiniteVectorError(RuntimeError):
    """The tower produced a vector FAISS must not see (NaN/inf or wrong dimension)."""


def validate_user(
    version: ServedVersion, user_id: str | None, features: dict, loc_prefix: tuple = ("body",),
    history: Sequence[str] | None = None, metrics: ServiceMetrics | None = None,
) -> UserRecord:
    """A `UserRecord` with features normalized by the version's tower and the request history
    as the rows that tower pools (ids unknown to this version ignored and counted), or
    RequestFieldError."""
    codes, unknown = version.tower.encode_history(history)
    if metrics is not None and history is not None:
        used = 0 if codes is None else len(codes)
        metrics.history_ids.labels("used").inc(used)
        if unknown:
            metrics.history_ids.labels("ignored").inc(unknown)
        if len(history) - unknown - used:
            metrics.history_ids.labels("beyond").inc(len(history) - unknown - used)
    try:
        normalized = version.tower.validate(features)
    except FeatureError as e:
        # e.field is "features.<name>"; a feature name may itself contain dots
        head, _, name = e.field.partition(".")
        loc = (*loc_prefix, head, name) if name else (*loc_prefix, head)
        raise RequestFieldError(loc, e.message, "feature_error") from None
    return UserRecord(user_id, normalized, codes)


def history_item_vectors(version: ServedVersion, codes: Sequence[int]) -> np.ndarray:
    """(m, d) float32: the version's index vectors of the history rows `codes` the tower pooled
    (oldest first; an item missing from the index is skipped), what `HistoryFoldIn` folds in.
    `training.evaluate.history_item_vectors` is the same selection over the trainer's catalog."""
    table, items = version.history_rows, version.tower.items
    c = np.asarray(codes, dtype=np.int64)
    rows = table[c]
    for j in np.flatnonzero(rows == -2):  # benign race: every thread writes the same value
        row = version.topk.rows.get(items.tokens[int(c[j]) - 1])
        rows[j] = table[c[j]] = -1 if row is None else row
    return version.topk.vectors(rows[rows >= 0])


def fold_in_history(version: ServedVersion, records: Sequence[UserRecord], vecs: np.ndarray) -> np.ndarray:
    """The tower's vectors with each record's history folded in (the bundle's `HistoryFoldIn`
    rule; records without a history, or a bundle without the rule, unchanged)."""
    rule = version.tower.fold_in
    if rule is None or all(r.history is None for r in records):
        return vecs
    return rule.apply(vecs, [None if r.history is None else history_item_vectors(version, r.history) for r in records])


async def user_vectors(
    version: ServedVersion, cache: VectorCache, settings: Settings, records: Sequence[UserRecord]
) -> tuple[np.ndarray, list[bool]]:
    """(n, dim) user vectors and, per row, whether it came from the cache.

    One cache round trip for all rows (GET or MGET), the tower for the misses, one write (SET or
    a pipeline) for what was computed, which the response does not wait for (its outcome still
    feeds the cache's breaker and metrics). The key carries the model version, so a vector is
    only ever reused with the model that computed it.
    """
    prefix, model_version, dim = settings.cache_prefix, version.model_version, version.dim
    folded_with = version.index_version if version.tower.fold_in is not None else None  # fold_in_history's vectors
    keys = [
        cache_key(prefix, model_version, r.user_id, features_digest(r.features), history_digest(r.history, folded_with))
        for r in records
    ]
    cached = await cache.get_many(keys, dim)
    flags = [v is not None for v in cached]
    missing = [i for i, v in enumerate(cached) if v is None]
    computed = None
    if missing:
        todo = records if len(missing) == len(records) else [records[i] for i in missing]
        computed = fold_in_history(version, todo, version.tower.embed(todo))
        if computed.shape != (len(missing), dim):
            raise NonFiniteVectorError(f"user tower returned shape {computed.shape}, index dimension is {dim}")
        if not np.isfinite(computed).all():
            raise NonFiniteVectorError("user tower produced a non-finite vector; nothing was cached")
        cache.set_many_nowait([(keys[i], computed[j]) for j, i in enumerate(missing)])
        if len(missing) == len(records):  # all computed (a /retrieve miss): the tower's array as is
            return computed, flags
    out = np.empty((len(records), dim), dtype=np.float32)
    for i, v in enumerate(cached):
        if v is not None:
            out[i] = v
    if computed is not None:
        out[missing] = computed
    return out, flags


def allowed_rows(
    version: ServedVersion, filt: dict[str, Condition] | None, loc_prefix: tuple = ("body",)
) -> Allowed | None:
    """The rows `filt` allows in this version (None: no filter, or an empty one), or a
    RequestFieldError at `<loc_prefix>.filter[.<attribute>]`. The version's own table is used, so
    a filter is never evaluated against another version's rows."""
    if not filt:
        return None
    table = version.attributes
    if table is None:
        raise RequestFieldError(
            (*loc_prefix, "filter"),
            f"index version {version.index_version} has no filterable attributes (its schema.json declared no "
            "item.attributes); send no filter",
            "filter_error",
        )
    try:
        return table.allowed(filt)
    except FilterError as e:
        loc = (*loc_prefix, "filter") if e.attribute is None else (*loc_prefix, "filter", e.attribute)
        raise RequestFieldError(loc, e.message, "filter_error") from None


# ---- top-k ----------------------------------------------------------------------------------


def is_expensive(version: ServedVersion, queries: Sequence[Query]) -> bool:
    """Whether the search should leave the event loop (big fetch or an exact scan)."""
    if len(queries) > 8:
        return True
    topk = version.topk
    for q in queries:
        fetch = topk.fetch_size(q)
        if fetch > INLINE_FETCH_MAX or topk.needs_exact(fetch):
            return True
        if q.allowed is not None:
            # bench.filters at 1M items: a scan of <= 30k allowed rows takes ~2 ms, an HNSW search
            # with a selector down to 3 % ~1.3 ms — less than a thread hop costs under load
            # (docs/bench/filters.md); only bigger scans and very selective ANN searches leave
            exact = topk.filter_strategy(q.allowed) == "exact"
            if (exact and q.allowed.count > INLINE_FILTER_ROWS_MAX) or (not exact and q.allowed.selectivity < 0.01):
                return True
    return False


async def search(
    version: ServedVersion, vecs: np.ndarray, queries: Sequence[Query], metrics: ServiceMetrics | None = None
) -> list[list[tuple[str, float]]]:
    """`TopK.top_k`, inline for the common small search, in the threadpool for big ones; each
    filtered query counted by the strategy that answered it."""
    if is_expensive(version, queries):
        results, strategies = await run_in_threadpool(version.topk.top_k_strategies, vecs, queries)
    else:
        results, strategies = version.topk.top_k_strategies(vecs, queries)
    if metrics is not None:
        for strategy in strategies:
            if strategy is not None:
                metrics.filtered_queries.labels(strategy).inc()
    return results


def result_body(version: ServedVersion, items: list[tuple[str, float]], cached: bool) -> dict:
    return {
        "items": [{"item_id": item, "score": score} for item, score in items],
        "model_version": version.model_version,
        "index_version": version.index_version,
        "cached": cached,
    }


# ---- endpoint bodies (called by the thin routes in service.routes) ---------------------------


def _note(version: ServedVersion, cached: list[bool]) -> None:
    """Add the answering version and cache outcome to this request's access-log line."""
    ctx = request_context()
    ctx["model_version"] = version.model_version
    ctx["index_version"] = version.index_version
    ctx["cached"] = cached[0] if len(cached) == 1 else sum(cached)


async def retrieve(
    version: ServedVersion, cache: VectorCache, settings: Settings, body: RetrieveRequest,
    metrics: ServiceMetrics | None = None,
) -> dict:
    record = validate_user(version, body.user_id, body.features, history=body.history, metrics=metrics)
    allowed = allowed_rows(version, body.filter)
    vecs, cached = await user_vectors(version, cache, settings, [record])
    query = Query(body.k, frozenset(body.exclude_item_ids), allowed)
    (items,) = await search(version, vecs, [query], metrics)
    _note(version, cached)
    return result_body(version, items, cached[0])


async def retrieve_batch(
    version: ServedVersion, cache: VectorCache, settings: Settings, body: BatchRetrieveRequest,
    metrics: ServiceMetrics | None = None,
) -> dict:
    """All requests against one version, one cache read, one index search (each request's own
    filter, evaluated against that version)."""
    records = [
        validate_user(version, r.user_id, r.features, ("body", "requests", i), r.history, metrics)
        for i, r in enumerate(body.requests)
    ]
    allowed = [allowed_rows(version, r.filter, ("body", "requests", i)) for i, r in enumerate(body.requests)]
    vecs, cached = await user_vectors(version, cache, settings, records)
    queries = [Query(r.k, frozenset(r.exclude_item_ids), a) for r, a in zip(body.requests, allowed, strict=True)]
    results = await search(version, vecs, queries, metrics)
    _note(version, cached)
    return {
        "results": [result_body(version, items, c) for items, c in zip(results, cached, strict=True)],
        "model_version": version.model_version,
        "index_version": version.index_version,
    }


async def similar(
    version: ServedVersion, settings: Settings, body: SimilarRequest, metrics: ServiceMetrics | None = None
) -> dict:
    """The items closest by cosine to `body.item_id`'s own vector (`embeddings.npy`), the item
    itself excluded; no user vector, so nothing is cached (`cached` is false)."""
    row = version.topk.rows.get(body.item_id)
    if row is None:
        raise UnknownItemError(body.item_id, version.index_version)
    allowed = allowed_rows(version, body.filter)
    vec = version.topk.vectors([row])
    query = Query(body.k, frozenset((*body.exclude_item_ids, body.item_id)), allowed)
    (items,) = await search(version, vec, [query], metrics)
    _note(version, [False])
    return result_body(version, items, False)


async def embed(
    version: ServedVersion, cache: VectorCache, settings: Settings, body: EmbedRequest, metrics: ServiceMetrics | None = None,
) -> dict:
    record = validate_user(version, body.user_id, body.features, history=body.history, metrics=metrics)
    vecs, cached = await user_vectors(version, cache, settings, [record])
    _note(version, cached)
    return {"vector": vecs[0].tolist(), "model_version": version.model_version, "cached": cached[0]}
