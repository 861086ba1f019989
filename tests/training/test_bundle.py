"""Bundles: save→load round trip, tamper detection, newest-bundle lookup, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.artifacts import sha256_file
from training.bundle import Bundle, BundleError, find_bundle, load_bundle, verify_bundle


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
