"""Loss math against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.task import RetrievalTask, accidental_hit_mask, in_batch_softmax_loss, mixed_log_q


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


def test_mixed_negatives_by_hand() -> None:
    """Two in-batch positives plus two shared uniform negatives (ids 9 and 2): each row is a
    softmax over four columns, logQ per column, the uniform copy of row 1's positive (id 2)
    masked as an accidental hit, and a neg_mask entry dropping (row 0, id 9)."""
    u = _unit([1, 0], [0, 1])
    v = _unit([1, 0], [1, 1])
    n = _unit([0, 1], [1, 1])
    lq = torch.tensor([math.log(0.5), math.log(0.25)], dtype=torch.float64)
    nlq = torch.tensor([math.log(0.1), math.log(0.3)], dtype=torch.float64)
    tau, c = 0.5, 1 / math.sqrt(2)
    q = [math.log(0.5), math.log(0.25), math.log(0.1), math.log(0.3)]
    cos0 = [1, c, 0, c]      # row 0 against columns [v0, v1, n0, n1]
    cos1 = [0, c, 1, c]
    row0 = [cos0[j] / tau - q[j] for j in (0, 1, 3)]   # n0 (id 9) dropped by neg_mask
    row1 = [cos1[j] / tau - q[j] for j in (0, 1, 2)]   # n1 has row 1's positive id 2: a hit
    l0 = -(row0[0] - math.log(sum(math.exp(x) for x in row0)))
    l1 = -(row1[1] - math.log(sum(math.exp(x) for x in row1)))
    got = in_batch_softmax_loss(
        u, v, torch.tensor([1, 2]), temperature=tau, log_q=lq, neg_item=n, neg_ids=torch.tensor([9, 2]),
        neg_log_q=nlq, neg_mask=torch.tensor([[True, False], [False, False]]),
    )
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-9)
    # through the task: logq_weight scales both parts of the correction alike
    task = RetrievalTask(temperature=tau, logq_weight=0.5)
    want = in_batch_softmax_loss(u, v, torch.tensor([1, 2]), temperature=tau, log_q=lq * 0.5, neg_item=n,
                                 neg_ids=torch.tensor([9, 2]), neg_log_q=nlq * 0.5)
    got = task(u, v, torch.tensor([1, 2]), lq, neg_item=n, neg_ids=torch.tensor([9, 2]), neg_log_q=nlq)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_mixed_negatives_shape_errors_name_shapes() -> None:
    u = _unit([1, 0], [0, 1])
    with pytest.raises(ValueError, match=r"neg_item \(1, 3\) must be \(M, 2\)"):
        in_batch_softmax_loss(u, u, torch.arange(2), temperature=1.0, neg_item=torch.zeros(1, 3), neg_ids=torch.arange(1))
    with pytest.raises(ValueError, match="neg_log_q"):
        in_batch_softmax_loss(u, u, torch.arange(2), temperature=1.0, log_q=torch.zeros(2), neg_item=u, neg_ids=torch.arange(2))


def test_mixed_log_q_is_the_expected_candidate_count() -> None:
    p = torch.tensor([0.5, 0.01, 0.0], dtype=torch.float64)
    got = mixed_log_q(torch.log(p), batch_size=100, n_uniform=50, n_items=1000).exp()
    assert got.tolist() == pytest.approx([100 * 0.5 + 0.05, 100 * 0.01 + 0.05, 0.05], rel=1e-12)
    # without uniform negatives it is log p + log B: a per-row constant the softmax ignores
    assert mixed_log_q(torch.log(p[:2]), 100, 0, 1000).tolist() == pytest.approx((torch.log(p[:2]) + math.log(100)).tolist())
    with pytest.raises(ValueError, match="batch_size"):
        mixed_log_q(torch.log(p), 0, 1, 10)


# ---- sampled-negative objectives ---------------------------------------------------------------
# one user a = (1, 0); positive b⁺ = (1, 1)/√2 so s⁺ = c = 1/√2; negatives (1, 0), (0, 1): s⁻ = 1, 0
C = 1 / math.sqrt(2)


def _triple() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _unit([1, 0]), _unit([1, 1]), _unit([1, 0], [0, 1]).unsqueeze(0)


def _sp(x: float) -> float:
    return math.log1p(math.exp(x))


def test_pointwise_bce_by_hand() -> None:
    from training.task import pointwise_loss

    a, p, n = _triple()
    want = (_sp(-C / 0.5) + _sp(1 / 0.5) + _sp(0 / 0.5)) / 3
    assert pointwise_loss(a, p, n, temperature=0.5).item() == pytest.approx(want, rel=1e-9)
    masked = torch.tensor([[True, False]])
    want = (_sp(-C / 0.5) + _sp(0.0)) / 2
    assert pointwise_loss(a, p, n, temperature=0.5, neg_mask=masked).item() == pytest.approx(want, rel=1e-9)


def test_triplet_hinge_by_hand() -> None:
    from training.task import triplet_hinge_loss

    a, p, n = _triple()
    want = (max(0.0, 1 + 0.2 - C) + max(0.0, 0 + 0.2 - C)) / 2
    assert triplet_hinge_loss(a, p, n, margin=0.2).item() == pytest.approx(want, rel=1e-9)
    # masking the violating negative leaves only the satisfied one: zero loss
    assert triplet_hinge_loss(a, p, n, margin=0.2, neg_mask=torch.tensor([[True, False]])).item() == 0.0


def test_triplet_logistic_by_hand() -> None:
    from training.task import triplet_logistic_loss

    a, p, n = _triple()
    want = (_sp(2 * (1 - C)) + _sp(2 * (0 - C))) / 2
    assert triplet_logistic_loss(a, p, n, sigma=2.0).item() == pytest.approx(want, rel=1e-9)


def test_listwise_logq_and_masking_by_hand() -> None:
    from training.task import listwise_loss

    a, p, n = _triple()
    lq = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float64)
    logits = [C / 0.5, 1 / 0.5 - math.log(0.5), 0 / 0.5 - math.log(0.25)]
    want = -(logits[0] - math.log(sum(math.exp(x) for x in logits)))
    assert listwise_loss(a, p, n, temperature=0.5, neg_log_q=lq).item() == pytest.approx(want, rel=1e-9)
    plain = [C / 0.5, 2.0, 0.0]
    want = -(plain[0] - math.log(sum(math.exp(x) for x in plain)))
    assert listwise_loss(a, p, n, temperature=0.5).item() == pytest.approx(want, rel=1e-9)
    # accidental hit on the first negative: softmax over [positive, second negative] only
    m = torch.tensor([[True, False]])
    want = -(logits[0] - math.log(math.exp(logits[0]) + math.exp(logits[2])))
    assert listwise_loss(a, p, n, temperature=0.5, neg_log_q=lq, neg_mask=m).item() == pytest.approx(want, rel=1e-9)
    # correcting the positive too (pos_log_q) subtracts its log q from the first logit
    want2 = -((logits[0] - math.log(0.1)) - math.log(math.exp(logits[0] - math.log(0.1)) + sum(math.exp(x) for x in logits[1:])))
    got = listwise_loss(a, p, n, temperature=0.5, neg_log_q=lq, pos_log_q=torch.tensor([math.log(0.1)], dtype=torch.float64))
    assert got.item() == pytest.approx(want2, rel=1e-9)


def test_sampled_hit_mask_and_known_positives() -> None:
    from training.task import known_positive_mask, sampled_hit_mask

    n_items = 10
    pos_keys = torch.tensor(sorted([0 * n_items + 3, 0 * n_items + 4, 1 * n_items + 7]))
    users, pos = torch.tensor([0, 1]), torch.tensor([3, 7])
    neg = torch.tensor([[3, 4, 5], [3, 7, 4]])
    assert sampled_hit_mask(pos, neg).tolist() == [[True, False, False], [False, True, False]]
    assert sampled_hit_mask(pos, neg, users, pos_keys, n_items).tolist() == [[True, True, False], [False, True, False]]
    assert known_positive_mask(users, torch.tensor([4, 7]), pos_keys, n_items).tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match=r"neg_ids \(3,\) must be \(N, K\)"):
        sampled_hit_mask(pos, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("heavy", [False, True])
def test_known_positive_mask_against_a_set_oracle(seed: int, heavy: bool) -> None:
    """Shared and per-row candidates, repeated users and items, users without positives; `heavy`
    gives the batch's users more clicks than the mask has cells (the per-cell search path)."""
    from training.task import known_positive_mask

    g = torch.Generator().manual_seed(seed)
    n_users, n_items = 12, 9
    n_pos = 90 if heavy else 25
    pairs = {(int(u), int(i)) for u, i in zip(torch.randint(n_users - 2, (n_pos,), generator=g), torch.randint(n_items, (n_pos,), generator=g), strict=True)}
    pos_keys = torch.tensor(sorted(u * n_items + i for u, i in pairs), dtype=torch.int64)
    users = torch.randint(n_users, (3 if heavy else 7,), generator=g)  # users 10 and 11 have no positives
    shared = torch.randint(n_items, (2 if heavy else 6,), generator=g)
    per_row = torch.randint(n_items, (len(users), 4), generator=g)
    want_shared = [[(int(u), int(c)) in pairs for c in shared] for u in users]
    want_rows = [[(int(u), int(c)) in pairs for c in row] for u, row in zip(users, per_row, strict=True)]
    assert known_positive_mask(users, shared, pos_keys, n_items).tolist() == want_shared
    assert known_positive_mask(users, per_row, pos_keys, n_items).tolist() == want_rows
    empty = torch.zeros(0, dtype=torch.int64)
    assert not known_positive_mask(users, shared, empty, n_items).any()


def test_task_dispatch_and_errors() -> None:
    from training.task import listwise_loss, triplet_hinge_loss

    a, p, n = _triple()
    lq = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float64)
    t = RetrievalTask(temperature=0.5, objective="listwise", logq_weight=0.5)
    assert t.sampled(a, p, n, neg_log_q=lq).item() == pytest.approx(
        listwise_loss(a, p, n, temperature=0.5, neg_log_q=0.5 * lq).item()
    )
    t = RetrievalTask(objective="listwise", logq=False, temperature=0.5)
    assert t.sampled(a, p, n, neg_log_q=lq).item() == pytest.approx(listwise_loss(a, p, n, temperature=0.5).item())
    t = RetrievalTask(objective="triplet_hinge", margin=0.3)
    assert t.sampled(a, p, n).item() == pytest.approx(triplet_hinge_loss(a, p, n, margin=0.3).item())
    with pytest.raises(ValueError, match="objective 'softmax' is not one of"):
        RetrievalTask(objective="softmax")
    with pytest.raises(ValueError, match="in-batch negatives"):
        RetrievalTask().sampled(a, p, n)
    with pytest.raises(ValueError, match=r"negatives \(2, 2\) must be \(N, K, d\) = \(1, K, 2\)"):
        triplet_hinge_loss(a, p, n[0], margin=0.1)


def test_row_logq_scale_scales_each_rows_correction() -> None:
    u = _unit([1, 0], [0, 1], [1, 1])
    v = _unit([1, 0], [0, 1], [1, -1])
    ids = torch.tensor([0, 1, 2])
    lq = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    scale = torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64)
    tau = 0.5
    logits = u @ v.T / tau - scale.unsqueeze(1) * lq.unsqueeze(0)
    want = F.cross_entropy(logits, torch.arange(3))
    got = in_batch_softmax_loss(u, v, ids, temperature=tau, log_q=lq, row_logq_scale=scale)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


def test_cold_logq_weight_applies_to_id_dropped_rows_only() -> None:
    u = _unit([1, 0], [0, 1])
    v = _unit([1, 0], [1, 1])
    ids = torch.tensor([0, 1])
    lq = torch.log(torch.tensor([0.8, 0.2], dtype=torch.float64))
    dropped = torch.tensor([False, True])
    task = RetrievalTask(temperature=0.5, logq_weight=1.0, cold_logq_weight=3.0)
    want = in_batch_softmax_loss(u, v, ids, temperature=0.5, log_q=lq, row_logq_scale=torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert task(u, v, ids, lq, id_dropped=dropped).item() == pytest.approx(want.item(), rel=1e-9)
    # no dropped rows, or no cold weight: the plain correction
    plain = in_batch_softmax_loss(u, v, ids, temperature=0.5, log_q=lq)
    assert task(u, v, ids, lq, id_dropped=torch.tensor([False, False])).item() == pytest.approx(plain.item(), rel=1e-9)
    assert RetrievalTask(temperature=0.5)(u, v, ids, lq, id_dropped=dropped).item() == pytest.approx(plain.item(), rel=1e-9)
    assert want.item() != pytest.approx(plain.item(), rel=1e-6)


def _reference_in_batch_loss(u, v, ids, tau, lq, scale, w, neg, neg_ids, neg_lq, extra, neg_mask):
    """The plain formula: dense logits, a dense bool mask, masked_fill, logsumexp (autograd)."""
    cand, cand_ids, q = torch.cat([v, neg]), torch.cat([ids, neg_ids]), torch.cat([lq, neg_lq])
    logits = u @ cand.T / tau - scale.unsqueeze(1) * q.unsqueeze(0)
    n = len(ids)
    mask = ids.unsqueeze(1) == cand_ids.unsqueeze(0)
    mask[:, :n] |= extra
    mask[:, n:] |= neg_mask
    mask[:, :n].fill_diagonal_(False)
    logits = logits.masked_fill(mask, -1e9)
    losses = torch.logsumexp(logits, 1) - logits.diagonal()
    return (losses * w).sum() / w.sum()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("as_pairs", [False, True])
def test_fused_softmax_loss_and_gradients_match_the_reference(seed: int, as_pairs: bool) -> None:
    """The fused node (sparse mask pairs, log_softmax, hand-written backward) against autograd of
    the dense formula: loss and gradients of the user, item and mixed-negative vectors, with
    repeated ids (accidental hits), extra / negative masks given dense or as pairs, row weights
    and per-row logQ scales."""
    g = torch.Generator().manual_seed(seed)
    n, m, d = 9, 5, 4
    u0 = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    v0 = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    neg0 = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    ids, neg_ids = torch.randint(6, (n,), generator=g), torch.randint(6, (m,), generator=g)
    lq, neg_lq = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)
    scale, w = torch.rand(n, generator=g, dtype=torch.float64) * 3, torch.rand(n, generator=g, dtype=torch.float64)
    extra, neg_mask = torch.rand(n, n, generator=g) < 0.2, torch.rand(n, m, generator=g) < 0.2
    grads = []
    for fused in (True, False):
        u, v, neg = (x.clone().requires_grad_() for x in (u0, v0, neg0))
        if not fused:
            loss = _reference_in_batch_loss(u, v, ids, 0.3, lq, scale, w, neg, neg_ids, neg_lq, extra, neg_mask)
        elif as_pairs:
            r1, c1 = extra.nonzero().T
            r2, c2 = neg_mask.nonzero().T
            pairs = (torch.cat([r1, r2]), torch.cat([c1, c2 + n]))
            loss = in_batch_softmax_loss(u, v, ids, temperature=0.3, log_q=lq, weights=w, row_logq_scale=scale,
                                         neg_item=neg, neg_ids=neg_ids, neg_log_q=neg_lq, mask_pairs=pairs)
        else:
            loss = in_batch_softmax_loss(u, v, ids, temperature=0.3, log_q=lq, extra_mask=extra, weights=w,
                                         row_logq_scale=scale, neg_item=neg, neg_ids=neg_ids, neg_log_q=neg_lq,
                                         neg_mask=neg_mask)
        loss.backward()
        grads.append([loss.detach(), u.grad, v.grad, neg.grad])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_equal_pairs_and_known_positive_pairs_against_a_set_oracle(seed: int) -> None:
    from training.task import equal_pairs, known_positive_pairs

    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(5, (11,), generator=g), torch.randint(5, (7,), generator=g)
    rows, cols = equal_pairs(a, b)
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(i, j) for i in range(11) for j in range(7) if a[i] == b[j]]
    n_users, n_items = 6, 8
    clicks = {(int(x), int(y)) for x, y in zip(torch.randint(n_users - 1, (20,), generator=g), torch.randint(n_items, (20,), generator=g), strict=True)}
    pos_keys = torch.tensor(sorted(x * n_items + y for x, y in clicks), dtype=torch.int64)
    users, cands = torch.randint(n_users, (10,), generator=g), torch.randint(n_items, (12,), generator=g)
    rows, cols = known_positive_pairs(users, cands, pos_keys, n_items)
    want = [(i, j) for i in range(10) for j in range(12) if (int(users[i]), int(cands[j])) in clicks]
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == want
