"""The request path: validate features → user vector (cache or tower) → top-k → response.

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

from indexer.topk import Query
from indexer.version import ServedVersion
from service.cache import VectorCache, cache_key, features_digest
from service.observability import request_context
from service.schemas import BatchRetrieveRequest, EmbedRequest, RetrieveRequest
from service.settings import Settings
from training.features import FeatureError
from training.numpy_tower import UserRecord

# Searches fetching more rows than this run in the threadpool, not on the event loop.
INLINE_FETCH_MAX = 2048


class RequestFieldError(ValueError):
    """A request value rejected by the service (not by the schema): becomes a 422 naming `loc`."""

    def __init__(self, loc: Sequence[str | int], msg: str, type_: str = "value_error") -> None:
        super().__init__(msg)
        self.loc = tuple(loc)
        self.msg = msg
        self.type = type_


class NonFiniteVectorError(RuntimeError):
    """The tower produced a vector FAISS must not see (NaN/inf or wrong dimension)."""


def validate_user(version: ServedVersion, user_id: str | None, features: dict, loc_prefix: tuple = ("body",)) -> UserRecord:
    """A `UserRecord` with features normalized by the version's tower, or RequestFieldError."""
    try:
        normalized = version.tower.validate(features)
    except FeatureError as e:
        # e.field is "features.<name>"; a feature name may itself contain dots
        head, _, name = e.field.partition(".")
        loc = (*loc_prefix, head, name) if name else (*loc_prefix, head)
        raise RequestFieldError(loc, e.message, "feature_error") from None
    return UserRecord(user_id, normalized)


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
    keys = [cache_key(prefix, model_version, r.user_id, features_digest(r.features)) for r in records]
    cached = await cache.get_many(keys, dim)
    flags = [v is not None for v in cached]
    missing = [i for i, v in enumerate(cached) if v is None]
    computed = None
    if missing:
        computed = version.tower.embed(records if len(missing) == len(records) else [records[i] for i in missing])
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
    return False


async def search(version: ServedVersion, vecs: np.ndarray, queries: Sequence[Query]) -> list[list[tuple[str, float]]]:
    """`TopK.top_k`, inline for the common small search, in the threadpool for big ones."""
    if is_expensive(version, queries):
        return await run_in_threadpool(version.topk.top_k, vecs, queries)
    return version.topk.top_k(vecs, queries)


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


async def retrieve(version: ServedVersion, cache: VectorCache, settings: Settings, body: RetrieveRequest) -> dict:
    record = validate_user(version, body.user_id, body.features)
    vecs, cached = await user_vectors(version, cache, settings, [record])
    query = Query(body.k, frozenset(body.exclude_item_ids))
    (items,) = await search(version, vecs, [query])
    _note(version, cached)
    return result_body(version, items, cached[0])


async def retrieve_batch(
    version: ServedVersion, cache: VectorCache, settings: Settings, body: BatchRetrieveRequest
) -> dict:
    """All requests against one version, one cache read, one index search."""
    records = [
        validate_user(version, r.user_id, r.features, ("body", "requests", i)) for i, r in enumerate(body.requests)
    ]
    vecs, cached = await user_vectors(version, cache, settings, records)
    queries = [Query(r.k, frozenset(r.exclude_item_ids)) for r in body.requests]
    results = await search(version, vecs, queries)
    _note(version, cached)
    return {
        "results": [result_body(version, items, c) for items, c in zip(results, cached, strict=True)],
        "model_version": version.model_version,
        "index_version": version.index_version,
    }


async def embed(version: ServedVersion, cache: VectorCache, settings: Settings, body: EmbedRequest) -> dict:
    record = validate_user(version, body.user_id, body.features)
    vecs, cached = await user_vectors(version, cache, settings, [record])
    _note(version, cached)
    return {"vector": vecs[0].tolist(), "model_version": version.model_version, "cached": cached[0]}
