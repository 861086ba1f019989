"""Version directories, the `current` pointer, verification, retention, rollback, the lock."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from indexer import faiss_index as fi
from indexer import store
from indexer.itemids import COLUMN_FILES
from indexer.version import load_version, verify_version
from tests.indexer.conftest import root_snapshot, tree_digest, unit_rows, write_test_version
from training.artifacts import remove_stale_temps


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "index"


def test_write_verify_load_roundtrip(root, tiny_bundle_path, tiny_bundle):
    path = write_test_version(root, tiny_bundle_path, n=40, factory="HNSW16")
    assert path.parent == root and not list(root.glob(".tmp-*"))
    m = verify_version(path)
    assert m["format"] == "twotower-index/1" and m["index_version"] == path.name
    assert m["model_version"] == tiny_bundle.version and m["count"] == 40 and m["dim"] == tiny_bundle.model.embedding_dim
    bundle_files = {f"model/{p.name}" for p in tiny_bundle_path.iterdir() if p.is_file()}
    assert set(m["files"]) == {"index.faiss", "embeddings.npy", "item_ids.txt", *COLUMN_FILES, *bundle_files}
    assert store.read_current(root) is None  # writing never switches

    store.switch_current(root, path.name)
    loaded = load_version(root / "current")
    assert loaded.path == path.resolve()  # resolved once: immune to a later switch
    assert loaded.index_version == path.name and loaded.model_version == tiny_bundle.version
    assert loaded.item_ids == [f"it0-{i}" for i in range(40)]
    assert loaded.bundle.version == tiny_bundle.version
    assert fi.get_search_params(loaded.index) == m["index"]["search_params"]
    np.testing.assert_array_equal(np.asarray(loaded.embeddings), unit_rows(40, m["dim"], 0))
    _, ids = loaded.topk.search(np.asarray(loaded.embeddings[:3]), 1)
    assert ids[:, 0].tolist() == ["it0-0", "it0-1", "it0-2"]


def test_switch_is_atomic_for_concurrent_readers(root, tiny_bundle_path):
    a = write_test_version(root, tiny_bundle_path, seed=1)
    b = write_test_version(root, tiny_bundle_path, seed=2)
    store.switch_current(root, a.name)
    seen, errors, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.add(store.read_current(root).name)
            except Exception as e:  # noqa: BLE001 - any failure is the bug we look for
                errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        store.switch_current(root, (a if i % 2 else b).name)
    stop.set()
    t.join()
    assert not errors and seen == {a.name, b.name}
    assert os.readlink(root / "current") == a.name  # relative link
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_read_current_errors(root, tiny_bundle_path):
    assert store.read_current(root) is None
    root.mkdir(parents=True)
    os.symlink("no-such-version", root / "current")
    with pytest.raises(store.IndexVersionError, match="does not exist"):
        store.read_current(root)
    (root / "current").unlink()
    os.symlink("/etc", root / "current")
    with pytest.raises(store.IndexVersionError, match="expected a version directory name"):
        store.read_current(root)
    (root / "current").unlink()
    (root / "current").mkdir()
    with pytest.raises(store.IndexVersionError, match="not a symlink"):
        store.read_current(root)
    with pytest.raises(store.VersionNotFoundError):
        store.switch_current(root, "../x")


@pytest.mark.parametrize(
    "damage",
    ["flip_embeddings", "flip_index", "flip_model_weights", "edit_item_ids", "extra_file", "missing_file",
     "model_version_mismatch", "count_mismatch", "truncate_index"],
)
def test_verify_detects_corruption(root, tiny_bundle_path, damage):
    path = write_test_version(root, tiny_bundle_path)
    verify_version(path)

    def flip(rel: str, offset: int = -5):
        p = path / rel
        data = bytearray(p.read_bytes())
        data[offset] ^= 0xFF
        p.write_bytes(bytes(data))

    def edit_manifest(**kw):
        m = json.loads((path / "manifest.json").read_text())
        m.update(kw)
        (path / "manifest.json").write_text(json.dumps(m))

    expect = {
        "flip_embeddings": "embeddings.npy sha256 mismatch",
        "flip_index": "index.faiss sha256 mismatch",
        "flip_model_weights": "model/model.safetensors sha256 mismatch",
        "edit_item_ids": "item_ids.txt sha256 mismatch",
        "extra_file": r"unlisted file\(s\) \['stray.bin'\]",
        "missing_file": "item_ids.txt is missing",
        "model_version_mismatch": "model/ is version",
        "count_mismatch": "float32",
        "truncate_index": "index.faiss sha256 mismatch",
    }[damage]
    if damage == "flip_embeddings":
        flip("embeddings.npy")
    elif damage == "flip_index":
        flip("index.faiss", 200)
    elif damage == "flip_model_weights":
        flip("model/model.safetensors")
    elif damage == "edit_item_ids":
        (path / "item_ids.txt").write_text((path / "item_ids.txt").read_text().replace("it0-7\n", "it0-X\n"))
    elif damage == "extra_file":
        (path / "stray.bin").write_bytes(b"x")
    elif damage == "missing_file":
        (path / "item_ids.txt").unlink()
    elif damage == "model_version_mismatch":
        edit_manifest(model_version="20000101T000000000Z-000000")
    elif damage == "count_mismatch":
        edit_manifest(count=51)
    elif damage == "truncate_index":
        p = path / "index.faiss"
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(store.IndexVersionError, match=expect):
        verify_version(path)
    with pytest.raises(store.IndexVersionError):
        load_version(path)


def test_verify_without_hashes_still_reads_back_consistency(root, tiny_bundle_path):
    """The pre-rename check (no data hashes) still catches a wrong shape or id count."""
    path = write_test_version(root, tiny_bundle_path)
    (path / "item_ids.txt").write_text("a\nb\n")
    with pytest.raises(store.IndexVersionError, match="item_ids.txt has 2 ids, manifest count is 50"):
        verify_version(path, check_hashes=False)


def test_write_version_refuses_bad_input_and_leaves_nothing(root, tiny_bundle_path, tiny_bundle):
    d = tiny_bundle.model.embedding_dim
    v = unit_rows(3, d)
    index = fi.build_index(v, "Flat")
    kw = dict(index=index, embeddings=v, bundle_path=tiny_bundle_path, model_version=tiny_bundle.version,
              index_info={"factory": "Flat", "search_params": {}}, recall=None)
    with pytest.raises(ValueError, match="line break"):
        store.write_version(root, store.new_version_name(), item_ids=["a", "b\nc", "d"], **kw)
    with pytest.raises(ValueError, match="2 item ids for 3 embedding rows"):
        store.write_version(root, store.new_version_name(), item_ids=["a", "b"], **kw)
    with pytest.raises(store.VersionNotFoundError):
        store.write_version(root, "../evil", item_ids=["a", "b", "c"], **kw)
    ok = store.write_version(root, store.new_version_name(), item_ids=["a", "b", "c"], **kw)
    with pytest.raises(store.IndexVersionError, match="never overwritten"):
        store.write_version(root, ok.name, item_ids=["a", "b", "c"], **kw)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".lock")) == [ok.name]


def test_failure_inside_write_removes_temp_dir(root, tiny_bundle_path, tiny_bundle):
    v = unit_rows(3, tiny_bundle.model.embedding_dim)

    def boom(stage: str) -> None:
        if stage == "write:embeddings":
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.write_version(root, store.new_version_name(), index=fi.build_index(v, "Flat"), embeddings=v,
                            item_ids=["a", "b", "c"], bundle_path=tiny_bundle_path, model_version=tiny_bundle.version,
                            index_info={"factory": "Flat", "search_params": {}}, recall=None, checkpoint=boom)
    assert list(root.iterdir()) == []


def test_list_prune_and_stale_tmp(root, tiny_bundle_path):
    versions = [write_test_version(root, tiny_bundle_path, seed=i) for i in range(4)]
    (root / ".tmp-20990101T000000000Z-abcdef").mkdir()
    (root / ".tmp-current-1234").symlink_to(versions[0].name)
    (root / "notes.txt").write_text("not a version")
    assert [p.name for p in store.list_versions(root)] == sorted(p.name for p in versions)
    store.switch_current(root, versions[0].name)  # an old version is current (after a rollback)
    snap = root_snapshot(root)
    with store.locked(root):
        removed = remove_stale_temps(root)
        pruned = store.prune(root, keep=2)
    assert {p.name for p in removed} == {".tmp-20990101T000000000Z-abcdef", ".tmp-current-1234"}
    assert [p.name for p in pruned] == [versions[1].name]
    assert [p.name for p in store.list_versions(root)] == [versions[0].name, versions[2].name, versions[3].name]
    assert root_snapshot(root) == snap
    with pytest.raises(ValueError, match="keep must be >= 1"):
        store.prune(root, 0)


def test_rollback(root, tiny_bundle_path):
    a, b, c = (write_test_version(root, tiny_bundle_path, seed=i) for i in range(3))
    with pytest.raises(store.VersionNotFoundError, match="no current index version"):
        store.rollback(root)
    store.switch_current(root, c.name)
    assert store.rollback(root) == b.resolve() and store.read_current(root) == b.resolve()
    assert store.rollback(root) == a.resolve()
    with pytest.raises(store.VersionNotFoundError, match="no version older than the current"):
        store.rollback(root)
    assert store.rollback(root, c.name) == c.resolve()
    with pytest.raises(store.VersionNotFoundError, match="no index version 'nope'"):
        store.rollback(root, "nope")
    # a corrupt target is refused and current stays
    emb = b / "embeddings.npy"
    emb.write_bytes(emb.read_bytes()[:-4] + b"\0\0\0\0")
    snap = root_snapshot(root)
    with pytest.raises(store.IndexVersionError, match="sha256 mismatch"):
        store.rollback(root, b.name)
    assert root_snapshot(root) == snap and snap[0] == c.name


def test_lock_is_exclusive_and_fails_fast(root):
    with store.locked(root):
        t0 = time.monotonic()
        with pytest.raises(store.LockHeldError, match=r"held by another indexer run \(pid \d+\)"), store.locked(root):
            pass
        assert time.monotonic() - t0 < 1.0
    with store.locked(root):  # released on exit
        pass


def test_tree_digest_sees_changes(tmp_path):
    """The snapshot helper the crash tests rely on must notice a one-byte change."""
    (tmp_path / "a").write_bytes(b"x")
    before = tree_digest(tmp_path)
    (tmp_path / "a").write_bytes(b"y")
    assert tree_digest(tmp_path) != before
