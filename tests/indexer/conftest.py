"""Helpers for the indexer tests (the trained tiny model comes from tests/conftest.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer import faiss_index as fi
from indexer import store


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
