"""Filtered top-k (indexer.topk, `Query.allowed`) over every index type, against a numpy oracle.

The guarantee under test: exactly min(k, |allowed − excluded|) items, every one allowed and not
excluded, scored with its exact cosine, sorted — at every selectivity, from the whole catalog to a
single allowed row and none, with each strategy (exact scan of the allowed rows, ANN with a
bitmap selector, exact fallback when the ANN comes back short).
"""

from __future__ import annotations

import numpy as np
import pytest

from indexer.topk import Allowed, BruteForceTopK, FaissTopK, Query, TopK
from tests.indexer.conftest import FACTORIES, N, as_rows

SELECTIVITIES = {"100%": 1.0, "10%": 0.1, "1%": 0.01, "0.1%": 0.001, "one": "one", "zero": 0.0}


def make_mask(kind: float | str, seed: int, queries: np.ndarray | None = None, vectors: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "one":
        m = np.zeros(N, dtype=bool)
        m[int(rng.integers(N))] = True
        return m
    if kind == "far":  # the 5% of rows least similar to the first query: hard for an ANN
        scores = vectors @ queries[0]
        return scores <= np.quantile(scores, 0.05)
    return rng.random(N) < float(kind)


def oracle(vectors: np.ndarray, ids: list[str], vec: np.ndarray, k: int, mask: np.ndarray, exclude: set[str]):
    """The exact filtered top-k: float64 scores over the allowed, non-excluded rows."""
    rows = np.array([r for r in np.flatnonzero(mask) if ids[r] not in exclude], dtype=np.int64)
    scores = vectors[rows].astype(np.float64) @ vec.astype(np.float64)
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def force(topk: TopK, strategy: str) -> TopK:
    if strategy == "exact":
        topk.filter_exact_max_rows, topk.filter_exact_fraction = N, 1.0
    elif strategy == "ann":
        topk.filter_exact_max_rows, topk.filter_exact_fraction = 0, 0.0
    return topk


def check(got, vectors, ids, vec, k, mask, exclude, *, exact: bool) -> tuple[int, int]:
    """Assert the guarantee; return (oracle items found, oracle items) for an ANN's recall."""
    want_rows, want_scores = oracle(vectors, ids, vec, k, mask, exclude)
    assert len(got) == len(want_rows) == min(k, int(sum(1 for r in np.flatnonzero(mask) if ids[r] not in exclude)))
    rows = as_rows(np.array([i for i, _ in got], dtype=object)) if got else np.zeros(0, dtype=np.int64)
    assert len(set(rows.tolist())) == len(rows)
    assert mask[rows].all(), "an item outside the filter"
    assert not {ids[r] for r in rows} & exclude, "an excluded item"
    scores = np.array([s for _, s in got])
    np.testing.assert_allclose(scores, vectors[rows].astype(np.float64) @ vec, atol=1e-6)
    assert (np.diff(scores) <= 0).all()
    if not len(rows):
        return 0, 0
    if exact:  # the same items up to float ties at the cut-off
        assert (scores >= want_scores[-1] - 1e-6).all()
    return len(set(rows.tolist()) & set(want_rows.tolist())), len(want_rows)


@pytest.fixture(scope="module")
def exclusions(catalog, queries):
    """Per query: the best 5 allowed-by-anything items plus ids outside the catalog."""
    vectors, ids = catalog
    top = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    return [{ids[r] for r in row} | {"not-in-catalog"} for row in top]


@pytest.mark.parametrize("strategy", ["exact", "ann", "auto"])
@pytest.mark.parametrize("selectivity", list(SELECTIVITIES), ids=list(SELECTIVITIES))
@pytest.mark.parametrize("factory", list(FACTORIES))
def test_filtered_topk_guarantee(factory, selectivity, strategy, built, catalog, queries, exclusions):
    vectors, ids = catalog
    topk = force(FaissTopK(built[factory], vectors, ids), strategy)
    masks = [make_mask(SELECTIVITIES[selectivity], seed=i) for i in range(6)]
    qs = [Query(10, frozenset(exclusions[i]) if i % 2 else frozenset(), Allowed(m)) for i, m in enumerate(masks)]
    results, strategies = topk.top_k_strategies(queries[:6], qs)
    exact = strategy == "exact" or FACTORIES[factory][1] == 1.0
    found = total = 0
    for i, (got, q) in enumerate(zip(results, qs, strict=True)):
        f, t = check(got, vectors, ids, queries[i], 10, masks[i], set(q.exclude), exact=exact)
        found, total = found + f, total + t
        assert strategies[i] in ("exact", "ann", "fallback")
        if strategy == "exact" or masks[i].sum() == 0:
            assert strategies[i] == "exact"
    assert found >= (FACTORIES[factory][1] - 0.1) * total  # the ANN's own recall, raised knobs


@pytest.mark.parametrize("factory", list(FACTORIES))
def test_k_larger_than_the_allowed_set(factory, built, catalog, queries):
    vectors, ids = catalog
    topk = force(FaissTopK(built[factory], vectors, ids), "ann")
    mask = make_mask(0.005, seed=9)  # ~15 rows
    exclude = {ids[int(np.flatnonzero(mask)[0])]}
    (got,) = topk.top_k(queries[:1], [Query(100, frozenset(exclude), Allowed(mask))])
    check(got, vectors, ids, queries[0], 100, mask, exclude, exact=True)  # every allowed row, exactly once


@pytest.mark.parametrize("factory", ["HNSW32", "IVF32,Flat", "IVF32,PQ8x8"])
def test_a_filter_far_from_the_query(factory, built, catalog, queries):
    """Allowed rows are the 5% least similar to the query: the ANN's neighbourhood holds none."""
    vectors, ids = catalog
    index = built[factory]
    topk = force(FaissTopK(index, vectors, ids), "ann")
    mask = make_mask("far", 0, queries, vectors)
    (got,), (strategy,) = topk.top_k_strategies(queries[:1], [Query(20, frozenset(), Allowed(mask))])
    found, total = check(got, vectors, ids, queries[0], 20, mask, set(), exact=FACTORIES[factory][1] == 1.0)
    assert found >= (FACTORIES[factory][1] - 0.1) * total
    assert strategy in ("ann", "fallback")


class ShortANN(TopK):
    """A backend whose selector search finds only the first 2 allowed rows (then pads with -1)."""

    approximate = True
    selector_search = True
    filter_exact_max_rows, filter_exact_fraction = 0, 0.0

    def allowed_candidates(self, vec, fetch, allowed):  # noqa: ANN001, ANN201
        rows = np.full(fetch, -1, dtype=np.int64)
        rows[: min(2, fetch)] = allowed.rows[:2]
        return rows


def test_a_short_ann_answer_falls_back_to_the_exact_scan(catalog, queries):
    vectors, ids = catalog
    topk = ShortANN(vectors, ids)
    mask = make_mask(0.5, seed=2)
    (got,), (strategy,) = topk.top_k_strategies(queries[:1], [Query(10, frozenset(), Allowed(mask))])
    assert strategy == "fallback"
    check(got, vectors, ids, queries[0], 10, mask, set(), exact=True)


def test_a_backend_returning_rows_outside_the_filter_is_not_trusted(catalog, queries):
    vectors, ids = catalog

    class Leaky(ShortANN):
        def allowed_candidates(self, vec, fetch, allowed):  # noqa: ANN001, ANN201
            return np.arange(fetch, dtype=np.int64)  # ignores the filter

    mask = make_mask(0.3, seed=4)
    (got,), _ = Leaky(vectors, ids).top_k_strategies(queries[:1], [Query(10, frozenset(), Allowed(mask))])
    check(got, vectors, ids, queries[0], 10, mask, set(), exact=True)


def test_a_batch_mixes_filters_and_unfiltered_queries(built, catalog, queries, exclusions):
    vectors, ids = catalog
    topk = force(FaissTopK(built["IVF32,Flat"], vectors, ids), "auto")
    masks = [make_mask(s, seed=i) for i, s in enumerate([0.5, 0.01, "one", 0.0])]
    qs = [Query(7, frozenset(exclusions[0])), *(Query(7, frozenset(), Allowed(m)) for m in masks), Query(3)]
    results, strategies = topk.top_k_strategies(queries[: len(qs)], qs)
    assert strategies[0] is None and strategies[-1] is None
    plain = BruteForceTopK(vectors, ids).top_k(queries[:1], [qs[0]])[0]
    assert [i for i, _ in results[0]] == [i for i, _ in plain]
    for j, m in enumerate(masks, start=1):
        check(results[j], vectors, ids, queries[j], 7, m, set(), exact=True)
    assert len(results[-1]) == 3


def test_the_brute_force_oracle_filters_exactly(catalog, queries):
    vectors, ids = catalog
    mask = make_mask(0.1, seed=5)
    (got,), (strategy,) = BruteForceTopK(vectors, ids).top_k_strategies(queries[:1], [Query(15, allowed=Allowed(mask))])
    assert strategy == "exact"
    want, _ = oracle(vectors, ids, queries[0], 15, mask, set())
    assert [i for i, _ in got] == [ids[r] for r in want]


def test_a_mask_of_another_catalog_is_refused(catalog, queries):
    vectors, ids = catalog
    with pytest.raises(ValueError, match="mask of 10 rows for a catalog of 3000"):
        BruteForceTopK(vectors, ids).top_k(queries[:1], [Query(5, allowed=Allowed(np.ones(10, dtype=bool)))])


def test_allowed_rejects_a_non_bool_mask():
    with pytest.raises(ValueError, match="1-D bool"):
        Allowed(np.ones(5, dtype=np.int8))


def test_allowed_from_rows_matches_allowed_from_a_mask():
    mask = make_mask(0.2, seed=8)
    a, b = Allowed(mask), Allowed.from_rows(np.flatnonzero(mask), N)
    assert a.count == b.count and a.size == b.size == N
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.bitmap, b.bitmap)
    with pytest.raises(ValueError, match="sorted, unique"):
        Allowed.from_rows(np.array([3, 1]), N)
    with pytest.raises(ValueError, match="sorted, unique"):
        Allowed.from_rows(np.array([N]), N)
