"""The rebuild job with a real (tiny) trained model: gate, lock, crashes, fresh and removed items."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from indexer import faiss_index as fi
from indexer import store
from indexer.rebuild import RebuildConfig, RebuildInputError, RecallGateError, rebuild
from indexer.version import load_version, verify_version
from tests.indexer.conftest import root_snapshot


def cfg(models: Path, data: Path, out: Path, **kw) -> RebuildConfig:
    return RebuildConfig(model=models, data=data, out=out, progress=False, **kw)


def read_items_raw(data: Path) -> pd.DataFrame:
    return pd.read_csv(data / "items.csv", dtype=str, keep_default_na=False)


@pytest.fixture
def built_root(tmp_path: Path, tiny_bundle_path: Path, tiny_dataset: Path) -> Path:
    """An INDEX_ROOT with one good version as `current`."""
    root = tmp_path / "index"
    rebuild(cfg(tiny_bundle_path.parent, tiny_dataset, root))
    return root


def test_rebuild_writes_a_complete_current_version(tmp_path, tiny_bundle, tiny_bundle_path, tiny_dataset):
    root = tmp_path / "index"
    res = rebuild(cfg(tiny_bundle_path.parent, tiny_dataset, root))  # a models dir: newest bundle
    assert store.read_current(root) == res.path.resolve()
    m = verify_version(res.path)
    items = read_items_raw(tiny_dataset)
    assert m["model_version"] == tiny_bundle.version and m["count"] == len(items)
    assert m["index"]["factory"] == "Flat"  # auto for a 200-item catalog
    assert m["recall"]["value"] == 1.0 and m["dim"] == tiny_bundle.model.embedding_dim
    assert set(res.timings) >= {"load", "embed", "build", "gate", "write", "switch", "total"}
    loaded = load_version(root / "current")
    assert loaded.item_ids == items["item_id"].tolist()
    from training.dataset import read_items

    want = tiny_bundle.model.embed_items(read_items(tiny_dataset))
    np.testing.assert_allclose(np.asarray(loaded.embeddings), want, atol=1e-6)
    assert sorted(os.listdir(root / "current" / "model")) == sorted(os.listdir(tiny_bundle_path))

    # a second run switches to a new version and keeps the previous one; keep=1 prunes it
    res2 = rebuild(cfg(tiny_bundle_path, tiny_dataset, root))
    assert res2.path != res.path and store.read_current(root) == res2.path.resolve()
    assert [p.name for p in store.list_versions(root)] == [res.path.name, res2.path.name]
    res3 = rebuild(cfg(tiny_bundle_path, tiny_dataset, root, keep=1))
    assert [p.name for p in store.list_versions(root)] == [res3.path.name]
    assert {p.name for p in res3.pruned} == {res.path.name, res2.path.name}


def test_hnsw_rebuild_tunes_search_params_and_records_recall(tmp_path, tiny_bundle_path, tiny_dataset):
    root = tmp_path / "index"
    res = rebuild(cfg(tiny_bundle_path, tiny_dataset, root, index="HNSW8", gate_k=20, recall_gate=0.9))
    m = res.manifest
    assert m["index"]["factory"] == "HNSW8" and set(m["index"]["search_params"]) == {"efSearch"}
    rec = m["recall"]
    assert rec["k"] == 20 and rec["queries"] == "users" and rec["n_queries"] > 0 and rec["value"] >= 0.9
    loaded = load_version(res.path)
    assert fi.get_search_params(loaded.index) == m["index"]["search_params"]


def test_recall_gate_failure_leaves_current_untouched(built_root, tiny_bundle_path, tiny_dataset):
    before = root_snapshot(built_root)
    versions = store.list_versions(built_root)
    with pytest.raises(RecallGateError, match=r"recall@100 = 0\.\d+ < 0.999") as e:
        rebuild(cfg(tiny_bundle_path, tiny_dataset, built_root, index="IVF16,Flat", nprobe=1, recall_gate=0.999))
    assert e.value.recall["value"] < 0.999
    assert root_snapshot(built_root) == before
    assert store.list_versions(built_root) == versions
    assert not list(built_root.glob(".tmp-*"))


def test_fresh_items_are_embedded_from_features_and_removed_items_disappear(tmp_path, tiny_bundle, tiny_bundle_path, dataset_copy):
    items = read_items_raw(dataset_copy)
    removed = items["item_id"].iloc[:5].tolist()
    fresh = items.iloc[[10, 11, 12]].copy()
    fresh["item_id"] = ["fresh-a", "fresh-b", "fresh-c"]
    pd.concat([items.iloc[5:], fresh]).to_csv(dataset_copy / "items.csv", index=False)

    res = rebuild(cfg(tiny_bundle_path, dataset_copy, tmp_path / "index"))
    loaded = load_version(res.path)
    assert len(loaded.item_ids) == len(items) - 5 + 3
    assert not set(removed) & set(loaded.item_ids)
    vocab = set(tiny_bundle.model.item_encoder.ids.tokens)
    assert "fresh-a" not in vocab
    assert res.manifest["catalog"]["fresh_items"] == sum(i not in vocab for i in loaded.item_ids)

    emb = np.asarray(loaded.embeddings)
    row = loaded.item_ids.index("fresh-a")
    # the vector comes from the features alone: any other unseen id with the same features
    # gets the very same vector
    same_features = fresh.iloc[[0]].assign(item_id="never-seen-id")
    np.testing.assert_allclose(emb[row], tiny_bundle.model.embed_items(same_features)[0], atol=1e-6)
    assert not np.allclose(emb[row], emb[loaded.item_ids.index(items["item_id"].iloc[10])], atol=1e-3)

    retr = loaded.topk
    for fid in ("fresh-a", "fresh-b", "fresh-c"):
        scores, ids = retr.search(emb[loaded.item_ids.index(fid)], 1)
        assert ids[0, 0] == fid and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    user = tiny_bundle.model.embed_users([{"user_id": "u1", "features": {}}])
    _, everything = retr.search(user, 10_000)
    assert set(everything[0]) == set(loaded.item_ids) and "fresh-b" in everything[0]


def test_second_rebuild_fails_fast_while_locked(built_root, tiny_bundle_path, tiny_dataset):
    before = root_snapshot(built_root)
    with store.locked(built_root):
        t0 = time.monotonic()
        with pytest.raises(store.LockHeldError, match="held by another indexer run"):
            rebuild(cfg(tiny_bundle_path, tiny_dataset, built_root))
        assert time.monotonic() - t0 < 2.0
    assert root_snapshot(built_root) == before


def test_bad_inputs_are_rebuild_input_errors(tmp_path, built_root, tiny_bundle_path, dataset_copy, monkeypatch):
    before = root_snapshot(built_root)
    with pytest.raises(RebuildInputError, match="no such directory"):
        rebuild(cfg(tmp_path / "nope", dataset_copy, built_root))
    with pytest.raises(RebuildInputError, match="invalid FAISS factory string 'HNSWxx'"):
        rebuild(cfg(tiny_bundle_path, dataset_copy, built_root, index="HNSWxx"))
    with pytest.raises(RebuildInputError, match="'nprobe' does not apply to a hnsw index"):
        rebuild(cfg(tiny_bundle_path, dataset_copy, built_root, index="HNSW8", nprobe=3))
    with pytest.raises(RebuildInputError, match="recall-gate"):
        rebuild(cfg(tiny_bundle_path, dataset_copy, built_root, recall_gate=1.5))

    from training.model import TwoTowerModel

    real = TwoTowerModel.embed_items
    monkeypatch.setattr(TwoTowerModel, "embed_items", lambda self, df: real(self, df) * 1.5)
    with pytest.raises(RebuildInputError, match="must be L2-normalized"):
        rebuild(cfg(tiny_bundle_path, dataset_copy, built_root))
    monkeypatch.setattr(TwoTowerModel, "embed_items", lambda self, df: real(self, df) * np.nan)
    with pytest.raises(RebuildInputError, match="non-finite"):
        rebuild(cfg(tiny_bundle_path, dataset_copy, built_root))
    monkeypatch.undo()

    items = read_items_raw(dataset_copy)
    items.drop(columns=["price"]).to_csv(dataset_copy / "items.csv", index=False)
    with pytest.raises(RebuildInputError, match=r"price"):
        rebuild(cfg(tiny_bundle_path, dataset_copy, built_root))
    assert root_snapshot(built_root) == before and not list(built_root.glob(".tmp-*"))


# ---- crash safety: real processes, real SIGKILL -----------------------------------------------


def _rebuild_cmd(models: Path, data: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "indexer.cli", "rebuild", "--model", str(models), "--data", str(data),
            "--out", str(root), "--no-progress", "-q", *extra]


def _env(hook: str, marker: Path) -> dict[str, str]:
    return {**os.environ, "INDEXER_TEST_HOOK": hook, "INDEXER_TEST_HOOK_FILE": str(marker), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("stage", ["embedded", "write:model", "write:embeddings", "write:manifest", "renamed", "switched"])
def test_sigkill_at_any_stage_keeps_current_and_next_run_cleans_up(stage, tmp_path, built_root, tiny_bundle_path, tiny_dataset):
    before = root_snapshot(built_root)
    old_versions = {p.name for p in store.list_versions(built_root)}
    marker = tmp_path / "marker"
    proc = subprocess.run(_rebuild_cmd(tiny_bundle_path, tiny_dataset, built_root, "--index", "HNSW8", "--gate-k", "10"),
                          env=_env(f"kill:{stage}", marker), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert marker.read_text().startswith(stage)

    new_versions = {p.name for p in store.list_versions(built_root)} - old_versions
    tmp_dirs = list(built_root.glob(".tmp-*"))
    if stage.startswith("write:"):
        assert tmp_dirs and not new_versions  # killed mid-write: only a temp dir
    if stage in ("renamed", "switched"):
        assert len(new_versions) == 1  # complete, verified, renamed
        verify_version(built_root / new_versions.pop())
    if stage == "switched":
        assert store.read_current(built_root).name != before[0]
        verify_version(store.read_current(built_root))
    else:
        assert root_snapshot(built_root) == before  # pointer and every byte it serves

    res = rebuild(cfg(tiny_bundle_path, tiny_dataset, built_root))  # the lock died with the process
    assert not list(built_root.glob(".tmp-*"))
    assert {p.name for p in res.cleaned} == {p.name for p in tmp_dirs}
    assert store.read_current(built_root) == res.path.resolve()
    verify_version(res.path)


def test_external_sigkill_while_paused_and_lock_contention(tmp_path, built_root, tiny_bundle_path, tiny_dataset):
    """A rebuild paused mid-write holds the lock: a second one exits 3 at once with one stderr
    line; SIGKILL from outside then leaves `current` intact and the lock free."""
    before = root_snapshot(built_root)
    marker = tmp_path / "marker"
    first = subprocess.Popen(_rebuild_cmd(tiny_bundle_path, tiny_dataset, built_root),
                             env=_env("pause:write:embeddings", marker), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "first rebuild never reached the pause point"
            time.sleep(0.05)
        t0 = time.monotonic()
        second = subprocess.run(_rebuild_cmd(tiny_bundle_path, tiny_dataset, built_root),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 3
        assert second.stderr.count("\n") == 1 and "held by another indexer run" in second.stderr
        assert time.monotonic() - t0 < 30
        assert list(built_root.glob(".tmp-*"))  # the first run's half-written version
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert first.returncode == -signal.SIGKILL
    assert root_snapshot(built_root) == before
    res = rebuild(cfg(tiny_bundle_path, tiny_dataset, built_root))
    assert res.cleaned and not list(built_root.glob(".tmp-*"))


# ---- the service's acceptance check runs before the switch ---------------------------------


@pytest.mark.parametrize("factory", ["HNSW16,SQ8", "IVF4,PQ4x4"])
def test_quantized_index_is_published_and_accepted_by_the_service(factory, tmp_path, tiny_bundle_path, tiny_dataset):
    """Lossy indexes (suggested by --help and docs/nightly.md) pass the shared acceptance check."""
    root = tmp_path / "index"
    res = rebuild(cfg(tiny_bundle_path, tiny_dataset, root, index=factory, recall_gate=0.5, nprobe=4 if "IVF" in factory else None))
    assert store.read_current(root) == res.path.resolve()
    assert load_version(res.path).index_version == res.path.name


def test_a_version_the_service_refuses_is_never_published(built_root, tiny_bundle_path, tiny_dataset, monkeypatch):
    import indexer.version
    from indexer.rebuild import ServingCheckError

    def refuse(version):  # noqa: ANN001, ANN202
        raise indexer.version.IndexVersionError("index scores disagree with embeddings.npy")

    before = root_snapshot(built_root)
    versions = store.list_versions(built_root)
    monkeypatch.setattr(indexer.version, "_smoke_test", refuse)
    with pytest.raises(ServingCheckError, match="the service would refuse the new version .*index scores disagree") as e:
        rebuild(cfg(tiny_bundle_path, tiny_dataset, built_root))
    assert isinstance(e.value, store.IndexVersionError)  # exit 5 from the CLI
    assert root_snapshot(built_root) == before
    assert store.list_versions(built_root) == versions and not list(built_root.glob(".tmp-*"))


def _edited_bundle(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001 - edit(name, obj) edits a JSON file in place
    """A copy of bundle `src` with JSON files edited and its manifest checksums redone."""
    import hashlib
    import json
    import shutil

    shutil.copytree(src, dst)
    for name in ("features.json", "manifest.json"):
        obj = json.loads((dst / name).read_text())
        edit(name, obj)
        if name == "manifest.json":
            obj["files"] = {f: hashlib.sha256((dst / f).read_bytes()).hexdigest() for f in obj["files"]}
        (dst / name).write_text(json.dumps(obj))
    return dst


def _nan_stats(name: str, obj: dict) -> None:
    if name == "features.json":
        stats = obj["user"]["stats"]["age"]
        stats.update({k: float("nan") for k, v in stats.items() if isinstance(v, float)})


def _wrong_manifest_dim(name: str, obj: dict) -> None:
    if name == "manifest.json":
        obj["embedding_dim"] = 32


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_nan_stats, r"user tower unusable: features\.age: must be a finite number"),
        (_wrong_manifest_dim, r"manifest\.json: embedding_dim 32, but config\.json's model has embedding_dim 16"),
    ],
)
def test_bundles_the_service_would_refuse_fail_before_any_work(edit, message, tmp_path, built_root, tiny_bundle_path, tiny_dataset):
    bad = _edited_bundle(tiny_bundle_path, tmp_path / "bad_bundle", edit)
    before = root_snapshot(built_root)
    with pytest.raises(RebuildInputError, match=message) as e:
        rebuild(cfg(bad, tiny_dataset, built_root))
    assert str(bad) in str(e.value) and ".tmp-" not in str(e.value)
    assert root_snapshot(built_root) == before and not list(built_root.glob(".tmp-*"))


# ---- item attributes ------------------------------------------------------------------------------


def _with_attributes(data: Path, cells: pd.DataFrame) -> None:
    """Declare the oracle's four attributes and put its cells into items.csv (row order kept)."""
    import json

    from tests.indexer.attribute_oracle import SCHEMA_ATTRIBUTES

    items = read_items_raw(data)
    for col in SCHEMA_ATTRIBUTES:
        items[col] = cells[col].to_numpy()
    items.to_csv(data / "items.csv", index=False)
    schema = json.loads((data / "schema.json").read_text())
    schema["item"]["attributes"] = SCHEMA_ATTRIBUTES
    (data / "schema.json").write_text(json.dumps(schema))


def test_rebuild_stores_the_attributes_and_the_service_loads_them(tmp_path, tiny_bundle_path, dataset_copy):
    from indexer.attributes import parse_filter
    from tests.indexer.attribute_oracle import CONDITIONS, oracle_mask, random_items

    cells = random_items(len(read_items_raw(dataset_copy)), seed=5)
    _with_attributes(dataset_copy, cells)
    root = tmp_path / "index"
    result = rebuild(cfg(tiny_bundle_path, dataset_copy, root))
    manifest = verify_version(result.path)
    assert set(manifest["attributes"]) == {"color", "labels", "cost", "in_stock"}
    assert {f for f in manifest["files"] if f.startswith("attributes/")} == {
        p.relative_to(result.path).as_posix() for p in (result.path / "attributes").iterdir()
    }
    version = load_version(root / "current")
    assert version.attributes is not None
    for name, conds in CONDITIONS.items():
        for cond in conds:
            got = version.attributes.allowed(parse_filter({name: cond})).mask
            np.testing.assert_array_equal(got, oracle_mask(cells, {name: cond}))


def test_a_corrupt_or_missing_attribute_file_is_refused(tmp_path, tiny_bundle_path, dataset_copy):
    from indexer.version import IndexVersionError
    from tests.indexer.attribute_oracle import random_items

    _with_attributes(dataset_copy, random_items(len(read_items_raw(dataset_copy)), seed=5))
    path = rebuild(cfg(tiny_bundle_path, dataset_copy, tmp_path / "index")).path
    codes = path / "attributes" / "0.codes.npy"
    data = codes.read_bytes()
    codes.write_bytes(data[:-4] + b"\x7f\x7f\x7f\x7f")
    with pytest.raises(IndexVersionError, match="attributes/0.codes.npy sha256 mismatch"):
        verify_version(path)
    codes.unlink()
    with pytest.raises(IndexVersionError, match="attributes/0.codes.npy is missing"):
        verify_version(path)


def test_a_bad_attribute_value_fails_the_rebuild_naming_line_and_column(built_root, tiny_bundle_path, dataset_copy):
    from tests.indexer.attribute_oracle import random_items

    cells = random_items(len(read_items_raw(dataset_copy)), seed=5)
    cells.loc[9, "in_stock"] = "maybe"
    _with_attributes(dataset_copy, cells)
    before = root_snapshot(built_root)
    with pytest.raises(RebuildInputError, match="items.csv: line 11, column 'in_stock': 'maybe' is not a bool"):
        rebuild(cfg(tiny_bundle_path, dataset_copy, built_root))
    assert root_snapshot(built_root) == before
