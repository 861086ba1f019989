"""Towers: unit-norm outputs, OOV paths, id dropout, and the table/record paths agree."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from training.bundle import Bundle
from training.features import FeatureError


def test_item_vectors_are_unit_and_deterministic(tiny_bundle: Bundle, tiny_dataset) -> None:
    items = pd.read_csv(tiny_dataset / "items.csv", dtype=str, keep_default_na=False)
    a = tiny_bundle.model.embed_items(items)
    b = tiny_bundle.model.embed_items(items, batch_size=7)
    assert a.shape == (200, tiny_bundle.model.embedding_dim) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_user_paths_agree_and_oov_works(tiny_bundle: Bundle, tiny_dataset) -> None:
    users = pd.read_csv(tiny_dataset / "users.csv", dtype=str, keep_default_na=False).head(5)
    m = tiny_bundle.model
    table = m.embed_user_table(users["user_id"].tolist(), users)
    records = []
    for _, r in users.iterrows():
        feats = {"country": r.country, "device": r.device, "interests": r.interests}
        if r.age:
            feats["age"] = float(r.age)
        records.append({"user_id": r.user_id, "features": feats})
    np.testing.assert_allclose(m.embed_users(records), table, atol=1e-5)
    unknown = m.embed_users([{"user_id": "never-seen", "features": {}}, {"features": {"country": "mars"}}])
    assert np.isfinite(unknown).all()
    np.testing.assert_allclose(np.linalg.norm(unknown, axis=1), 1.0, atol=1e-5)


def test_unknown_feature_is_a_feature_error(tiny_bundle: Bundle) -> None:
    with pytest.raises(FeatureError) as e:
        tiny_bundle.model.embed_users([{"user_id": "u1", "features": {"shoe_size": 42}}])
    assert e.value.field == "features.shoe_size"


def test_id_dropout_only_in_training(tiny_bundle: Bundle) -> None:
    tower = tiny_bundle.model.user_tower
    batch = {k: torch.from_numpy(v) for k, v in tiny_bundle.model.user_encoder.encode_records(
        [{"user_id": tiny_bundle.model.user_encoder.ids.tokens[0], "features": {}}] * 64).items()}
    tower.eval()
    ev = tower(batch)
    assert torch.allclose(ev, ev[0].expand_as(ev))  # eval: deterministic, no dropout
    tower.train()
    try:
        torch.manual_seed(0)
        tower.id_dropout = 0.5
        tr = tower(batch)
        distinct = {tuple(r.round(decimals=5).tolist()) for r in tr}
        assert len(distinct) == 2  # some rows kept their id, some fell back to OOV
    finally:
        tower.id_dropout = tiny_bundle.model.cfg.user_id_dropout
        tower.eval()
