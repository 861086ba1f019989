"""The request path: validate features → user vector (cache or tower) → top-k → response.

Routes stay thin; this module does the work, always against one `ServingVersion` that the
caller read once (see service.state), never against "whatever is current now".

Top-k with exclusions. Exclusions are filtered after the search, so FAISS is asked for
`k + len(exclude)` rows (capped at the catalog): at most `len(exclude)` of those can be
excluded, so at least `min(k, catalog - excluded)` remain. An approximate index can still come
back short (HNSW pads with -1 when its candidate list runs dry); the query is then answered by
an exact scan of `embeddings.npy`, so a response never has fewer items than promised, a `-1`
id or a null score. When the fetch is a large fraction of the catalog the exact scan is used
directly, and big searches leave the event loop for a worker thread.

Scores are recomputed as float32 dot products with the rows of `embeddings.npy` (the vectors
`indexer rebuild` wrote), so they are exact cosines whatever the index type — the ANN only
chooses the candidates — and items are ordered by that score, ties by catalog row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
from starlette.concurrency import run_in_threadpool

from service.cache import VectorCache, cache_key, features_digest
from service.observability import request_context
from service.schemas import BatchRetrieveRequest, EmbedRequest, RetrieveRequest
from service.settings import Settings
from service.state import ServingVersion
from service.tower import UserRecord
from training.model import FeatureError

# Searches fetching more rows than this run in the threadpool, not on the event loop.
INLINE_FETCH_MAX = 2048
# Fetching more than this fraction of the catalog: an exact scan is as cheap and exact.
EXACT_FETCH_FRACTION = 0.25


class RequestFieldError(ValueError):
    """A request value rejected by the service (not by the schema): becomes a 422 naming `loc`."""

    def __init__(self, loc: Sequence[str | int], msg: str, type_: str = "value_error") -> None:
        super().__init__(msg)
        self.loc = tuple(loc)
        self.msg = msg
        self.type = type_


class NonFiniteVectorError(RuntimeError):
    """The tower produced a vector FAISS must not see (NaN/inf or wrong dimension)."""


@dataclass(frozen=True)
class Query:
    """One retrieval: a validated user, k and the excluded ids."""

    record: UserRecord
    k: int
    exclude: frozenset[str]


def validate_user(version: ServingVersion, user_id: str | None, features: dict, loc_prefix: tuple = ("body",)) -> UserRecord:
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
    version: ServingVersion, cache: VectorCache, settings: Settings, records: Sequence[UserRecord]
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


def _fetch_size(version: ServingVersion, q: Query) -> int:
    return min(q.k + len(q.exclude), version.count)


def _exact_rows(version: ServingVersion, vec: np.ndarray, fetch: int) -> np.ndarray:
    """Rows of the `fetch` highest exact scores (unordered)."""
    scores = np.asarray(version.embeddings @ vec, dtype=np.float32)
    if fetch >= len(scores):
        return np.arange(len(scores), dtype=np.int64)
    return np.argpartition(-scores, fetch - 1)[:fetch].astype(np.int64)


def _ann_rows(version: ServingVersion, vecs: np.ndarray, fetch: int) -> np.ndarray:
    """(n, fetch) candidate rows from the index; -1 where it found fewer."""
    params = None
    if version.hnsw_ef_search is not None and fetch > version.hnsw_ef_search:
        # HNSW returns fewer than k results (padded with -1) when efSearch < k
        params = faiss.SearchParametersHNSW(efSearch=fetch)
    _, rows = version.index.search(vecs, fetch, params=params)
    return rows


def exact_scores(embeddings: np.ndarray, rows: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """float32 cosines of `rows`, each computed on its own in float64 and then rounded.

    A BLAS matrix-vector product rounds differently depending on how many rows it gets, so the
    same item would score 0.54550987 in one response and 0.54550981 in another (a batch, a
    different exclusion list). Row-by-row float64 sums make a score a function of (user vector,
    item row) only.
    """
    block = embeddings.take(rows, axis=0).astype(np.float64)  # take: ~3x cheaper than [rows]
    return np.einsum("ij,j->i", block, vec.astype(np.float64)).astype(np.float32)


def _finish(version: ServingVersion, vec: np.ndarray, rows: np.ndarray, q: Query) -> list[tuple[str, float]]:
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
    scores = exact_scores(version.embeddings, rows, vec)
    order = np.lexsort((rows, -scores))
    ranked = rows[order]
    if (ranked[1:] == ranked[:-1]).any():
        return _finish(version, vec, np.unique(rows), q)
    exclude = q.exclude
    ids = version.item_ids
    if not exclude:
        k = q.k
        return list(zip([ids[row] for row in ranked[:k].tolist()], scores[order[:k]].tolist(), strict=True))
    out: list[tuple[str, float]] = []
    for row, score in zip(ranked.tolist(), scores[order].tolist(), strict=True):
        item = ids[row]
        if item in exclude:
            continue
        out.append((item, score))
        if len(out) == q.k:
            break
    return out


def _needs_exact(version: ServingVersion, fetch: int) -> bool:
    """An approximate index asked for a large share of the catalog: scan exactly instead."""
    return not version.exact_index and fetch > EXACT_FETCH_FRACTION * version.count


def top_k(version: ServingVersion, settings: Settings, vecs: np.ndarray, queries: Sequence[Query]) -> list[list[tuple[str, float]]]:
    """Results for each query (row i of `vecs`), each exactly min(k, catalog − excluded) long."""
    if vecs.shape != (len(queries), version.dim) or not np.isfinite(vecs).all():
        raise NonFiniteVectorError(f"query vectors of shape {vecs.shape} are not finite (n, {version.dim})")
    results: list[list[tuple[str, float]] | None] = [None] * len(queries)
    if version.count == 0:
        return [[] for _ in queries]
    exact_ok = version.count <= settings.exact_fallback_max_items
    ann = [i for i, q in enumerate(queries) if not (exact_ok and _needs_exact(version, _fetch_size(version, q)))]
    if ann:
        fetch = max(_fetch_size(version, queries[i]) for i in ann)
        rows = _ann_rows(version, np.ascontiguousarray(vecs if len(ann) == len(queries) else vecs[ann]), fetch)
        for j, i in enumerate(ann):
            q = queries[i]
            res = _finish(version, vecs[i], rows[j], q)
            short = len(res) < q.k and (rows[j] < 0).any()
            results[i] = None if (short and exact_ok) else res
    for i, q in enumerate(queries):
        if results[i] is None:
            rows_i = _exact_rows(version, vecs[i], _fetch_size(version, q))
            results[i] = _finish(version, vecs[i], rows_i, q)
    return results  # type: ignore[return-value]


def is_expensive(version: ServingVersion, queries: Sequence[Query]) -> bool:
    """Whether the search should leave the event loop (big fetch or an exact scan)."""
    if len(queries) > 8:
        return True
    for q in queries:
        fetch = _fetch_size(version, q)
        if fetch > INLINE_FETCH_MAX or _needs_exact(version, fetch):
            return True
    return False


async def search(version: ServingVersion, settings: Settings, vecs: np.ndarray, queries: Sequence[Query]) -> list[list[tuple[str, float]]]:
    """`top_k`, inline for the common small search, in the threadpool for big ones."""
    if is_expensive(version, queries):
        return await run_in_threadpool(top_k, version, settings, vecs, queries)
    return top_k(version, settings, vecs, queries)


def result_body(version: ServingVersion, items: list[tuple[str, float]], cached: bool) -> dict:
    return {
        "items": [{"item_id": item, "score": score} for item, score in items],
        "model_version": version.model_version,
        "index_version": version.index_version,
        "cached": cached,
    }


# ---- endpoint bodies (called by the thin routes in service.routes) ---------------------------


def _note(version: ServingVersion, cached: list[bool]) -> None:
    """Add the answering version and cache outcome to this request's access-log line."""
    ctx = request_context()
    ctx["model_version"] = version.model_version
    ctx["index_version"] = version.index_version
    ctx["cached"] = cached[0] if len(cached) == 1 else sum(cached)


async def retrieve(version: ServingVersion, cache: VectorCache, settings: Settings, body: RetrieveRequest) -> dict:
    record = validate_user(version, body.user_id, body.features)
    vecs, cached = await user_vectors(version, cache, settings, [record])
    query = Query(record, body.k, frozenset(body.exclude_item_ids))
    (items,) = await search(version, settings, vecs, [query])
    _note(version, cached)
    return result_body(version, items, cached[0])


async def retrieve_batch(
    version: ServingVersion, cache: VectorCache, settings: Settings, body: BatchRetrieveRequest
) -> dict:
    """All requests against one version, one cache read, one index search."""
    records = [
        validate_user(version, r.user_id, r.features, ("body", "requests", i)) for i, r in enumerate(body.requests)
    ]
    vecs, cached = await user_vectors(version, cache, settings, records)
    queries = [Query(rec, r.k, frozenset(r.exclude_item_ids)) for rec, r in zip(records, body.requests, strict=True)]
    results = await search(version, settings, vecs, queries)
    _note(version, cached)
    return {
        "results": [result_body(version, items, c) for items, c in zip(results, cached, strict=True)],
        "model_version": version.model_version,
        "index_version": version.index_version,
    }


async def embed(version: ServingVersion, cache: VectorCache, settings: Settings, body: EmbedRequest) -> dict:
    record = validate_user(version, body.user_id, body.features)
    vecs, cached = await user_vectors(version, cache, settings, [record])
    _note(version, cached)
    return {"vector": vecs[0].tolist(), "model_version": version.model_version, "cached": cached[0]}
