"""Cold-start calibration: only the OOV id row moves, each user counts once, warm users untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_train_config
from training.bundle import load_bundle
from training.cold import calibrate_cold_start
from training.dataset import read_dataset
from training.train import fit


def _tables(bundle_path: Path, data: Path):
    model = load_bundle(bundle_path).model
    ds = read_dataset(data)
    user_ids = ds.users["user_id"].to_numpy()
    users = {k: torch.from_numpy(v) for k, v in model.user_encoder.encode_table(user_ids, ds.users).items()}
    items = {k: torch.from_numpy(v) for k, v in model.item_encoder.encode_table(ds.items["item_id"].to_numpy(), ds.items).items()}
    return model, users, items


def _cold_vectors(model, users: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.user_tower({**users, "id": torch.zeros_like(users["id"])})


def test_only_the_oov_row_moves(tiny_bundle_path: Path, tiny_dataset: Path) -> None:
    model, users, items = _tables(tiny_bundle_path, tiny_dataset)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.user_tower.train()  # modes and grad flags come back as they were
    losses = calibrate_cold_start(
        model.user_tower, model.item_tower, users, items, np.array([0, 1, 1, 2]), np.array([3, 4, 5, 6]),
        steps=20, temperature=0.2, batch_users=8,
    )
    assert len(losses) == 20 and all(np.isfinite(losses))
    after = model.state_dict()
    for k, v in before.items():
        if k == "user_tower.id_emb.weight":
            assert not torch.equal(after[k][0], v[0]), "the OOV row did not move"
            assert torch.equal(after[k][1:], v[1:]), "a known user's id row moved"
        else:
            assert torch.equal(after[k], v), k
    assert model.user_tower.training and not model.item_tower.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("candidates", [16384, 8])  # whole catalog; sampled (200 items > 8)
def test_each_user_counts_once(tiny_bundle_path: Path, tiny_dataset: Path, candidates: int) -> None:
    """One heavy user clicks item A 300 times, ten light users click item B once each: per click
    A is 30× as popular, per user B is 10×. Calibration must turn cold users towards B."""
    model, users, items = _tables(tiny_bundle_path, tiny_dataset)
    vecs = model.item_tower.eval()(items).detach()
    a, b = 0, 1
    cu = np.array([0] * 300 + list(range(1, 11)))
    ci = np.array([a] * 300 + [b] * 10)
    gap_before = (_cold_vectors(model, users) @ (vecs[b] - vecs[a])).mean().item()
    calibrate_cold_start(
        model.user_tower, model.item_tower, users, items, cu, ci,
        steps=200, temperature=0.2, batch_users=64, candidates=candidates, lr=0.05,
        generator=torch.Generator().manual_seed(0),
    )
    cold = _cold_vectors(model, users)
    gap_after = (cold @ (vecs[b] - vecs[a])).mean().item()
    assert gap_after > gap_before + 0.05
    assert ((cold @ vecs[b]) > (cold @ vecs[a])).float().mean().item() > 0.9


def test_zero_steps_or_no_clicks_change_nothing(tiny_bundle_path: Path, tiny_dataset: Path) -> None:
    model, users, items = _tables(tiny_bundle_path, tiny_dataset)
    before = model.user_tower.id_emb.weight.clone()
    assert calibrate_cold_start(model.user_tower, model.item_tower, users, items, np.array([0]), np.array([0]), steps=0, temperature=0.2) == []
    empty = np.array([], dtype=np.int64)
    assert calibrate_cold_start(model.user_tower, model.item_tower, users, items, empty, empty, steps=5, temperature=0.2) == []
    assert torch.equal(model.user_tower.id_emb.weight, before)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"steps": -1}, "steps=-1"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"batch_users": 0}, "batch_users=0"),
        ({"candidates": 0}, "candidates=0"),
        ({"lr": -1.0}, "lr=-1.0"),
    ],
)
def test_rejects_bad_arguments(tiny_bundle_path: Path, tiny_dataset: Path, kw: dict, match: str) -> None:
    model, users, items = _tables(tiny_bundle_path, tiny_dataset)
    args = {"steps": 5, "temperature": 0.2} | kw
    with pytest.raises(ValueError, match=match):
        calibrate_cold_start(model.user_tower, model.item_tower, users, items, np.array([0]), np.array([0]), **args)
    with pytest.raises(ValueError, match=r"click_users \(2,\) and click_items \(1,\)"):
        calibrate_cold_start(model.user_tower, model.item_tower, users, items, np.array([0, 1]), np.array([0]), steps=5, temperature=0.2)


def test_fit_calibrates_cold_users_and_leaves_warm_users_alone(tiny_dataset: Path, tmp_path: Path) -> None:
    """Same seed with and without the step: identical warm metrics, different cold metrics."""
    off = load_bundle(fit(tiny_dataset, tmp_path / "off", tiny_train_config(cold_calibration_steps=0), progress=False))
    on = load_bundle(fit(tiny_dataset, tmp_path / "on", tiny_train_config(), progress=False))
    warm = [k for k in off.manifest["metrics"] if not k.startswith("cold_")]
    assert warm and all(on.manifest["metrics"][k] == off.manifest["metrics"][k] for k in warm)
    assert on.manifest["metrics"]["cold_recall@100"] != off.manifest["metrics"]["cold_recall@100"]
    w_on, w_off = on.model.user_tower.id_emb.weight, off.model.user_tower.id_emb.weight
    assert torch.equal(w_on[1:], w_off[1:]) and not torch.equal(w_on[0], w_off[0])
    with pytest.raises(ValueError, match="cold_calibration_temperature=0"):
        fit(tiny_dataset, tmp_path / "bad", tiny_train_config(cold_calibration_temperature=0), progress=False)
