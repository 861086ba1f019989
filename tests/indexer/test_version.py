"""Loading a version (indexer.version): the memory-mapped index answers exactly like the read
one, the id column is memory-mapped, and versions written before the column still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer import faiss_index as fi
from indexer import itemids as idc
from indexer import store
from indexer.topk import Query
from indexer.version import ID_COLUMN_KEY, IndexVersionError, load_version
from tests.indexer.conftest import clustered
from training.artifacts import file_hashes

N = 1200
FACTORIES = {  # every index family the service serves, plain and re-ranked
    "Flat": {},
    "HNSW16": {"efSearch": 64},
    "IVF16,Flat": {"nprobe": 4},
    "IVF16,SQ8": {"nprobe": 4},
    "IVF16,PQ8x8,Refine(SQfp16)": {"nprobe": 4, "k_factor": 4},
    "IVF16,PQ8x8,RFlat": {"nprobe": 4, "k_factor": 2},
}


def write(root: Path, bundle_path: Path, factory: str, params: dict, n: int = N) -> tuple[Path, np.ndarray]:
    from training.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    vectors = clustered(n + 20, bundle.model.embedding_dim, seed=3)
    index = fi.build_index(vectors[:n], factory, search_params=params)
    with store.locked(root):
        path = store.write_version(
            root, store.new_version_name(), index=index, embeddings=vectors[:n], item_ids=[f"it{i}" for i in range(n)],
            bundle_path=bundle.path, model_version=bundle.version,
            index_info={"factory": factory, "search_params": fi.get_search_params(index)}, recall=None,
        )
    return path, vectors[n:]


@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_mmap_load_answers_exactly_like_the_read_load(tmp_path, tiny_bundle_path, factory):
    path, queries = write(tmp_path / "index", tiny_bundle_path, factory, FACTORIES[factory])
    mapped, read = load_version(path), load_version(path, mmap_index=False)
    assert fi.get_search_params(mapped.index) == fi.get_search_params(read.index) == FACTORIES[factory]
    for k in (1, 10, 100):
        d_m, r_m = mapped.index.search(queries, k)
        d_r, r_r = read.index.search(queries, k)
        np.testing.assert_array_equal(r_m, r_r)
        np.testing.assert_array_equal(d_m, d_r)
        assert mapped.topk.top_k(queries, [Query(k)] * len(queries)) == read.topk.top_k(queries, [Query(k)] * len(queries))


def test_served_ids_are_the_mapped_column(tmp_path, tiny_bundle_path):
    path, queries = write(tmp_path / "index", tiny_bundle_path, "Flat", {})
    m = json.loads((path / "manifest.json").read_text())
    assert m[ID_COLUMN_KEY] == idc.COLUMN_FORMAT and set(idc.COLUMN_FILES) <= set(m["files"])
    v = load_version(path)
    assert isinstance(v.item_ids, idc.ItemIds) and isinstance(v.item_ids._blob, idc.mmap.mmap)
    assert v.item_ids == [f"it{i}" for i in range(N)]
    assert v.topk.rows.get("it77") == 77 and v.topk.rows.get("it-none") is None


def _strip_column(path: Path) -> None:
    """Make `path` a version as written before the id column: no ids/, no manifest key."""
    shutil.rmtree(path / idc.COLUMN_DIR)
    m = json.loads((path / "manifest.json").read_text())
    del m[ID_COLUMN_KEY]
    m["files"] = file_hashes(path, exclude=("manifest.json",))
    (path / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


def test_a_version_without_the_column_still_loads_the_same(tmp_path, tiny_bundle_path):
    path, queries = write(tmp_path / "index", tiny_bundle_path, "IVF16,Flat", FACTORIES["IVF16,Flat"])
    new = load_version(path)
    want = new.topk.top_k(queries, [Query(20, frozenset({"it5", "it6"}))] * len(queries))
    old_dir = tmp_path / "old" / path.name
    shutil.copytree(path, old_dir)
    _strip_column(old_dir)
    old = load_version(old_dir)
    assert not isinstance(old.item_ids._blob, idc.mmap.mmap)  # indexed in memory from item_ids.txt
    assert old.item_ids == new.item_ids and old.topk.rows.get("it77") == 77
    assert old.topk.top_k(queries, [Query(20, frozenset({"it5", "it6"}))] * len(queries)) == want


def test_a_listed_but_missing_column_is_refused(tmp_path, tiny_bundle_path):
    """The manifest says the version has the column: its files are required, like any data file."""
    path, _ = write(tmp_path / "index", tiny_bundle_path, "Flat", {}, n=30)
    m = json.loads((path / "manifest.json").read_text())
    (path / idc.COLUMN_FILES[1]).unlink()
    del m["files"][idc.COLUMN_FILES[1]]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexVersionError, match="manifest files lack.*ids/hashes.npy"):
        load_version(path)


def test_a_column_that_disagrees_with_item_ids_is_refused(tmp_path, tiny_bundle_path):
    path, _ = write(tmp_path / "index", tiny_bundle_path, "Flat", {}, n=30)
    rows = np.load(path / idc.COLUMN_FILES[2])
    np.save(path / idc.COLUMN_FILES[2], np.roll(rows, 1)[::-1].copy() * 0)  # every entry row 0
    m = json.loads((path / "manifest.json").read_text())
    m["files"] = file_hashes(path, exclude=("manifest.json",))  # re-listed: only the check can catch it
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexVersionError, match="rows.npy is not a permutation"):
        load_version(path)


def _mapped_kib(path: Path) -> int:
    """This process's resident KiB of the mappings of `path` (/proc/self/smaps)."""
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
                current = parts[5] if len(parts) > 5 else None
            elif parts and parts[0] == "Rss:" and current == str(path):
                total += int(parts[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("factory", ["IVF16,SQ8", "IVF16,PQ8x8,Refine(SQfp16)"])
def test_a_large_version_reads_its_rows_without_mapping_them(tmp_path, tiny_bundle_path, monkeypatch, factory):
    """Above PREAD_MIN_BYTES the load-time checks (the smoke test, the row alignment of a lossy
    index), the re-scoring and a /similar lookup read embeddings.npy rows with pread: none of its
    pages is mapped into the worker (at 10M items the smoke test alone mapped 560 MiB)."""
    import indexer.topk as topk_mod

    monkeypatch.setattr(topk_mod, "PREAD_MIN_BYTES", 0)
    path, queries = write(tmp_path / "index", tiny_bundle_path, factory, FACTORIES[factory])
    version = load_version(path)
    emb_file = (path / "embeddings.npy").resolve()
    assert isinstance(version.topk.rescore_rows, topk_mod.FileRows)
    assert _mapped_kib(emb_file) == 0, "the load mapped rows of embeddings.npy"
    got = version.topk.top_k(queries, [Query(10)] * len(queries))
    read = version.topk.vectors([3, 0])
    assert _mapped_kib(emb_file) == 0, "serving mapped rows of embeddings.npy"
    np.testing.assert_array_equal(read, np.asarray(version.embeddings[[3, 0]]))
    # and the answers are the ones the memory map gives
    monkeypatch.setattr(topk_mod, "PREAD_MIN_BYTES", 1 << 62)
    assert load_version(path).topk.top_k(queries, [Query(10)] * len(queries)) == got
