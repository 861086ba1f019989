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


