"""Helpers for the indexer tests (the trained tiny model comes from tests/conftest.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer import faiss_index as fi
from indexer import store
from indexer.topk import BruteForceTopK


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_test_version(root: Path, bundle_path: Path, *, n: int = 50, seed: int = 0, factory: str = "Flat") -> Path:
    """A real version directory over random unit vectors, written through `store.write_version`."""
    from training.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    vectors = unit_rows(n, bundle.model.embedding_dim, seed)
    index = fi.build_index(vectors, factory)
    with store.locked(root):
        return store.write_version(
            root, store.new_version_name(), index=index, embeddings=vectors,
            item_ids=[f"it{seed}-{i}" for i in range(n)], bundle_path=bundle.path,
            model_version=bundle.version, index_info={"factory": factory, "search_params": fi.get_search_params(index)},
            recall=None,
        )


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (following nothing): a byte-level snapshot."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def root_snapshot(root: Path) -> tuple[str | None, dict[str, str]]:
    """(target of `current`, byte digest of the directory it points to)."""
    link = root / store.CURRENT
    if not link.is_symlink():
        return None, {}
    target = os.readlink(link)
    return target, tree_digest(root / target)


@pytest.fixture
def dataset_copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the shared tiny dataset, safe to edit."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_dataset, dst)
    return dst


# ---- a clustered catalog, every index type over it, the exact oracle --------------------------

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
    true = np.einsum("qkd,qd->qk", oracle.embeddings[rows], queries)
    np.testing.assert_allclose(scores, true, atol=1e-5)
    kth = np.einsum("qd,qd->q", oracle.embeddings[as_rows(want[:, -1:])][:, 0], queries)
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
def oracle(catalog) -> BruteForceTopK:
    return BruteForceTopK(*catalog)


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
