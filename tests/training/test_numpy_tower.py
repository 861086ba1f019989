"""The numpy user tower against the torch `Tower` it re-expresses (training/numpy_tower.py).

The request path embeds users with `NumpyTower`; `TwoTowerModel.embed_users` is the reference.
These tests hold the two together on every input type (ids known and unknown, categorical,
multi-categorical, continuous, missing values, extreme values) and on architectures other than
the default (several hidden layers, dropout layers, no hidden layer, the popularity input), so a
change to `Tower` that the fast path does not follow fails here, not in production.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from training.bundle import load_bundle, read_bundle_arrays
from training.config import HistoryConfig, ModelConfig
from training.features import TowerEncoder
from training.model import TwoTowerModel
from training.numpy_tower import (
    FAST_PATH_TOLERANCE,
    NumpyTower,
    TowerError,
    UserRecord,
    UserTower,
    model_weights,
    probe_records,
)
from training.schema import FeatureSpec

# The shared tiny dataset's user schema: age (continuous), country, device (categorical),
# interests (multi_categorical, "|").
FEATURES = {"age": 31, "country": "k1", "device": "ios", "interests": "t0|t3"}


def test_tower_gives_the_same_bits_alone_and_in_a_batch(tiny_bundle_path: Path) -> None:
    model = load_bundle(tiny_bundle_path).model
    tower = UserTower.from_model(model)
    records = [
        UserRecord("u1", tower.validate(FEATURES)),
        UserRecord(None, {}),
        UserRecord("nobody", tower.validate({"age": 1e6, "device": "web"})),
    ]
    alone = [tower.embed([r]) for r in records]
    batch = tower.embed(records)
    for i, row in enumerate(alone):
        assert row.shape == (1, tower.dim) and row.dtype == np.float32
        assert row.tobytes() == batch[i : i + 1].tobytes()
    reference = model.embed_users([{"user_id": r.user_id, "features": dict(r.features)} for r in records])
    np.testing.assert_allclose(batch, reference, atol=1e-5)
    assert tower.check_against(model) <= FAST_PATH_TOLERANCE


def test_the_tower_read_without_torch_is_the_torch_models(tiny_bundle_path: Path) -> None:
    """`read_bundle_arrays` (safetensors.numpy, the service's loader) gives the same tower, bit for bit."""
    arrays = read_bundle_arrays(tiny_bundle_path)
    model = load_bundle(tiny_bundle_path).model
    assert arrays.version == load_bundle(tiny_bundle_path).version
    assert set(arrays.weights) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert arrays.weights[k].dtype == np.float32 and np.array_equal(arrays.weights[k], v.numpy()), k
    numpy_only = UserTower(arrays.user_encoder, arrays.model_config, arrays.weights, arrays.item_encoder.ids)
    records = probe_records(arrays.user_encoder, arrays.item_encoder.ids) + [UserRecord("u1", numpy_only.validate(FEATURES))]
    assert numpy_only.embed(records).tobytes() == UserTower.from_model(model).embed(records).tobytes()


def _model(cfg: ModelConfig, popularity: bool = False, seed: int = 0) -> TwoTowerModel:
    """A randomly initialised model over a small user table with one feature of every type."""
    rng = np.random.default_rng(seed)
    n = 200
    users = pd.DataFrame({
        "user_id": [f"u{i}" for i in range(n)],
        "country": rng.choice(["de", "fr", "it", "es"], n),
        "tags": ["|".join(rng.choice(["a", "b", "c", "d", "e"], rng.integers(0, 4), replace=False)) for _ in range(n)],
        "age": [str(v) for v in rng.integers(16, 80, n)],
    })
    specs = {
        "country": FeatureSpec("country", "categorical"),
        "tags": FeatureSpec("tags", "multi_categorical", "|"),
        "age": FeatureSpec("age", "continuous"),
    }
    clicks = users["user_id"].repeat(3)
    user_enc = TowerEncoder.fit("user", specs, clicks, users, n_buckets=5, popularity=popularity)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(20)]})
    item_enc = TowerEncoder.fit("item", {}, items["item_id"], items)
    torch.manual_seed(seed)
    model = TwoTowerModel(cfg, user_enc, item_enc)
    with torch.no_grad():  # make the MLP biases and embeddings non-trivial
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    return model.eval()


ARCHITECTURES = {
    "default": ModelConfig(embedding_dim=16, id_dim=8, feature_dim=4, hidden=[32]),
    "deep": ModelConfig(embedding_dim=8, id_dim=8, feature_dim=4, hidden=[32, 16, 8]),
    "dropout": ModelConfig(embedding_dim=8, id_dim=4, feature_dim=4, hidden=[16, 16], dropout=0.3),
    "linear": ModelConfig(embedding_dim=8, id_dim=4, feature_dim=4, hidden=[]),
}


@pytest.mark.parametrize("popularity", [False, True])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_numpy_tower_equals_the_torch_tower(arch: str, popularity: bool) -> None:
    model = _model(ARCHITECTURES[arch], popularity=popularity)
    fast = NumpyTower(model.user_encoder, model.cfg, model_weights(model), "user_tower.")
    tower = UserTower.from_model(model)
    assert tower.check_against(model) <= FAST_PATH_TOLERANCE
    rng = np.random.default_rng(1)
    records = probe_records(model.user_encoder) + [
        UserRecord(
            rng.choice([None, "u3", "u150", "nobody"]),
            tower.validate({
                k: v for k, v in {
                    "country": rng.choice(["de", "fr", "xx"]),
                    "tags": list(rng.choice(["a", "b", "zz"], rng.integers(0, 3))),
                    "age": float(rng.normal(40, 30)),
                }.items() if rng.random() < 0.8
            }),
        )
        for _ in range(50)
    ]
    got = np.stack([fast.embed_one(r) for r in records])
    want = model.embed_users([{"user_id": r.user_id, "features": dict(r.features)} for r in records])
    assert np.abs(got - want).max() <= FAST_PATH_TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_weights_outside_the_layout_are_refused() -> None:
    """A tower with a layer the numpy path does not know cannot be served by it silently."""
    model = _model(ARCHITECTURES["default"])
    weights = model_weights(model)
    with pytest.raises(NotImplementedError, match="'user_tower.mlp.0.weight'"):
        NumpyTower(model.user_encoder, model.cfg, {k: v for k, v in weights.items() if k != "user_tower.mlp.0.weight"}, "user_tower.")
    extra = dict(weights) | {"user_tower.mlp.9.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(NotImplementedError, match=r"mlp\.9\.weight"):
        NumpyTower(model.user_encoder, model.cfg, extra, "user_tower.")


def test_an_architecture_the_numpy_tower_cannot_run_is_refused_at_load() -> None:
    """UserTower (what a served version holds) raises TowerError naming the problem; there is no
    silent fallback to another path."""
    model = _model(ARCHITECTURES["default"])
    weights = model_weights(model)
    missing = {k: v for k, v in weights.items() if k != "user_tower.cat.country.weight"}
    with pytest.raises(TowerError, match=r"cannot run this architecture: the weights have no 'user_tower.cat.country.weight'"):
        UserTower(model.user_encoder, model.cfg, missing)
    extra = dict(weights) | {"user_tower.attention.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(TowerError, match=r"'user_tower.attention.weight'\] have no place"):
        UserTower(model.user_encoder, model.cfg, extra)
    short = dict(weights) | {"user_tower.id_emb.weight": weights["user_tower.id_emb.weight"][:5]}
    with pytest.raises(TowerError, match=r"'user_tower.id_emb.weight' has shape \(5, 8\), the feature encoder needs \(201, \*\)"):
        UserTower(model.user_encoder, model.cfg, short)


def test_check_against_refuses_a_tower_that_differs_from_torch() -> None:
    model = _model(ARCHITECTURES["default"])
    weights = model_weights(model)
    weights["user_tower.mlp.0.bias"] = weights["user_tower.mlp.0.bias"] + 0.05
    tower = UserTower(model.user_encoder, model.cfg, weights)
    with pytest.raises(TowerError, match="differs from the torch tower by"):
        tower.check_against(model)


HISTORIES = {
    "mean": HistoryConfig(max_len=5),
    "recency": HistoryConfig(max_len=6, encoder="recency"),
    "fism_unbounded": HistoryConfig(max_len=None, alpha=0.5),
    "recency_unbounded": HistoryConfig(max_len=None, encoder="recency"),
    "free_id": HistoryConfig(max_len=4, free_id=True, encoder="recency", alpha=0.0),
}


@pytest.mark.parametrize("arch", ["default", "deep", "linear"])
@pytest.mark.parametrize("history", list(HISTORIES))
def test_numpy_history_equals_the_torch_history(arch: str, history: str) -> None:
    """(features, id, history) -> vector: `NumpyHistory` + `NumpyTower` against
    `TwoTowerModel.user_id_vectors` on known and unknown users, empty / short / over-long
    histories, unknown and repeated history ids, and no history at all (the saved id row)."""
    model = _model(ARCHITECTURES[arch].model_copy(update={"history": HISTORIES[history]}))
    with torch.no_grad():  # non-trivial pooling buffers and position weights
        model.user_history.cold_id.normal_()
        if model.user_history.free_id is not None:
            model.user_history.free_id.normal_()
    tower = UserTower.from_model(model)
    assert tower.history is not None and tower.history_len == HISTORIES[history].max_len
    assert tower.check_against(model) <= FAST_PATH_TOLERANCE
    rng = np.random.default_rng(2)
    items = [f"i{i}" for i in range(20)] + ["fresh", "i3"]
    raw = []
    for _ in range(60):
        hist = None if rng.random() < 0.2 else list(rng.choice(items, rng.integers(0, 12)))
        raw.append({"user_id": rng.choice([None, "u3", "u150", "nobody"]), "features": {"country": "fr", "age": 30.0},
                    **({} if hist is None else {"history": hist})})
    records = []
    for r in raw:
        codes, unknown = tower.encode_history(r.get("history"))
        if "history" in r:
            assert unknown == r["history"].count("fresh")
            assert len(codes) == min(len(r["history"]) - unknown, HISTORIES[history].max_len or 99)
        records.append(UserRecord(r["user_id"], tower.validate(r["features"]), codes))
    got = tower.embed(records)
    want = model.embed_users(raw)
    assert np.abs(got - want).max() <= FAST_PATH_TOLERANCE
    # the history changes the vector, except where there is none: then it is the id row's vector
    plain = model.embed_users([{k: v for k, v in r.items() if k != "history"} for r in raw])
    for r, g, p in zip(raw, got, plain, strict=True):
        if "history" not in r:
            assert np.abs(g - p).max() <= FAST_PATH_TOLERANCE
    assert np.abs(got - plain).max() > 1e-3


def test_history_pooling_by_hand() -> None:
    """The oracle: mean pooling is sum / n^alpha of the item rows; recency weights exp(logit of
    the distance from the newest) normalised to sum 1, times n^(1 - alpha)."""
    model = _model(ARCHITECTURES["default"].model_copy(update={"history": HistoryConfig(max_len=3, encoder="recency", alpha=0.5)}))
    pool = model.user_history
    with torch.no_grad():
        pool.position_logits.copy_(torch.tensor([0.0, np.log(2.0), np.log(3.0)]))
    e = pool.emb.weight.detach()
    got = pool(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([2, 3, 0]))
    # bag 1: items 1, 2 (oldest first): distances 1, 0 -> weights 2, 1
    want1 = (2 * e[1] + 1 * e[2]) / 3 * 2**0.5
    # bag 2: items 3, 4, 5: distances 2, 1, 0 -> weights 3, 2, 1
    want2 = (3 * e[3] + 2 * e[4] + 1 * e[5]) / 6 * 3**0.5
    torch.testing.assert_close(got, torch.stack([want1, want2, torch.zeros_like(want1)]))
    # no history item ever pools as OOV: unknown ids are dropped before, the cut keeps the newest
    tower = UserTower.from_model(model)
    codes, unknown = tower.encode_history(["i1", "nope", "i2", "i3", "i4"])
    assert unknown == 1 and codes == tuple(model.item_encoder.ids.encode_one(i) for i in ["i2", "i3", "i4"])


def test_history_fold_in_matches_its_formula() -> None:
    """HistoryFoldIn (the service's and trainer evaluate's one rule) against the formula written
    out: u' = normalize(u + b m/(m+c) normalize(sum_j r^(m-1-j) v_j)); no history: u unchanged."""
    from training.numpy_tower import HistoryFoldIn

    rng = np.random.default_rng(0)
    users = rng.normal(size=(3, 8)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    hist = [rng.normal(size=(4, 8)).astype(np.float32), None, np.empty((0, 8), np.float32)]
    b, c, r = 1.5, 2.0, 0.7
    got = HistoryFoldIn(b, c, r).apply(users, hist)
    w = r ** np.arange(3, -1, -1)
    pooled = w @ hist[0].astype(np.float64)
    want = users[0] + b * 4 / (4 + c) * pooled / np.linalg.norm(pooled)
    np.testing.assert_allclose(got[0], want / np.linalg.norm(want), atol=1e-6)
    np.testing.assert_array_equal(got[1:], users[1:])
    assert got.dtype == np.float32
    with pytest.raises(ValueError, match="2 histories for 3"):
        HistoryFoldIn(b, c, r).apply(users, hist[:2])
