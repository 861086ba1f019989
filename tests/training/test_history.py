"""User history: the click sequences in EVAL.md order, causal training histories (no row sees its
own or a later click), cold-start prefixes for id-dropped rows, baking into the id table, and a
fit whose bundle carries the history input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import tiny_train_config
from training.bundle import load_bundle
from training.dataset import read_dataset
from training.model import HistoryPooling, Tower, bake_history, build_history, history_bags
from training.split import split_interactions
from training.train import TrainingData, TrainStep, fit, fit_encoders, history_of


def _history():
    # user 0 clicked items 2 (t=1), 1 (t=2), 2 again (t=3); user 1: 0 (t=5); user 2: nothing.
    return build_history(np.array([0, 1, 0, 0]), np.array([2, 0, 1, 2]), np.array([1, 5, 2, 3]), n_users=3)


def test_build_history_orders_by_time_then_item_and_keeps_positions() -> None:
    h = _history()
    assert h.indptr.tolist() == [0, 3, 4, 4]
    assert h.items.tolist() == [2, 1, 2, 0]  # a repeated click stays: the client's record has it twice
    assert h.position.tolist() == [0, 0, 1, 2]  # each input click's place in its user's sequence
    tie = build_history(np.array([0, 0, 0]), np.array([5, 3, 4]), np.array([7, 7, 1]), 1, item_keys=np.array([50, 30, 40]))
    assert tie.items.tolist() == [4, 3, 5]  # same timestamp: the smaller item key first
    with pytest.raises(ValueError, match="differ in length"):
        build_history(np.array([0, 1]), np.array([0]), np.array([0]), 2)


def test_bags_and_latest() -> None:
    h = _history()
    items, lengths = history_bags(h, torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 0, 0]), torch.tensor([2, 3, 1, 0]))
    assert items.tolist() == [2, 1, 1, 2, 0] and lengths.tolist() == [2, 2, 1, 0]
    pool = HistoryPooling(4, 2, max_len=2)
    with torch.no_grad():
        pool.emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0], [8.0, 8.0]]))
    # the baked vectors: each user's two most recent clicks, mean-pooled
    torch.testing.assert_close(pool.pooled_all(h), torch.tensor([[2.0, 3.0], [1.0, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_mean_pooling_by_hand(alpha: float) -> None:
    pool = HistoryPooling(4, 2, alpha=alpha)
    with torch.no_grad():
        pool.emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0], [8.0, 8.0]]))
    got = pool(torch.tensor([1, 2, 3]), torch.tensor([2, 0, 1]))
    want = torch.tensor([[4.0 / 2**alpha, 6.0 / 2**alpha], [0.0, 0.0], [8.0, 8.0]])
    torch.testing.assert_close(got, want)


def test_pooling_config_errors() -> None:
    with pytest.raises(ValueError, match="alpha"):
        HistoryPooling(3, 2, alpha=1.5)
    with pytest.raises(ValueError, match="'mean' or 'recency'"):
        HistoryPooling(3, 2, encoder="attention")


def _step(tiny_dataset, **over) -> tuple[TrainStep, TrainingData, pd.DataFrame]:
    from training.model import TwoTowerModel
    from training.task import build_task

    cfg = tiny_train_config(**over)
    ds = read_dataset(tiny_dataset)
    train = split_interactions(ds.interactions).fit
    ue, ie = fit_encoders(ds, train, cfg)
    model = TwoTowerModel(cfg.model_config_with_history(), ue, ie)
    data = TrainingData.encode(ds, train, ue, ie, cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    return TrainStep(model, model.user_history, build_task(cfg, data.counts, data.pos_keys, gen, "cpu"), data, cfg, gen), data, train


def _pooled_bags(step: TrainStep, rows, users, dropped) -> tuple[torch.Tensor, torch.Tensor]:
    """The (items, lengths) bags `TrainStep.history_input` hands to the pooling."""
    captured: dict = {}
    orig = step.pool.forward

    def spy(items, lengths):
        captured.update(items=items, lengths=lengths)
        return orig(items, lengths)

    step.pool.forward = spy
    try:
        step.history_input(rows, users, dropped)
    finally:
        step.pool.forward = orig
    return captured["items"], captured["lengths"]


@pytest.mark.parametrize("max_len", [None, 3])
def test_no_training_row_sees_its_own_or_a_later_click(tiny_dataset, max_len) -> None:
    """The oracle: for every training row, the user's clicks sorted by (timestamp, item id) in
    pandas; the bag the step pools must be exactly the last `max_len` of those strictly before
    the row (id kept) or a prefix of them (id dropped), never the row's own click or a later one."""
    step, data, train = _step(tiny_dataset, history_max_len=max_len, history_cold_max_len=4)
    codes = data.items["id"].numpy()[data.item_index.get_indexer(train["item_id"])]
    df = pd.DataFrame({"u": train["user_id"].to_numpy(), "t": train["timestamp"].to_numpy(),
                       "k": train["item_id"].astype(str).to_numpy(), "c": codes, "r": np.arange(len(train))})
    df = df.sort_values(["u", "t", "k"], kind="stable")
    before = {}
    for _, g in df.groupby("u", sort=False):
        seq = g["c"].tolist()
        for j, r in enumerate(g["r"].tolist()):
            before[r] = seq[:j]
    h = data.history
    rows = torch.arange(len(train))
    ends = h.position[rows]
    for dropped in (torch.zeros(len(rows), dtype=torch.bool), torch.ones(len(rows), dtype=torch.bool)):
        items, lengths = _pooled_bags(step, rows, data.pair_users[rows], dropped)
        for r, bag in enumerate(torch.split(items, lengths.tolist())):
            prior = before[r]
            bag = bag.tolist()
            if dropped[0]:
                assert bag == prior[: len(bag)] and len(bag) <= min(4, len(prior)), r
            else:
                assert bag == (prior[-max_len:] if max_len and prior else prior), r
        assert int(ends.sum()) >= int(lengths.sum())
    # the cold prefixes cover every length 0..min(cap, clicks before) (a new user with 3 clicks is trained)
    seen: set[int] = set()
    for _ in range(20):
        seen |= set(_pooled_bags(step, rows, data.pair_users[rows], torch.ones(len(rows), dtype=torch.bool))[1].tolist())
    assert seen == set(range(min(4, max_len or 4) + 1))  # also capped by the history length


def test_history_of_follows_the_split_order(tiny_dataset) -> None:
    step, data, train = _step(tiny_dataset)
    h = history_of(train, data, torch.device("cpu"))
    assert torch.equal(h.items, data.history.items) and torch.equal(h.position, data.history.position)


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


@pytest.mark.parametrize("over", [{"history_free_id": False}, {"history_free_id": True, "history_encoder": "recency"}])
def test_fit_with_history_writes_a_bundle_with_the_history_input(tiny_dataset, tmp_path, over) -> None:
    cfg = tiny_train_config(history_max_len=5, **over)
    path = fit(tiny_dataset, tmp_path, cfg, progress=False)
    b = load_bundle(path)
    m = b.model
    assert m.cfg.history is not None and m.cfg.history.max_len == 5 and m.cfg.history.free_id == over["history_free_id"]
    assert b.manifest["metrics"]["recall@20"] >= 0.0 and "cold_m5_recall@20" in b.manifest["metrics"]
    known = m.user_encoder.ids.tokens[0]
    vecs = m.embed_users([{"user_id": known, "features": {}}, {"user_id": "nobody", "features": {}}])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vecs[0], vecs[1])  # a known user is not served as OOV
    # a known user without free rows sending its own baked history gets the same vector
    train = split_interactions(read_dataset(tiny_dataset).interactions).train
    own = train[train["user_id"] == known].sort_values(["timestamp", "item_id"], kind="stable")["item_id"].tolist()
    with_hist = m.embed_users([{"user_id": known, "features": {}, "history": own}])
    if not over["history_free_id"]:
        np.testing.assert_allclose(with_hist[0], vecs[0], atol=1e-5)
    # the unknown user's history slot sits next to the OOV row as training left it, not the calibrated one
    assert not torch.allclose(m.user_history.cold_id, m.user_tower.id_emb.weight[0])
