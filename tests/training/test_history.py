"""User-history pooling: the CSR history, leave-one-out pooling, baking into the id table, and a
fit with it whose bundle loads as an ordinary tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import tiny_train_config
from training.bundle import load_bundle
from training.model import HistoryPooling, Tower, bake_history, build_history
from training.train import fit


def _history():
    # user 0 clicked items 2, 1, 2 (item 2 twice: counted once, at its latest time); user 1: 0;
    # user 2: nothing.
    return build_history(
        np.array([0, 0, 0, 1]), np.array([2, 1, 2, 0]), np.array([1, 2, 3, 5]), n_users=3, n_items=4
    )


def test_build_history_dedups_orders_by_time_and_caps() -> None:
    h = _history()
    assert h.indptr.tolist() == [0, 2, 3, 3]
    assert h.items.tolist() == [1, 2, 0]  # user 0: item 1 (t=2), item 2 (latest t=3)
    assert h.keys.tolist() == sorted([0 * 4 + 1, 0 * 4 + 2, 1 * 4 + 0])
    capped = build_history(np.array([0, 0, 0]), np.array([3, 1, 2]), np.array([1, 2, 3]), 1, 4, max_len=2)
    assert capped.items.tolist() == [1, 2]  # the two most recent
    with pytest.raises(ValueError, match="max_len"):
        build_history(np.array([0]), np.array([0]), np.array([0]), 1, 1, max_len=0)
    with pytest.raises(ValueError, match="differ in length"):
        build_history(np.array([0, 1]), np.array([0]), np.array([0]), 2, 1)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_pooling_by_hand_with_leave_one_out(alpha: float) -> None:
    h = _history()
    pool = HistoryPooling(4, 2, alpha=alpha)
    with torch.no_grad():
        pool.emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0], [8.0, 8.0]]))
    users = torch.tensor([0, 0, 1, 2, 0])
    exclude = torch.tensor([1, 3, 0, 1, 2])
    got = pool(h, users, exclude)
    want = torch.tensor([
        [4.0, 4.0],                            # user 0 minus its positive 1: {2}, n=1
        [4.0 / 2.0**alpha, 6.0 / 2.0**alpha],  # item 3 is not in the history: nothing removed
        [0.0, 0.0],                            # user 1's only item is the positive: empty
        [0.0, 0.0],                            # user 2 has no history
        [0.0, 2.0],                            # user 0 minus 2: {1}
    ])
    torch.testing.assert_close(got, want)
    full = pool.pooled_all(h)
    torch.testing.assert_close(full, torch.tensor([[4.0, 6.0], [1.0, 0.0], [0.0, 0.0]]) * torch.tensor([[2.0**-alpha], [1.0], [1.0]]))


def test_pooling_gradients_reach_only_history_items() -> None:
    h = _history()
    pool = HistoryPooling(4, 2)
    pool(h, torch.tensor([0]), torch.tensor([1])).sum().backward()
    g = pool.emb.weight.grad
    assert g[2].abs().sum() > 0
    assert g[0].abs().sum() == 0 and g[3].abs().sum() == 0
    assert g[1].abs().sum() == 0  # the excluded positive: +1 from the bag, -1 from the exclusion


def test_alpha_out_of_range() -> None:
    with pytest.raises(ValueError, match="alpha"):
        HistoryPooling(3, 2, alpha=1.5)


def test_bake_skips_oov_rows(tiny_bundle) -> None:
    tower: Tower = tiny_bundle.model.user_tower
    before = tower.id_emb.weight.detach().clone()
    codes = torch.tensor([0, 2, 0, 1])
    pooled = torch.arange(4 * before.shape[1], dtype=torch.float32).view(4, -1)
    try:
        bake_history(tower, codes, pooled)
        after = tower.id_emb.weight.detach()
        torch.testing.assert_close(after[0], before[0])  # OOV untouched
        torch.testing.assert_close(after[2], before[2] + pooled[1])
        torch.testing.assert_close(after[1], before[1] + pooled[3])
        with pytest.raises(ValueError, match="id codes"):
            bake_history(tower, codes[:2], pooled)
    finally:
        with torch.no_grad():
            tower.id_emb.weight.copy_(before)


@pytest.mark.parametrize("free_id", [False, True])
def test_fit_with_history_writes_an_ordinary_bundle(tiny_dataset, tmp_path, free_id: bool) -> None:
    cfg = tiny_train_config(user_history=True, history_free_id=free_id, history_max_len=5)
    path = fit(tiny_dataset, tmp_path, cfg, progress=False)
    b = load_bundle(path)  # strict state dict: no history table in the weights
    assert not any(k.startswith("pool") or "hist" in k for k in b.model.state_dict())
    assert b.manifest["metrics"]["recall@20"] >= 0.0
    known = b.model.user_encoder.ids.tokens[0]
    vecs = b.model.embed_users([{"user_id": known, "features": {}}, {"user_id": "nobody", "features": {}}])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vecs[0], vecs[1])  # a known user is not served as OOV
