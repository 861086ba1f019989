"""Loss math against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.task import RetrievalTask, accidental_hit_mask, in_batch_softmax_loss


def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_in_batch_softmax_by_hand() -> None:
    u = _unit([1, 0], [0, 1])
    v = _unit([1, 0], [1, 1])
    tau = 0.5
    c = 1 / math.sqrt(2)
    # row 0: logits [1/τ, c/τ], label 0; row 1: logits [0, c/τ], label 1
    l0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(2 * c)))
    l1 = -math.log(math.exp(2 * c) / (1 + math.exp(2 * c)))
    got = in_batch_softmax_loss(u, v, torch.tensor([10, 11]), temperature=tau)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-9)


def test_logq_subtracts_log_probability_per_column() -> None:
    u = _unit([1, 0], [0, 1])
    v = _unit([1, 0], [1, 1])
    tau, lq = 0.5, torch.tensor([math.log(0.8), math.log(0.2)], dtype=torch.float64)
    c = 1 / math.sqrt(2)
    a = [2 - lq[0].item(), 2 * c - lq[1].item()]
    b = [0 - lq[0].item(), 2 * c - lq[1].item()]
    l0 = -(a[0] - math.log(math.exp(a[0]) + math.exp(a[1])))
    l1 = -(b[1] - math.log(math.exp(b[0]) + math.exp(b[1])))
    got = in_batch_softmax_loss(u, v, torch.tensor([1, 2]), temperature=tau, log_q=lq)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-9)
    task = RetrievalTask(temperature=tau, logq=False)
    assert task(u, v, torch.tensor([1, 2]), lq).item() == pytest.approx(
        in_batch_softmax_loss(u, v, torch.tensor([1, 2]), temperature=tau).item()
    )


def test_accidental_hits_masked() -> None:
    ids = torch.tensor([7, 8, 7])
    m = accidental_hit_mask(ids, ids)
    assert m.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    # with the duplicate masked, row 0's loss equals a 2-column softmax over columns 0 and 1
    u = _unit([1, 0], [0, 1], [1, 1])
    v = _unit([1, 0], [0, 1], [1, 0])
    per_row = []
    logits = (u @ v.T) / 0.1
    for i, keep in enumerate([[0, 1], [0, 1, 2], [1, 2]]):
        row = logits[i, keep]
        per_row.append(-(logits[i, i] - torch.logsumexp(row, 0)).item())
    got = in_batch_softmax_loss(u, v, ids, temperature=0.1)
    assert got.item() == pytest.approx(sum(per_row) / 3, rel=1e-9)


def test_extra_mask_never_masks_the_positive_and_weights() -> None:
    u = _unit([1, 0], [0, 1])
    v = _unit([1, 0], [0, 1])
    full = torch.ones(2, 2, dtype=torch.bool)
    got = in_batch_softmax_loss(u, v, torch.tensor([1, 2]), temperature=1.0, extra_mask=full)
    assert got.item() == pytest.approx(0.0, abs=1e-9)  # only the positive remains in each row
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    plain = F.cross_entropy(u @ v.T, torch.arange(2), reduction="none")
    got = in_batch_softmax_loss(u, v, torch.tensor([1, 2]), temperature=1.0, weights=w)
    assert got.item() == pytest.approx(plain[0].item())


def test_shape_mismatch_names_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 2\)"):
        in_batch_softmax_loss(torch.zeros(2, 2), torch.zeros(3, 2), torch.arange(3), temperature=1.0)
