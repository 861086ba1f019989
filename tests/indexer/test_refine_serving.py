"""A re-ranked quantized index (IndexRefine) through the serving path: written as a version,
loaded by `load_version` (its smoke test included), answered by `FaissTopK`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer import faiss_index as fi
from indexer import store
from indexer.topk import Allowed, BruteForceTopK, Query
from indexer.version import load_version
from tests.indexer.conftest import clustered

N = 3000
FACTORY = "IVF16,PQ8x8,RFlat"
PARAMS = {"nprobe": 16, "k_factor": 8}


@pytest.fixture
def served(tmp_path: Path, tiny_bundle_path: Path):
    from training.bundle import load_bundle

    bundle = load_bundle(tiny_bundle_path)
    d = bundle.model.embedding_dim
    vectors = clustered(N + 30, d, seed=5)
    vectors, queries = vectors[:N], vectors[N:]
    index = fi.build_index(vectors, FACTORY, search_params=PARAMS)
    root = tmp_path / "index"
    with store.locked(root):
        path = store.write_version(
            root, store.new_version_name(), index=index, embeddings=vectors, item_ids=[f"it{i}" for i in range(N)],
            bundle_path=bundle.path, model_version=bundle.version,
            index_info={"factory": FACTORY, "search_params": fi.get_search_params(index)}, recall=None,
        )
    return load_version(path), BruteForceTopK(vectors, [f"it{i}" for i in range(N)]), queries


def test_refined_version_loads_and_answers_like_the_oracle(served):
    version, oracle, queries = served
    assert fi.is_refined(version.index) and fi.get_search_params(version.index) == PARAMS
    scores, ids = version.topk.search(queries, 20)
    want_scores, want = oracle.search(queries, 20)
    assert fi.recall_at_k(ids, want) >= 0.99
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)  # exact cosines, re-scored from embeddings.npy


def test_refined_version_answers_a_broad_filter(served):
    version, oracle, queries = served
    mask = np.zeros(N, dtype=bool)
    mask[::2] = True  # 50 %: the ANN-with-selector strategy
    allowed = Allowed(mask)
    version.topk.filter_exact_max_rows, version.topk.filter_exact_fraction = 0, 0.0  # force the selector search
    assert version.topk.filter_strategy(allowed) == "ann"
    got = version.topk.top_k(queries[:3], [Query(10, allowed=allowed)] * 3)
    want = oracle.top_k(queries[:3], [Query(10, allowed=allowed)] * 3)
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in want]
