"""Shared fixtures: a tiny synthetic dataset and a tiny trained model, built once per session.

Tests must not modify these session-scoped artifacts; copy them (`shutil.copytree`) first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.bundle import Bundle, load_bundle
from training.config import ModelConfig, TrainConfig
from training.prepare import prepare_synthetic
from training.train import fit

SHARED = Path(os.environ.get("TWOTOWER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
ML100K = SHARED / "data" / "ml-100k"

TINY_SIZES = {"n_users": 300, "n_items": 200, "n_interactions": 6000, "seed": 1}


def tiny_train_config(**over) -> TrainConfig:
    """A config that trains in about a second: small widths, two epochs."""
    model = ModelConfig(embedding_dim=16, id_dim=16, feature_dim=8, hidden=[32])
    base = {"epochs": 2, "batch_size": 256, "eval_max_users": 200, "model": model}
    return TrainConfig(**(base | over))


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    if not (ML100K / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not available at {ML100K}")
    return ML100K


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic dataset directory (300 users, 200 items, 6000 clicks)."""
    return prepare_synthetic(tmp_path_factory.mktemp("data") / "tiny", **TINY_SIZES)


@pytest.fixture(scope="session")
def tiny_bundle_path(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model bundle trained on `tiny_dataset` (logQ on, the default objective)."""
    return fit(tiny_dataset, tmp_path_factory.mktemp("models"), tiny_train_config(), progress=False)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_path: Path) -> Bundle:
    return load_bundle(tiny_bundle_path)
