"""Sparse tables against the dense reference: SparseAdam vs Adam, the lazy weight average vs the
dense one, the row-gradient mask (the OOV row trick) with both gradient layouts, and the wiring."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import tiny_train_config
from training.config import TrainConfig
from training.ema import WeightAverage
from training.optim import SPARSE_MIN_ROWS, TableOptimizer, choose_sparse_tables, keep_rows_gradient
from training.train import fit


def _table(sparse: bool, rows: int = 7, dim: int = 3, seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    emb = nn.Embedding(rows, dim, sparse=sparse)
    nn.init.normal_(emb.weight)
    return emb


def _loss(emb: nn.Embedding, idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((emb(idx) - target[idx]) ** 2).sum() + emb(idx).pow(3).sum() * 0.1


def test_sparse_adam_equals_adam_when_every_step_touches_every_row() -> None:
    """On steps whose batch covers every row, lazy Adam is Adam: same moments, same updates."""
    dense, sparse = _table(False), _table(True)
    od = TableOptimizer(dense.parameters(), [], lr=0.05)
    os_ = TableOptimizer(sparse.parameters(), [sparse], lr=0.05)
    assert os_.sparse is not None and os_.dense is None and od.sparse is None
    g = torch.Generator().manual_seed(1)
    target = torch.randn(7, 3, generator=g)
    for _ in range(30):
        idx = torch.cat([torch.randperm(7, generator=g), torch.randint(7, (5,), generator=g)])  # every row, some twice
        for emb, opt in ((dense, od), (sparse, os_)):
            opt.zero_grad()
            _loss(emb, idx, target).backward()
            opt.step()
        assert sparse.weight.grad is not None and sparse.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-5, atol=1e-6)


def test_sparse_adam_leaves_untouched_rows_and_matches_adam_on_its_first_step() -> None:
    dense, sparse = _table(False), _table(True)
    start = sparse.weight.detach().clone()
    od = TableOptimizer(dense.parameters(), [], lr=0.05)
    os_ = TableOptimizer(sparse.parameters(), [sparse], lr=0.05)
    target = torch.randn(7, 3)
    idx = torch.tensor([1, 4, 4])
    for emb, opt in ((dense, od), (sparse, os_)):
        opt.zero_grad()
        _loss(emb, idx, target).backward()
        opt.step()
    torch.testing.assert_close(sparse.weight, dense.weight)  # first step: dense Adam moves only rows with a gradient too
    untouched = [0, 2, 3, 5, 6]
    assert torch.equal(sparse.weight[untouched], start[untouched])
    assert not torch.equal(sparse.weight[[1, 4]], start[[1, 4]])


def test_lazy_average_equals_the_dense_average() -> None:
    """A lazy average over a SparseAdam-trained table against the dense recurrence run on the
    very same weights every step, through the warm-up and beyond, read mid-run and at the end."""
    emb = _table(True, rows=20, dim=4)
    mlp = nn.Linear(4, 1)  # a dense parameter averaged alongside
    params = [emb.weight, *mlp.parameters()]
    opt = TableOptimizer(params, [emb], lr=0.03)
    dense = WeightAverage(params, decay=0.9)
    lazy = WeightAverage(params, decay=0.9, lazy=[emb.weight])
    g = torch.Generator().manual_seed(3)
    for step in range(60):
        idx = torch.randint(20, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)  # a few rows per step
        opt.zero_grad()
        mlp(emb(idx)).pow(2).sum().backward()
        lazy.before_step()
        opt.step()
        lazy.update()
        dense.update()
        if step == 25:
            with lazy.swapped():
                torch.testing.assert_close(emb.weight.detach(), dense.shadow[0], rtol=1e-5, atol=1e-6)
    lazy.sync()
    for a, b in zip(lazy.shadow, dense.shadow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(lazy.shadow[0], emb.weight)  # an average, not the live weights


def test_lazy_average_needs_before_step() -> None:
    emb = _table(True)
    ema = WeightAverage([emb.weight], decay=0.9, lazy=[emb.weight])
    with pytest.raises(RuntimeError, match="before_step"):
        ema.update()
    with pytest.raises(ValueError, match="not among the averaged"):
        WeightAverage([], decay=0.9, lazy=[emb.weight])


@pytest.mark.parametrize("sparse", [False, True])
def test_keep_rows_gradient_trains_only_the_kept_rows_like_the_dense_reference(sparse: bool) -> None:
    """The OOV-row trick (only row 0 of the user id table learns) with either gradient layout:
    the same update of row 0 as a dense table without the hook moving row 0 alone."""
    emb, ref = _table(sparse), _table(False)
    start = emb.weight.detach().clone()
    keep_rows_gradient(emb.weight, torch.tensor([0]))
    target = torch.randn(7, 3)
    idx = torch.tensor([0, 0, 2, 5, 6])
    opt = TableOptimizer(emb.parameters(), [emb] if sparse else [], lr=0.05)
    opt.zero_grad()
    _loss(emb, idx, target).backward()
    grad = emb.weight.grad
    assert grad is not None and grad.is_sparse == sparse
    dense_grad = grad.to_dense() if sparse else grad
    assert torch.count_nonzero(dense_grad[1:]) == 0 and torch.count_nonzero(dense_grad[0]) > 0
    opt.step()
    assert torch.equal(emb.weight[1:], start[1:])
    # reference: a dense table whose loss only sees row 0's terms
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    _loss(ref, idx[idx == 0], target).backward()
    ref_opt.step()
    torch.testing.assert_close(emb.weight[0], ref.weight[0])


def test_choose_sparse_tables_auto_threshold_and_weight_decay() -> None:
    small, big = nn.Embedding(SPARSE_MIN_ROWS - 1, 2), nn.Embedding(SPARSE_MIN_ROWS, 2)
    assert choose_sparse_tables([small, big], None, 0.0) == [big]
    assert choose_sparse_tables([small, big], None, 1e-4) == []  # weight decay is O(table) per step
    assert choose_sparse_tables([small, big], True, 0.0) == [small, big]
    assert choose_sparse_tables([small, big], False, 0.0) == []
    with pytest.raises(ValueError, match="SparseAdam has no weight decay"):
        choose_sparse_tables([small], True, 1e-4)
    with pytest.raises(ValueError, match="sparse_tables=true with weight_decay"):
        TrainConfig(sparse_tables=True, weight_decay=0.01)


def test_fit_trains_with_sparse_tables(tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The whole loop on the sparse path (every table sparse on the tiny data), deterministic."""
    cfg = tiny_train_config(epochs=2, patience=2, sparse_tables=True)
    with caplog.at_level(logging.INFO, logger="trainer"):
        a = fit(tiny_dataset, tmp_path / "a", cfg, progress=False)
    assert "sparse tables:" in caplog.text
    b = fit(tiny_dataset, tmp_path / "b", cfg, progress=False)
    from safetensors.numpy import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)
