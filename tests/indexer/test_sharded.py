"""Sharded build + merge (indexer.sharded) equals the one-process build over the same trained index."""

from __future__ import annotations

import numpy as np
import pytest

from indexer import faiss_index as fi
from indexer import sharded
from tests.indexer.conftest import clustered

N, D = 6000, 16

FACTORIES = {
    "IVF32,Flat": {"nprobe": 8},
    "IVF32,PQ8x8": {"nprobe": 8},
    "IVF32,SQ8": {"nprobe": 8},
    "IVF32,PQ8x8,RFlat": {"nprobe": 8, "k_factor": 4},
    "IVF32,PQ8x8,Refine(SQ8)": {"nprobe": 8, "k_factor": 4},
    "RR16,IVF32,PQ8x8,RFlat": {"nprobe": 8, "k_factor": 4},
    "Flat": {},
}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = clustered(N + 50, D, seed=7)
    return x[:N], x[N:]


@pytest.fixture(scope="module")
def templates(data):
    """factory -> the trained empty index (trained once per module; shards only copy it)."""
    cache: dict[str, object] = {}

    def get(factory: str):
        if factory not in cache:
            cache[factory] = fi.train_index(data[0], factory, build_params={"seed": 0})
        return cache[factory]

    return get


def _one_process(template, vectors, params):
    """The reference: every row added in one pass to a copy of the same trained index."""
    index = sharded.fill_shard(template, vectors, 0)
    fi.apply_search_params(index, params)
    return index


@pytest.mark.parametrize("factory", list(FACTORIES))
@pytest.mark.parametrize("n_shards", [3, 7])
def test_sharded_build_equals_the_single_build(factory, n_shards, data, templates):
    vectors, queries = data
    params = FACTORIES[factory]
    template = templates(factory)
    merged = sharded.build_sharded(vectors, factory, n_shards=n_shards, workers=2, template=template, search_params=params)
    single = _one_process(template, vectors, params)
    assert merged.ntotal == single.ntotal == N
    assert fi.get_search_params(merged) == fi.get_search_params(single) == params
    s1, r1 = fi.search(merged, queries, 50)
    s2, r2 = fi.search(single, queries, 50)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(s1, s2)
    if n_shards == 3:  # and what build_index itself builds (the same seeded training)
        s3, r3 = fi.search(fi.build_index(vectors, factory, build_params={"seed": 0}, search_params=params), queries, 50)
        np.testing.assert_array_equal(r1, r3)


def test_every_row_keeps_its_global_id(data):
    vectors, _ = data
    index = sharded.build_sharded(vectors, "IVF32,PQ8x8,RFlat", n_shards=4, search_params={"nprobe": 32, "k_factor": 8})
    _, rows = fi.search(index, vectors[::97], 1)  # each row is its own nearest neighbour
    np.testing.assert_array_equal(rows[:, 0], np.arange(0, N, 97))


def test_ondisk_merge_equals_the_in_memory_merge(data, tmp_path):
    vectors, queries = data
    template = fi.train_index(vectors, "IVF32,PQ8x8", build_params={"seed": 0})
    bounds = sharded.shard_bounds(N, 3)
    shards = [sharded.fill_shard(template, vectors[a:b], a) for a, b in bounds]
    ondisk = sharded.merge_shards_ondisk(template, shards, tmp_path / "index.faiss", tmp_path / "lists.ivfdata")
    assert (tmp_path / "lists.ivfdata").stat().st_size > 0 and ondisk.ntotal == N
    fi.apply_search_params(ondisk, {"nprobe": 8})
    single = _one_process(template, vectors, {"nprobe": 8})
    np.testing.assert_array_equal(fi.search(ondisk, queries, 50)[1], fi.search(single, queries, 50)[1])


def test_bad_sharding_is_refused(data):
    vectors, _ = data
    with pytest.raises(ValueError, match="HNSW graph cannot be built in shards"):
        sharded.build_sharded(vectors, "HNSW16", n_shards=2)
    with pytest.raises(ValueError, match="n_shards must be a positive integer"):
        sharded.shard_bounds(10, 0)
    with pytest.raises(ValueError, match="11 shards for 10 vectors"):
        sharded.shard_bounds(10, 11)
    template = fi.train_index(vectors, "IVF32,Flat")
    with pytest.raises(ValueError, match="template index must be empty"):
        sharded.merge_shards(sharded.fill_shard(template, vectors[:10], 0), [])
    with pytest.raises(ValueError, match="on-disk merging is for unrefined IVF"):
        sharded.merge_shards_ondisk(fi.train_index(vectors, "IVF32,PQ8x8,RFlat"), [], "x", "y")
    assert sharded.shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
