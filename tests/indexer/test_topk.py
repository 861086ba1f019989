"""Top-k with exclusions (indexer.topk) over every index type, against the brute-force oracle."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from indexer import faiss_index as fi
from indexer.topk import BruteForceTopK, FaissTopK, Query, TopK, exact_scores
from tests.indexer.conftest import FACTORIES, N, as_rows, assert_exact_topk

# ---- the oracle itself ------------------------------------------------------------------------


def test_bruteforce_oracle_matches_full_sort(catalog, queries, oracle):
    vectors, ids = catalog
    scores, got = oracle.search(queries, 25)
    full = queries @ vectors.T
    for i in range(len(queries)):
        order = np.lexsort((np.arange(N), -full[i]))[:25]
        assert got[i].tolist() == [ids[j] for j in order]
        np.testing.assert_allclose(scores[i], full[i, order], rtol=0, atol=1e-6)


def test_bruteforce_breaks_ties_by_row():
    v = np.tile(np.eye(4, dtype=np.float32)[0], (6, 1))  # six identical vectors
    r = BruteForceTopK(v, list("abcdef"))
    _, ids = r.search(v[:1], 3)
    assert ids[0].tolist() == ["a", "b", "c"]
    _, ids = r.search(v[:1], 3, exclude=["b"])
    assert ids[0].tolist() == ["a", "c", "d"]


# ---- every index type against the oracle -------------------------------------------------------


@pytest.mark.parametrize("factory", list(FACTORIES))
def test_index_recall_vs_oracle(factory, built, catalog, queries, oracle):
    vectors, ids = catalog
    index = built[factory]
    assert index.ntotal == N and index.metric_type == faiss.METRIC_INNER_PRODUCT
    retr = FaissTopK(index, vectors, ids)
    scores, got = retr.search(queries, 10)
    _, want = oracle.search(queries, 10)
    assert got.shape == want.shape == (len(queries), 10)
    assert fi.recall_at_k(got, want) >= FACTORIES[factory][1]
    # returned scores are exact cosines of the returned items, sorted descending
    rows = as_rows(got)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", vectors[rows], queries), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-7).all()
    if FACTORIES[factory][1] == 1.0:
        assert_exact_topk(got, scores, want, oracle, queries)


@pytest.mark.parametrize("factory", list(FACTORIES))
def test_k_larger_than_catalog_never_returns_minus_one(factory, built, catalog, queries, oracle):
    vectors, ids = catalog
    small = vectors[:300]
    index = fi.build_index(small, factory if "IVF" not in factory else factory.replace("IVF32", "IVF4").replace("IVF16", "IVF4"),
                           search_params={"efSearch": 16} if "HNSW" in factory else None)
    s, rows = fi.search(index, queries[:3], 500)
    assert rows.shape[1] == 300  # clipped to ntotal, not padded
    retr = FaissTopK(index, small, ids[:300])
    scores, got = retr.search(queries[:3], 500)
    assert got.shape == (3, 300)
    for row in got:
        assert sorted(row.tolist()) == sorted(ids[:300])  # every item exactly once
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("factory", list(FACTORIES))
def test_exclusions(factory, built, catalog, queries, oracle):
    vectors, ids = catalog
    retr = FaissTopK(built[factory], vectors, ids)
    _, top = oracle.search(queries[:5], 20)
    exclude = set(top[:, :10].ravel().tolist()) | {"not-in-catalog"}
    scores, got = retr.search(queries[:5], 20, exclude=exclude)
    assert got.shape == (5, 20)
    assert not exclude & set(got.ravel().tolist())
    if FACTORIES[factory][1] == 1.0:
        _, want = oracle.search(queries[:5], 20, exclude=exclude)
        assert (got == want).all()


def test_exclude_almost_everything_returns_the_rest(built, catalog, queries):
    vectors, ids = catalog
    keep = {"item7", "item1500", "item2999"}
    exclude = [i for i in ids if i not in keep]
    for factory in ("Flat", "HNSW32", "IVF32,Flat"):
        retr = FaissTopK(built[factory], vectors, ids)
        _, got = retr.search(queries[:4], 100, exclude=exclude)
        assert got.shape == (4, 3)
        assert all(set(r) == keep for r in got.tolist())
        _, none = retr.search(queries[:2], 5, exclude=ids)
        assert none.shape == (2, 0)


def test_ivf_shortfall_is_filled_by_exact_search(catalog, queries, oracle):
    """An IVF probing one list finds fewer than k candidates: the low-level search says so with
    -1 rows, the retriever answers exactly instead."""
    vectors, ids = catalog
    index = fi.build_index(vectors, "IVF32,Flat", search_params={"nprobe": 1})
    k = 1000  # ~4x a list's size
    _, rows = fi.search(index, queries, k)
    assert (rows < 0).any()
    scores, got = FaissTopK(index, vectors, ids).search(queries, k)
    assert got.shape == (len(queries), k)
    _, want = oracle.search(queries, k)
    short = (rows < 0).any(axis=1)
    assert_exact_topk(got[short], scores[short], want[short], oracle, queries[short])
    assert np.isfinite(scores).all()


# ---- input checks (explicit, not asserts) -------------------------------------------------------


def test_bad_queries_raise_value_errors(built, catalog):
    vectors, ids = catalog
    retr = FaissTopK(built["HNSW32"], vectors, ids)
    q = vectors[:2].copy()
    with pytest.raises(ValueError, match=r"dimension 8 .*index has dimension 16"):
        retr.search(q[:, :8], 5)
    with pytest.raises(ValueError, match=r"dimension 8"):
        fi.search(built["Flat"], q[:, :8], 5)
    nan = q.copy()
    nan[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"non-finite .* first row 1"):
        retr.search(nan, 5)
    inf = q.copy()
    inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        fi.search(built["IVF32,Flat"], inf, 5)
    with pytest.raises(ValueError, match="2-D"):
        retr.search(q[None], 5)
    for bad_k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            retr.search(q, bad_k)
    with pytest.raises(ValueError, match="not a single string"):
        retr.search(q, 5, exclude="item1")
    one_d_scores, one_d = retr.search(q[0], 3)  # a single 1-D query is one row
    assert one_d.shape == (1, 3)


def test_concurrent_searches_agree(built, catalog, queries):
    vectors, ids = catalog
    retr = FaissTopK(built["HNSW32"], vectors, ids)
    want = [retr.search(q, 10, exclude=[f"item{j}" for j in range(i)])[1] for i, q in enumerate(queries)]
    barrier = threading.Barrier(4)

    def run(i: int):
        if i < 4:
            barrier.wait()
        return retr.search(queries[i], 10, exclude=[f"item{j}" for j in range(i)])[1]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, range(len(queries))))
    assert all((g == w).all() for g, w in zip(got, want, strict=True))


def test_retriever_constructor_checks(catalog, built):
    vectors, ids = catalog
    with pytest.raises(ValueError, match="3000 item ids for 10 vectors"):
        BruteForceTopK(vectors[:10], ids)
    with pytest.raises(ValueError, match="'a' appears more than once"):
        BruteForceTopK(vectors[:3], ["a", "b", "a"])
    with pytest.raises(ValueError, match="index holds 3000 vectors"):
        FaissTopK(built["Flat"], vectors[:10], ids[:10])


# ---- finish: re-scoring and ordering against a plain reference ----------------------------------


def _reference(version: TopK, vec: np.ndarray, rows: np.ndarray, q: Query) -> list[tuple[str, float]]:
    rows = np.unique(rows[rows >= 0])
    scores = exact_scores(version.embeddings, rows, vec).tolist()
    ranked = sorted(zip(rows.tolist(), scores, strict=True), key=lambda rs: (-rs[1], rs[0]))
    out = [(version.item_ids[r], s) for r, s in ranked if version.item_ids[r] not in q.exclude]
    return out[: q.k]


def test_finish_orders_by_score_then_row_and_filters_like_the_reference() -> None:
    rng = np.random.default_rng(0)
    n, d = 200, 8
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[11] = emb[10]  # identical vectors: tied scores, broken by row
    emb[150] = emb[3]
    version = BruteForceTopK(emb, [f"i{i}" for i in range(n)])
    for trial in range(3000):
        vec = rng.normal(size=d).astype(np.float32)
        vec /= np.linalg.norm(vec)
        rows = rng.choice(n, size=int(rng.integers(0, 40)), replace=trial % 4 == 0).astype(np.int64)
        if len(rows) and trial % 3 == 0:
            rows[rng.integers(0, len(rows), size=3)] = -1  # ANN padding
        if trial % 5 == 0:
            rows = np.concatenate([rows, [10, 11, 3, 150]]).astype(np.int64)
        exclude = frozenset(f"i{i}" for i in rng.choice(n, size=int(rng.integers(0, 3)) * 4))
        q = Query(int(rng.integers(1, 30)), exclude)
        assert version.finish(vec, rows, q) == _reference(version, vec, rows, q)


def test_finish_of_nothing_or_only_padding_is_empty() -> None:
    version = BruteForceTopK(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
    q = Query(3, frozenset())
    vec = np.array([1, 0, 0, 0], np.float32)
    assert version.finish(vec, np.array([], np.int64), q) == []
    assert version.finish(vec, np.array([-1, -1], np.int64), q) == []


# ---- exact re-scoring from a large file, over-fetching a lossy refine ------------------------


def _saved(tmp_path, vectors: np.ndarray) -> np.memmap:
    np.save(tmp_path / "embeddings.npy", vectors)
    return np.load(tmp_path / "embeddings.npy", mmap_mode="r")


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 4)])
def test_file_rows_take_equals_the_matrix(tmp_path, catalog, shape):
    from indexer.topk import FileRows

    vectors, _ = catalog
    mm = _saved(tmp_path, vectors)
    rows = np.random.default_rng(3).integers(0, len(vectors), shape)
    got = FileRows(mm).take(rows, axis=0)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, vectors.take(rows, axis=0))


def test_file_rows_reject_rows_outside_the_file(tmp_path, catalog):
    from indexer.topk import FileRows

    vectors, _ = catalog
    rows = FileRows(_saved(tmp_path, vectors))
    with pytest.raises(IndexError, match=rf"outside the {len(vectors)} rows"):
        rows.take(np.array([0, len(vectors)]))
    with pytest.raises(ValueError, match="float32"):
        FileRows(np.load(_np_save(tmp_path, vectors.astype(np.float64)), mmap_mode="r"))


def _np_save(tmp_path, x: np.ndarray):
    p = tmp_path / "f64.npy"
    np.save(p, x)
    return p


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_rescoring_from_the_file_answers_like_the_memory_map(tmp_path, monkeypatch, catalog, queries, factory):
    import indexer.topk as topk_mod

    vectors, ids = catalog
    mm = _saved(tmp_path, vectors)
    index = fi.build_index(vectors, factory)
    mapped = FaissTopK(index, mm, ids)
    monkeypatch.setattr(topk_mod, "PREAD_MIN_BYTES", 0)
    filed = FaissTopK(index, mm, ids)
    assert isinstance(filed.rescore_rows, topk_mod.FileRows) and not isinstance(mapped.rescore_rows, topk_mod.FileRows)
    qs = [Query(10), Query(25, frozenset(ids[:40]))]
    for q in queries[:20]:
        vec = q[None, :]
        for query in qs:
            assert filed.top_k(vec, [query]) == mapped.top_k(vec, [query])


@pytest.mark.parametrize(
    ("refine", "k", "expect"),
    [("Refine(SQ8)", 100, 150), ("Refine(SQ8)", 7, 11), ("Refine(SQfp16)", 100, 100), ("RFlat", 100, 100), (None, 100, 100)],
)
def test_lossy_refine_codes_are_over_fetched(catalog, refine, k, expect):
    vectors, ids = catalog
    factory = "IVF16,PQ8x4" + (f",{refine}" if refine else "")
    index = fi.build_index(vectors, factory)
    assert fi.rescore_fetch(index, k) == expect
    assert FaissTopK(index, vectors, ids).overfetch(k) == expect
    assert FaissTopK(index, vectors, ids).overfetch(len(vectors) + 5) == len(vectors)  # capped at the catalog


def test_over_fetching_an_sq8_refine_recovers_its_cut_off(catalog, queries, oracle):
    """All lists probed, the SQ8 codes are the only error left: ordered by them the top-k misses
    items near the k-th score; over-fetched and re-scored exactly, it matches the oracle."""
    vectors, ids = catalog
    index = fi.build_index(vectors, "IVF16,PQ8x4,Refine(SQ8)")
    fi.apply_search_params(index, {"nprobe": 16, "k_factor": 8})
    served = FaissTopK(index, vectors, ids)
    k = 50
    _, want = oracle.search(queries, k)
    _, alone = fi.search(index, queries, k)
    got = served.top_k(queries, [Query(k)] * len(queries))
    served_recall = np.mean([len(set(w) & {i for i, _ in g}) / k for w, g in zip(want, got, strict=True)])
    alone_recall = np.mean([len(set(w) & {ids[r] for r in a}) / k for w, a in zip(want, alone, strict=True)])
    assert served_recall >= 0.995 > alone_recall
    assert fi.measure_recall(index, vectors, queries, k) == pytest.approx(served_recall, abs=0.005)
