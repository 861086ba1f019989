"""FAISS index functions and retrievers against the numpy brute-force oracle."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from indexer import faiss_index as fi

N, D = 3000, 16


def clustered(n: int, d: int, seed: int, n_clusters: int = 20, spread: float = 0.35) -> np.ndarray:
    """Unit vectors from a Gaussian mixture (real embeddings cluster; uniform data flatters IVF)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d))
    x = centers[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def as_rows(item_ids: np.ndarray) -> np.ndarray:
    """'item17' -> 17."""
    return np.vectorize(lambda s: int(s[4:]))(item_ids).astype(np.int64)


def assert_exact_topk(got, scores, want, oracle, queries) -> None:
    """`got` is an exact top-k: same length, unique, scores exact and none below the oracle's
    k-th score (float32 summation order may swap near-ties, so ids are compared up to ties)."""
    assert got.shape == want.shape
    rows = as_rows(got)
    true = np.einsum("qkd,qd->qk", oracle.vectors[rows], queries)
    np.testing.assert_allclose(scores, true, atol=1e-5)
    kth = np.einsum("qd,qd->q", oracle.vectors[as_rows(want[:, -1:])][:, 0], queries)
    assert (true >= kth[:, None] - 1e-5).all()
    assert all(len(set(r)) == len(r) for r in got.tolist())
    assert fi.recall_at_k(got, want) > 0.99


@pytest.fixture(scope="module")
def catalog() -> tuple[np.ndarray, list[str]]:
    return clustered(N, D, seed=0), [f"item{i}" for i in range(N)]


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(40, D, seed=1)


@pytest.fixture(scope="module")
def oracle(catalog) -> fi.BruteForceRetriever:
    return fi.BruteForceRetriever(*catalog)


# factory -> search params that make the index (near-)exhaustive, and the recall@10 it must reach
FACTORIES = {
    "Flat": ({}, 1.0),
    "HNSW32": ({"efSearch": 256}, 0.99),
    "HNSW16,SQ8": ({"efSearch": 256}, 0.9),
    "IVF32,Flat": ({"nprobe": 32}, 1.0),  # every list probed: exhaustive
    "IVF32,SQ8": ({"nprobe": 32}, 0.9),
    "IVF32,PQ8x8": ({"nprobe": 32}, 0.6),  # 2-d sub-vectors, 8 bits: coarse but far from random
    "RR16,IVF16,Flat": ({"nprobe": 16}, 1.0),  # a random rotation keeps inner products
}


@pytest.fixture(scope="module")
def built(catalog) -> dict[str, faiss.Index]:
    vectors, _ = catalog
    return {f: fi.build_index(vectors, f, search_params=p) for f, (p, _) in FACTORIES.items()}


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
    r = fi.BruteForceRetriever(v, list("abcdef"))
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
    retr = fi.FaissRetriever(index, ids, vectors)
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
    retr = fi.FaissRetriever(index, ids[:300], small)
    scores, got = retr.search(queries[:3], 500)
    assert got.shape == (3, 300)
    for row in got:
        assert sorted(row.tolist()) == sorted(ids[:300])  # every item exactly once
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("factory", list(FACTORIES))
def test_exclusions(factory, built, catalog, queries, oracle):
    vectors, ids = catalog
    retr = fi.FaissRetriever(built[factory], ids, vectors)
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
        retr = fi.FaissRetriever(built[factory], ids, vectors)
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
    scores, got = fi.FaissRetriever(index, ids, vectors).search(queries, k)
    assert got.shape == (len(queries), k)
    _, want = oracle.search(queries, k)
    short = (rows < 0).any(axis=1)
    assert_exact_topk(got[short], scores[short], want[short], oracle, queries[short])
    assert np.isfinite(scores).all()


# ---- input checks (explicit, not asserts) -------------------------------------------------------


def test_bad_queries_raise_value_errors(built, catalog):
    vectors, ids = catalog
    retr = fi.FaissRetriever(built["HNSW32"], ids, vectors)
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


def test_checks_survive_python_O():
    """`python -O` strips asserts; our checks must still raise."""
    code = (
        "import numpy as np; from indexer import faiss_index as fi\n"
        "x = np.eye(8, dtype=np.float32)\n"
        "idx = fi.build_index(x, 'Flat')\n"
        "try:\n    fi.search(idx, np.ones((1, 4), np.float32), 3)\nexcept ValueError as e:\n    print('OK', e)\n"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK") and "dimension 4" in out.stdout


def test_build_rejects_bad_input(catalog):
    vectors, _ = catalog
    with pytest.raises(ValueError, match="L2-normalized"):
        fi.build_index(vectors * 2, "Flat")
    bad = vectors.copy()
    bad[5, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite.*first row 5"):
        fi.build_index(bad, "Flat")
    with pytest.raises(ValueError, match="empty catalog"):
        fi.build_index(np.empty((0, 16), np.float32), "Flat")
    with pytest.raises(ValueError, match="invalid FAISS factory string 'Bogus12'"):
        fi.build_index(vectors[:10], "Bogus12")
    with pytest.raises(ValueError, match="has 4096 inverted lists but the catalog has only 3000"):
        fi.build_index(vectors, "IVF4096,Flat")
    with pytest.raises(ValueError, match="unsupported index type IndexPQ"):
        fi.build_index(vectors[:300], "PQ4")
    # FAISS builds HNSW+PQ with the L2 metric whatever we ask for: refuse it
    with pytest.raises(ValueError, match="expected inner product"):
        fi.build_index(vectors[:300], "HNSW16,PQ4")
    with pytest.raises(ValueError, match="unknown build parameter"):
        fi.build_index(vectors[:10], "Flat", build_params={"efconstruction": 10})


def test_search_params_validation_and_roundtrip(built, tmp_path):
    hnsw = fi.build_index(clustered(500, D, 3), "HNSW32")
    assert fi.apply_search_params(hnsw, {"efSearch": 77}) == {"efSearch": 77}
    assert fi.get_search_params(hnsw) == {"efSearch": 77}
    ivf = built["IVF32,Flat"]
    assert fi.get_search_params(built["Flat"]) == {}
    with pytest.raises(ValueError, match="'nprobe' does not apply to a hnsw index"):
        fi.apply_search_params(hnsw, {"nprobe": 4})
    with pytest.raises(ValueError, match="'efSearch' does not apply to a flat index"):
        fi.apply_search_params(built["Flat"], {"efSearch": 4})
    with pytest.raises(ValueError, match="nprobe=64 exceeds the index's nlist=32"):
        fi.validate_search_params(ivf, {"nprobe": 64})
    with pytest.raises(ValueError, match="unknown search parameter 'ef'"):
        fi.apply_search_params(hnsw, {"ef": 4})
    with pytest.raises(ValueError, match="positive integer"):
        fi.apply_search_params(hnsw, {"efSearch": 0})
    opq = built["RR16,IVF16,Flat"]  # knobs reach the IVF behind the transform
    fi.apply_search_params(opq, {"nprobe": 3})
    assert fi.get_search_params(opq) == {"nprobe": 3}
    fi.write_index(hnsw, tmp_path / "h.faiss")
    back = fi.read_index(tmp_path / "h.faiss")
    assert back.ntotal == 500 and fi.index_family(back) == "hnsw"
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="not a readable FAISS index"):
        fi.read_index(tmp_path / "junk.faiss")


# ---- recall ------------------------------------------------------------------------------------


def test_recall_functions():
    assert fi.recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 1]])) == 1.0
    assert fi.recall_at_k(np.array([[1, -1, -1]]), np.array([[1, 2, 4]])) == pytest.approx(1 / 3)
    assert fi.recall_at_k(np.array([[1, 2], [5, 6]]), np.array([[1, 2], [7, 8]])) == 0.5
    # ties at the cut-off: any of the tied rows is a correct answer
    v = np.tile(np.eye(4, dtype=np.float32)[0], (10, 1))
    flat = fi.build_index(v, "Flat")
    assert fi.measure_recall(flat, v, v[:1], 5) == 1.0
    assert fi.recall_at_k(np.array([[5, 6, 7, 8, 9]]), np.array([[0, 1, 2, 3, 4]])) == 0.0


def test_measure_recall_matches_set_recall_without_ties(catalog, queries, oracle):
    vectors, ids = catalog
    index = fi.build_index(vectors, "IVF32,Flat", search_params={"nprobe": 2})
    _, rows = fi.search(index, queries, 50)
    _, want = oracle.search(queries, 50)
    set_recall = fi.recall_at_k(rows, as_rows(want))
    assert fi.measure_recall(index, vectors, queries, 50) == pytest.approx(set_recall, abs=1e-9)
    assert set_recall < 1.0  # nprobe=2 of 32 lists really is approximate


def test_tune_picks_the_cheapest_sufficient_value(catalog, queries):
    vectors, _ = catalog
    index = fi.build_index(vectors, "IVF32,Flat")
    params, rec = fi.tune_search_params(index, vectors, queries, 20, target=0.97)
    assert rec >= 0.97 and fi.get_search_params(index) == params
    ladder = [v for v in fi.NPROBE_LADDER if v < 32] + [32]
    i = ladder.index(params["nprobe"])
    assert i > 0
    fi.apply_search_params(index, {"nprobe": ladder[i - 1]})
    assert fi.measure_recall(index, vectors, queries, 20) < 0.97


# ---- misc ----------------------------------------------------------------------------------------


def test_auto_spec_by_catalog_size():
    assert fi.auto_spec(1_000, 64).factory == "Flat"
    assert fi.auto_spec(fi.AUTO_FLAT_MAX, 64).factory == "Flat"
    assert fi.auto_spec(fi.AUTO_FLAT_MAX + 1, 64).factory == "IVF512,Flat"
    assert fi.auto_spec(100_000, 64).factory == "IVF512,Flat"
    assert fi.auto_spec(1_000_000, 64).factory == "IVF2048,Flat"
    assert fi.auto_spec(10**9, 64).factory == "IVF8192,Flat"
    for n in (fi.AUTO_FLAT_MAX + 1, 100_000, 1_000_000):  # every auto IVF gets >= 39 training points per list
        assert n >= 39 * fi.factory_nlist(fi.auto_spec(n, 64).factory)
    with pytest.raises(ValueError):
        fi.auto_spec(0, 64)


def test_set_num_threads(monkeypatch):
    before = faiss.omp_get_max_threads()
    try:
        assert fi.set_num_threads(1) == 1 and faiss.omp_get_max_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert fi.set_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert fi.set_num_threads() == fi.available_cpus()
        with pytest.raises(ValueError):
            fi.set_num_threads(0)
    finally:
        faiss.omp_set_num_threads(before)


def test_concurrent_searches_agree(built, catalog, queries):
    vectors, ids = catalog
    retr = fi.FaissRetriever(built["HNSW32"], ids, vectors)
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
        fi.BruteForceRetriever(vectors[:10], ids)
    with pytest.raises(ValueError, match="'a' appears more than once"):
        fi.BruteForceRetriever(vectors[:3], ["a", "b", "a"])
    with pytest.raises(ValueError, match="index holds 3000 vectors"):
        fi.FaissRetriever(built["Flat"], ids[:10], vectors[:10])
