"""Bundles: save→load round trip, tamper detection, newest-bundle lookup, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.artifacts import remove_stale_temps, sha256_file
from training.bundle import (
    STALE_TEMP_AGE_S,
    Bundle,
    BundleError,
    find_bundle,
    load_bundle,
    save_bundle,
    verify_bundle,
)


def test_manifest_contents(tiny_bundle: Bundle) -> None:
    m = tiny_bundle.manifest
    assert m["format"] == "twotower-bundle/1"
    assert m["version"] == tiny_bundle.path.name
    assert set(m["files"]) == {"model.safetensors", "config.json", "features.json", "item_counts.json"}
    for name, digest in m["files"].items():
        assert sha256_file(tiny_bundle.path / name) == digest
    assert len(m["data_fingerprint"]) == 64 and m["full"] is False
    assert {"recall@20", "cold_recall@20", "tail_recall@100"} <= set(m["metrics"])
    cfg = json.loads((tiny_bundle.path / "config.json").read_text())
    assert cfg["model"]["embedding_dim"] == 16 and "item" in cfg["schema"]


def test_round_trip_gives_identical_vectors(tiny_bundle: Bundle, tiny_dataset: Path) -> None:
    again = load_bundle(tiny_bundle.path)
    items = pd.read_csv(tiny_dataset / "items.csv", dtype=str, keep_default_na=False)
    np.testing.assert_array_equal(tiny_bundle.model.embed_items(items), again.model.embed_items(items))
    rec = [{"user_id": "u3", "features": {"age": 30, "country": "k1"}}]
    np.testing.assert_array_equal(tiny_bundle.model.embed_users(rec), again.model.embed_users(rec))


def test_no_pickles_in_bundle(tiny_bundle: Bundle) -> None:
    assert not [p for p in tiny_bundle.path.iterdir() if p.suffix in (".pt", ".pth", ".pkl", ".bin")]
    assert (tiny_bundle.path / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors header


@pytest.mark.parametrize("victim", ["model.safetensors", "features.json", "config.json"])
def test_tampering_detected(tiny_bundle: Bundle, tmp_path: Path, victim: str) -> None:
    copy = tmp_path / tiny_bundle.path.name
    shutil.copytree(tiny_bundle.path, copy)
    with open(copy / victim, "r+b") as f:
        f.seek(20)
        f.write(b"\x00")
    with pytest.raises(BundleError, match=f"{victim}: sha256 mismatch"):
        verify_bundle(copy)
    (copy / victim).unlink()
    with pytest.raises(BundleError, match=f"{victim}: missing"):
        load_bundle(copy)


def test_find_bundle_takes_newest_and_ignores_temps(tiny_bundle: Bundle, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ["20250101T000000000Z-aaaaaa", "20260101T000000000Z-bbbbbb"]:
        shutil.copytree(tiny_bundle.path, models / name)
    (models / ".tmp-20270101T000000000Z-cccccc").mkdir()  # a crashed writer's leftover
    assert find_bundle(models).name == "20260101T000000000Z-bbbbbb"
    assert find_bundle(models / "20250101T000000000Z-aaaaaa").name.startswith("2025")
    with pytest.raises(BundleError, match="contains no model bundle"):
        find_bundle(tmp_path / "models" / ".tmp-20270101T000000000Z-cccccc")


def _rehash(bundle: Path) -> None:
    """Re-sign the manifest after an edit, as a buggy or foreign writer would: the checksums pass."""
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"] = {name: sha256_file(bundle / name) for name in m["files"]}
    (bundle / "manifest.json").write_text(json.dumps(m))


def _edit_json(name: str, edit):  # noqa: ANN001, ANN202
    def apply(bundle: Path) -> None:
        obj = json.loads((bundle / name).read_text())
        (bundle / name).write_text(json.dumps(edit(obj)))
    return apply


def _write(name: str, data: bytes):  # noqa: ANN202
    return lambda bundle: (bundle / name).write_bytes(data)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_write("model.safetensors", b""), "model.safetensors is unreadable"),
        (_write("model.safetensors", b"\xff" * 64), "model.safetensors is unreadable"),
        (_write("config.json", b'{"model": {"embed'), "config.json is unreadable"),
        (_write("config.json", b"[1, 2]"), "config.json must hold a JSON object"),
        (_write("features.json", b"\xe9t\xe9"), "features.json is unreadable"),
        (_edit_json("config.json", lambda c: {k: v for k, v in c.items() if k != "model"}), "config.json: bad or missing 'model'"),
        (_edit_json("config.json", lambda c: c | {"model": c["model"] | {"hidden": [7]}}), r"does not match config.json: .*size mismatch"),
        (_edit_json("features.json", lambda f: {"item": f["item"]}), "features.json: bad or missing tower encoder"),
    ],
)
def test_a_damaged_bundle_with_valid_checksums_names_the_file(tiny_bundle: Bundle, tmp_path: Path, damage, message: str) -> None:  # noqa: ANN001
    copy = tmp_path / tiny_bundle.path.name
    shutil.copytree(tiny_bundle.path, copy)
    damage(copy)
    _rehash(copy)
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(copy)
    assert str(copy) in str(err.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m | {"files": sorted(m["files"])}, "'files' must map file names"),
        (lambda m: {k: v for k, v in m.items() if k != "version"}, "no 'version'"),
    ],
)
def test_a_malformed_manifest_is_a_bundle_error(tiny_bundle: Bundle, tmp_path: Path, edit, message: str) -> None:  # noqa: ANN001
    copy = tmp_path / tiny_bundle.path.name
    shutil.copytree(tiny_bundle.path, copy)
    _edit_json("manifest.json", edit)(copy)
    with pytest.raises(BundleError, match=message):
        verify_bundle(copy)


def test_saving_leaves_another_writers_fresh_temp_alone(tiny_bundle: Bundle, tmp_path: Path) -> None:
    """Two fits saving into one models directory: the second must not delete the temp directory
    the first is still writing, but a crash's leftover from hours ago goes."""
    models = tmp_path / "models"
    fresh, stale = models / ".tmp-20260101T000000000Z-aaaaaa.x1", models / ".tmp-20250101T000000000Z-bbbbbb.x2"
    for d in (fresh, stale):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    old = time.time() - 2 * STALE_TEMP_AGE_S
    os.utime(stale / "model.safetensors", (old, old))
    os.utime(stale, (old, old))
    m = tiny_bundle.manifest
    save_bundle(
        tiny_bundle.model, models, train_config={}, schema={}, item_counts={}, data_fingerprint=m["data_fingerprint"],
        metrics={}, full=False,
    )
    assert fresh.is_dir() and (fresh / "model.safetensors").read_bytes() == b"partial"
    assert not stale.exists()
    assert remove_stale_temps(models) == [fresh]  # without an age (a locked writer): everything goes
