"""FAISS index functions (build, parameters, recall, io) against the numpy brute-force oracle."""

from __future__ import annotations

import subprocess
import sys

import faiss
import numpy as np
import pytest

from indexer import faiss_index as fi
from tests.indexer.conftest import D, as_rows, clustered


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
    # above AUTO_REFINE_MIN (docs/bench/bigindex.md): IVF-PQ with d/2 bytes, re-ranked with one-byte SQ codes (over-fetched, re-scored exactly)
    assert fi.auto_spec(fi.AUTO_REFINE_MIN, 64).factory.endswith(",Flat")
    assert fi.auto_spec(fi.AUTO_REFINE_MIN + 1, 64).factory == "IVF4096,PQ32x8,Refine(SQ8)"
    assert fi.auto_spec(10**9, 64).factory == "IVF8192,PQ32x8,Refine(SQ8)"
    assert fi.auto_spec(10**9, 64, refine_min=None).factory == "IVF8192,Flat"
    assert fi.auto_spec(5_000_000, 64, refine_min=5_000_000).factory == "IVF4096,Flat"
    assert fi.auto_spec(5_000_001, 64, refine_min=5_000_000).factory == "IVF4096,PQ32x8,Refine(SQ8)"
    assert fi.auto_spec(10**9, 63, refine_min=1).factory == "IVF8192,Flat"  # an odd dimension does not split into 2-d codes
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




# ---- re-ranked (IndexRefine) quantized indexes -------------------------------------------------

# factory -> exhaustive search params; every one re-ranks a compressed base with better codes
REFINED = {
    "IVF32,PQ8x8,RFlat": {"nprobe": 32, "k_factor": 8},
    "IVF32,PQ8x8,Refine(Flat)": {"nprobe": 32, "k_factor": 8},
    "IVF32,PQ8x8,Refine(SQ8)": {"nprobe": 32, "k_factor": 8},
    "IVF32,PQ8x8,Refine(SQfp16)": {"nprobe": 32, "k_factor": 8},  # what auto builds for large catalogs
    "IVF32,SQ4,RFlat": {"nprobe": 32, "k_factor": 8},
    "RR16,IVF16,PQ8x8,RFlat": {"nprobe": 16, "k_factor": 8},  # a transform in front of the refined base
    "HNSW16,SQ8,RFlat": {"efSearch": 256, "k_factor": 4},
}


@pytest.mark.parametrize("factory", list(REFINED))
def test_refined_factories_build_inner_product_and_roundtrip(factory, catalog, queries, oracle, tmp_path):
    vectors, ids = catalog
    params = REFINED[factory]
    index = fi.build_index(vectors, factory, search_params=params)
    refine = fi.refine_of(index)
    assert refine is not None and fi.is_refined(index)
    assert fi.index_family(index) == ("hnsw" if factory.startswith("HNSW") else "ivf")
    # every level ranks by inner product: the wrapper, the base, the refine codes
    assert index.metric_type == refine.base_index.metric_type == refine.refine_index.metric_type == fi.METRIC
    assert fi.get_search_params(index) == params
    scores, rows = fi.search(index, queries, 10)
    # the refined scores are inner products with (nearly) the stored vectors, not L2 distances
    true = np.einsum("qkd,qd->qk", vectors[rows], queries)
    tol = 2e-2 if "SQ8)" in factory else 2e-3 if "SQfp16" in factory else 1e-4
    np.testing.assert_allclose(scores, true, atol=tol)
    _, want = oracle.search(queries, 10)
    assert fi.recall_at_k(rows, as_rows(want)) >= (0.99 if "SQ8)" not in factory else 0.95)
    fi.write_index(index, tmp_path / "r.faiss")
    back = fi.read_index(tmp_path / "r.faiss")
    assert fi.get_search_params(back) == params
    np.testing.assert_array_equal(fi.search(back, queries, 10)[1], rows)
    mapped = fi.read_index(tmp_path / "r.faiss", mmap=True)  # codes memory-mapped, same answers
    assert fi.get_search_params(mapped) == params
    np.testing.assert_array_equal(fi.search(mapped, queries, 10)[1], rows)


def test_refine_rejects_what_cannot_work(catalog):
    vectors, _ = catalog
    with pytest.raises(ValueError, match="refines an exact \\(Flat\\) index"):
        fi.build_index(vectors, "Flat,RFlat")
    index = fi.build_index(vectors, "IVF32,PQ8x8,RFlat")
    with pytest.raises(ValueError, match="'k_factor' does not apply to a ivf index without refine"):
        fi.apply_search_params(fi.build_index(vectors, "IVF32,Flat"), {"k_factor": 2})
    with pytest.raises(ValueError, match="positive integer"):
        fi.apply_search_params(index, {"k_factor": 0})
    # why `search_parameters` exists: FAISS refuses IVF parameters handed to a refined index
    with pytest.raises(RuntimeError, match="params have incorrect type"):
        index.search(vectors[:1], 5, params=faiss.SearchParametersIVF(nprobe=4))


def test_refined_search_with_exclusions_and_overrides(catalog, queries):
    vectors, _ = catalog
    index = fi.build_index(vectors, "IVF32,PQ8x8,RFlat", search_params={"nprobe": 32, "k_factor": 8})
    _, rows = fi.search(index, queries, 20)
    excl = np.unique(rows[:, :5])  # each query's best five
    _, rows2 = fi.search(index, queries, 20, exclude_rows=excl)
    assert not np.isin(rows2, excl).any() and (rows2 >= 0).all()
    # per-call overrides reach both levels: k_factor 1 is the bare PQ ranking, which misses more
    truth = fi.exact_search(vectors, queries, 20)[1]
    p1 = fi.search_parameters(index, 20, k_factor=1, nprobe=32)
    _, bare = index.search(queries, 20, params=p1)
    assert fi.recall_at_k(bare, truth) < fi.recall_at_k(rows, truth)
    assert fi.recall_at_k(rows, truth) > 0.99
    with pytest.raises(ValueError, match="unknown search parameter"):
        fi.search_parameters(index, 20, ef=3)


def test_tune_refined_picks_nprobe_then_the_smallest_k_factor(catalog, queries):
    vectors, _ = catalog
    index = fi.build_index(vectors, "IVF32,PQ8x8,RFlat")
    assert fi.get_search_params(index)["k_factor"] == fi.DEFAULT_K_FACTOR  # re-ranks even untuned
    params, rec = fi.tune_search_params(index, vectors, queries, 20, target=0.97)
    assert rec >= 0.97 and set(params) == {"nprobe", "k_factor"} and fi.get_search_params(index) == params
    i = fi.K_FACTOR_LADDER.index(params["k_factor"])
    assert i > 0  # PQ8x8 alone cannot reach 0.97 on this catalog
    fi.apply_search_params(index, {"k_factor": fi.K_FACTOR_LADDER[i - 1]})
    assert fi.measure_recall(index, vectors, queries, 20) < 0.97


def _big_catalog(n: int, d: int, n_queries: int = 200) -> tuple[np.ndarray, np.ndarray]:
    x = clustered(n + n_queries, d, seed=3, n_clusters=200, spread=0.5)
    return x[:n], x[n:]


@pytest.mark.parametrize(
    ("n", "factory", "k_factor"),
    [(200_000, "IVF512,PQ16x8,RFlat", 4), (50_000, "IVF256,PQ16x8,Refine(SQ8)", 4)],
)
def test_refine_lifts_recall_at_100_past_the_gate(n, factory, k_factor):
    """Issue 20 test 6 (recall part): a PQ code alone plateaus below the 0.95 recall gate, the
    same index re-ranking k_factor x k candidates passes it (the bare PQ ranking: the refine's
    base index searched on its own, k candidates)."""
    vectors, queries = _big_catalog(n, 32)
    index = fi.build_index(vectors, factory, build_params={"seed": 0})
    truth = fi.exact_search(vectors, queries, 100)
    fi.apply_search_params(index, {"nprobe": 32, "k_factor": k_factor})
    bare = fi.measure_recall(faiss.downcast_index(fi.refine_of(index).base_index), vectors, queries, 100, truth=truth)
    refined = fi.measure_recall(index, vectors, queries, 100, truth=truth)
    assert bare < 0.95 <= refined, (bare, refined)
