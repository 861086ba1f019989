"""Retrieval objectives: the loss, the logQ correction and accidental-hit masking.

Like TFRS's `tasks.Retrieval`, one small object owns the math that turns tower outputs into a
loss, so the fit loop never touches logits. Every function here is pure over tensors and is
unit-tested against values computed by hand.

In-batch softmax (Yi et al. 2019): for a batch of N (user, positive item) pairs, every other
positive in the batch is a negative for user i. Popular items are over-represented among those
negatives (an item appears as a negative in proportion to its clicks), which biases the model
against them; the logQ correction subtracts `log p_j` (p_j ∝ the item's training clicks) from
each logit, turning the sampled softmax into an unbiased estimate of the full softmax. The
correction exists in training only: serving scores are plain cosines (invariant 1).

Accidental hits: when the same item occurs twice in a batch, row i would treat its own positive
(at column j ≠ i) as a negative. Those logits are masked to -inf.

Sampled-negative objectives take, per row i, the user vector a_i, the positive b⁺_i and K
negatives b⁻_ik drawn by a sampler (`training.samplers`), with s⁺ = cos(a_i, b⁺_i) and
s⁻_k = cos(a_i, b⁻_ik). `neg_mask` (N, K) marks negatives to ignore: accidental hits (the
negative is the positive, or another known positive of the user; see `known_positive_mask`).

* pointwise: binary cross-entropy with logits s/τ, label 1 for the positive and 0 for each
  negative — it pushes cos(a, b⁺) → +1 and cos(a, b⁻) → −1. Per row the mean over its 1 + K'
  labelled pairs (K' unmasked negatives).
* triplet hinge: max(0, s⁻ − s⁺ + m), mean over the unmasked negatives of the row.
* triplet logistic: log(1 + exp(σ (s⁻ − s⁺))) (a smooth hinge), same averaging.
* listwise: softmax over [s⁺/τ, s⁻_1/τ − log q_1, …], loss −log p(positive). Subtracting each
  negative's log proposal probability log q_k (from the distribution that drew it) makes the
  sampled softmax a consistent estimate of the full softmax (Bengio & Senécal 2008); the
  positive is given, not drawn, so by default it is not corrected (pass `pos_log_q` to do so).

The pointwise and pairwise losses are not softmax estimators and take no logQ term: their
negatives' distribution *is* the training signal, which is why the sampler choice matters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from training.config import DEFAULT_MIXED_NEGATIVES
from training.distributed import ONE_PROCESS, Ranks
from training.frequency import StreamingFrequencyEstimator, exact_log_q
from training.samplers import NegativeSampler, build_sampler

if TYPE_CHECKING:
    from training.config import TrainConfig

NEG_INF = -1e9  # finite "minus infinity": keeps softmax gradients NaN-free when a row is all masked


def accidental_hit_mask(pos_ids: torch.Tensor, cand_ids: torch.Tensor) -> torch.Tensor:
    """(N, M) bool: candidate j has the same id as row i's positive.

    For in-batch softmax cand_ids == pos_ids and the diagonal (the true positive) is excluded.
    """
    mask = pos_ids.unsqueeze(1) == cand_ids.unsqueeze(0)
    if pos_ids.shape == cand_ids.shape and torch.equal(pos_ids, cand_ids):
        mask.fill_diagonal_(False)
    return mask


def in_batch_softmax_loss(
    user: torch.Tensor,
    item: torch.Tensor,
    item_ids: torch.Tensor,
    *,
    temperature: float,
    log_q: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    row_logq_scale: torch.Tensor | None = None,
    neg_item: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    neg_log_q: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    mask_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean (weighted) cross-entropy of cos/τ − log q over the batch, positives on the diagonal.

    user, item: (N, d) unit vectors; item_ids: (N,) catalog ids of the positives; log_q: (N,)
    log sampling probability of each in-batch item; extra_mask: (N, N) bool of more logits to
    drop (e.g. other known positives of the user); weights: (N,) per-example weights;
    row_logq_scale: (N,) multiplies row i's logQ term (see `RetrievalTask.cold_logq_weight`).

    Mixed negative sampling (Yang et al. 2020): `neg_item` (M, d) with ids `neg_ids` (M,) are
    M more candidates shared by every row (e.g. drawn uniformly from the catalog), appended as
    columns after the N in-batch ones; `neg_log_q` (M,) is their correction (required with
    `log_q`), `neg_mask` (N, M) more of their logits to drop. A column equal to the row's
    positive is always masked (an accidental hit). `mask_pairs` (rows, columns): more logits
    to drop given as index pairs into the (N, N + M) logits (what `known_positive_pairs` gives),
    the cheap form of `extra_mask` / `neg_mask` for a real batch.
    """
    if user.shape != item.shape:
        raise ValueError(f"user {tuple(user.shape)} and item {tuple(item.shape)} batches must have equal shapes")
    cand, cand_ids = item, item_ids
    if neg_item is not None:
        if neg_ids is None or neg_item.dim() != 2 or neg_item.shape[1] != item.shape[1] or neg_ids.shape != neg_item.shape[:1]:
            got = None if neg_ids is None else tuple(neg_ids.shape)
            raise ValueError(f"neg_item {tuple(neg_item.shape)} must be (M, {item.shape[1]}) with neg_ids (M,); got neg_ids {got}")
        if log_q is not None and (neg_log_q is None or neg_log_q.shape != neg_ids.shape):
            raise ValueError(f"with log_q, neg_log_q must be given with shape {tuple(neg_ids.shape)}")
        cand, cand_ids = torch.cat([item, neg_item]), torch.cat([item_ids, neg_ids])
        if log_q is not None:
            log_q = torch.cat([log_q, neg_log_q])
    n = len(item_ids)
    if neg_mask is not None and (neg_item is None or neg_mask.shape != (n, len(neg_ids))):
        raise ValueError(f"neg_mask {tuple(neg_mask.shape)} needs neg_item and shape ({n}, M)")
    # logits_ij = <u_i, c_j> / τ − s_i · log q_j as ONE matrix product of width d + 1: the
    # (N, N + M) matrix is the step's largest tensor, and the division, the outer product and
    # the subtraction done on it separately (forward and backward) were most of a step's time.
    scaled = user / temperature
    if log_q is not None:
        s = torch.ones_like(log_q[: len(user)]) if row_logq_scale is None else row_logq_scale.to(user.dtype)
        a, c = torch.cat([scaled, -s.unsqueeze(1)], 1), torch.cat([cand, log_q.to(cand.dtype).unsqueeze(1)], 1)
    else:
        a, c = scaled, cand
    # The masked logits as (row, column) pairs, not an (N, N + M) bool matrix: a batch has a
    # few thousand of them among its ~2M logits, and every dense pass over that matrix counts.
    parts = [equal_pairs(item_ids, cand_ids)]
    if mask_pairs is not None:
        parts.append(mask_pairs)
    if extra_mask is not None:
        parts.append(tuple(extra_mask.nonzero().T))
    if neg_mask is not None:
        r, k = neg_mask.nonzero().T
        parts.append((r, k + n))
    rows, cols = (torch.cat([p[i].long() for p in parts]) for i in (0, 1))
    off_diagonal = rows != cols  # the positive is never masked
    losses = SoftmaxCrossEntropy.apply(a, c, rows[off_diagonal], cols[off_diagonal])
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum().clamp(min=1e-12)


class SoftmaxCrossEntropy(torch.autograd.Function):
    """Per-row −log softmax(a cᵀ with the masked logits at NEG_INF)[i, i]: the in-batch softmax's
    cross-entropy with the positives on the diagonal, from the two factors of its logits.

    One autograd node instead of the product, the mask, the log-sum-exp and the diagonal each
    keeping their own (N, N + M) tensors and passes: forward is the product, the masked entries
    written in place, one fused `log_softmax`; backward is one `exp` of it (the softmax P),
    P_ii − 1 on the diagonal, and the two products (P ∘ g) c and (P ∘ g)ᵀ a with the row
    weights g applied to the thin factors. A masked logit has P = 0 exactly, so its gradient is
    zero, as with `masked_fill`. Tested against the autograd of the plain formula.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, c: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = a @ c.T
        if len(rows):
            logits.index_put_((rows, cols), torch.tensor(NEG_INF, dtype=logits.dtype, device=logits.device))
        log_p = torch.log_softmax(logits, 1)
        del logits
        ctx.save_for_backward(a, c, log_p, rows, cols)
        return -log_p.diagonal()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        a, c, log_p, rows, cols = ctx.saved_tensors
        # P = exp(log_p), computed as softmax(log_p) (the same P: each row of exp(log_p) already
        # sums to 1). torch's fused softmax kernel is one vectorized pass and handles the very
        # negative entries (masked logits, results below e^-87) without the slow scalar path
        # that `exp` takes on them; the former `log_p.clamp(min=-87.0).exp_()` was two passes
        # and, with the scalar clamp, ~20 % of a 1M-item step (torch.profiler, issue 19). The
        # masked entries' exact zeros are put back after.
        p = torch.softmax(log_p, 1)
        if len(rows):
            p.index_put_((rows, cols), torch.zeros((), dtype=p.dtype, device=p.device))
        p.diagonal().sub_(1.0)  # d(lse_i − logit_ii)/d logit_ij = P_ij − [i = j]
        g = grad.unsqueeze(1)
        grad_a = (p @ c) * g if ctx.needs_input_grad[0] else None
        grad_c = p.T @ (a * g) if ctx.needs_input_grad[1] else None
        return grad_a, grad_c, None, None


def equal_pairs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (i, j) with a[i] == b[j], as two int64 index tensors ordered by i then j: a sort of
    `b` and two binary searches per element of `a`, O((|a| + |b|) log |b| + pairs), no |a|×|b| matrix."""
    b_sorted, order = torch.sort(b, stable=True)
    lo = torch.searchsorted(b_sorted, a)
    count = torch.searchsorted(b_sorted, a, right=True) - lo
    rows = torch.repeat_interleave(torch.arange(len(a), device=a.device), count)
    first = torch.cumsum(count, 0) - count
    cols = order[lo[rows] + torch.arange(len(rows), device=a.device) - first[rows]]
    return rows, cols


def mixed_log_q(log_p: torch.Tensor, batch_size: int, n_uniform: int, n_items: int) -> torch.Tensor:
    """log of the expected number of times each item appears among the candidates of a
    mixed-negative batch: `batch_size` in-batch positives drawn ∝ clicks (probability p) plus
    `n_uniform` items drawn uniformly from `n_items`, i.e. log(B·p + M/n).

    With two proposals in one softmax, each candidate's correction must come from the mixture
    that actually produced the candidate set (an item can arrive by either route); with
    M = 0 it is log p + log B, and the constant log B cancels in the softmax.
    """
    if batch_size < 1 or n_uniform < 0 or n_items < 1:
        raise ValueError(f"need batch_size >= 1, n_uniform >= 0, n_items >= 1; got {batch_size}, {n_uniform}, {n_items}")
    return torch.logaddexp(log_p + math.log(batch_size), torch.full_like(log_p, math.log(n_uniform / n_items) if n_uniform else -math.inf))


def known_positive_mask(
    user_idx: torch.Tensor, cand_ids: torch.Tensor, pos_keys: torch.Tensor, n_items: int
) -> torch.Tensor:
    """Bool mask, shape of `cand_ids`: the user of that row clicked the candidate in training.

    user_idx: (N,) user rows; cand_ids: (N, M) candidate item rows (or (M,), shared by every row);
    pos_keys: sorted 1-D int64 tensor of `user * n_items + item` for every training positive.
    No dense user×item matrix. Per-row candidates: a binary search per cell, O(N·M·log P).
    Shared candidates (the in-batch softmax's N×N mask): the rows' own positives are gathered
    and looked up among the distinct candidates instead, O(Σ clicks of the batch's users ·
    log M), unless the batch's users have more clicks than the mask has cells. On ML-100K that
    is ~65 k lookups instead of 1 M and cut a training step by about 40 %; both give the same mask.
    """
    if cand_ids.dim() == 1 and len(pos_keys):
        mask = _shared_candidates_mask(user_idx, cand_ids, pos_keys, n_items)
        if mask is not None:
            return mask
    if cand_ids.dim() == 1:
        cand_ids = cand_ids.unsqueeze(0).expand(len(user_idx), -1)
    if cand_ids.dim() != 2 or cand_ids.shape[0] != user_idx.shape[0]:
        raise ValueError(f"cand_ids {tuple(cand_ids.shape)} must be (N, M) or (M,) with N = len(user_idx) = {len(user_idx)}")
    if len(pos_keys) == 0:
        return torch.zeros(cand_ids.shape, dtype=torch.bool, device=cand_ids.device)
    keys = user_idx.unsqueeze(1).long() * n_items + cand_ids.long()
    pos = torch.searchsorted(pos_keys, keys).clamp(max=len(pos_keys) - 1)
    return pos_keys[pos] == keys


def _shared_candidates_mask(
    user_idx: torch.Tensor, cand_ids: torch.Tensor, pos_keys: torch.Tensor, n_items: int
) -> torch.Tensor | None:
    """`known_positive_mask` for one candidate list shared by all rows (`known_positive_pairs`
    as a matrix); None where that gathers more keys than the mask has cells."""
    pairs = known_positive_pairs(user_idx, cand_ids, pos_keys, n_items)
    if pairs is None:
        return None
    mask = torch.zeros(len(user_idx), len(cand_ids), dtype=torch.bool, device=cand_ids.device)
    mask[pairs] = True
    return mask


def known_positive_pairs(
    user_idx: torch.Tensor, cand_ids: torch.Tensor, pos_keys: torch.Tensor, n_items: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The True cells of `known_positive_mask(user_idx, cand_ids, ...)` for one candidate list
    shared by all rows, as (rows, columns) index tensors, without the (N, M) matrix.

    Each distinct user's positives are a contiguous run of the sorted keys: they are gathered
    once per user, matched against the candidates (`equal_pairs`), and each hit is repeated
    for every row of that user. None when the batch's users have more clicks than the mask has
    cells (then a per-cell search is cheaper).
    """
    users, user_of_row = torch.unique(user_idx.long(), return_inverse=True)
    base = users * n_items
    start = torch.searchsorted(pos_keys, base)
    length = torch.searchsorted(pos_keys, base + n_items) - start
    total = int(length.sum())
    if total > len(user_idx) * len(cand_ids):
        return None
    device = users.device
    which = torch.repeat_interleave(torch.arange(len(users), device=device), length)
    offset = torch.arange(total, device=device) - torch.repeat_interleave(torch.cumsum(length, 0) - length, length)
    items = pos_keys[start[which] + offset] - base[which]
    hit, col = equal_pairs(items, cand_ids.long())
    hit_user = which[hit]
    # every row of the hit's user: the rows grouped by user, each hit repeated per row
    row_order = torch.sort(user_of_row, stable=True).indices
    per_user = torch.bincount(user_of_row, minlength=len(users))
    first_row = torch.cumsum(per_user, 0) - per_user
    repeat = per_user[hit_user]
    k = torch.repeat_interleave(torch.arange(len(hit_user), device=device), repeat)
    within = torch.arange(len(k), device=device) - (torch.cumsum(repeat, 0) - repeat)[k]
    return row_order[first_row[hit_user[k]] + within], col[k]


def sampled_hit_mask(
    pos_ids: torch.Tensor,
    neg_ids: torch.Tensor,
    user_idx: torch.Tensor | None = None,
    pos_keys: torch.Tensor | None = None,
    n_items: int | None = None,
) -> torch.Tensor:
    """(N, K) accidental hits among sampled negatives: equal to the row's positive, or (when
    `user_idx`, `pos_keys`, `n_items` are given) any other training positive of the user."""
    if neg_ids.dim() != 2 or neg_ids.shape[0] != pos_ids.shape[0]:
        raise ValueError(f"neg_ids {tuple(neg_ids.shape)} must be (N, K) with N = len(pos_ids) = {len(pos_ids)}")
    mask = neg_ids == pos_ids.unsqueeze(1)
    if user_idx is not None and pos_keys is not None and n_items is not None:
        mask = mask | known_positive_mask(user_idx, neg_ids, pos_keys, n_items)
    return mask


def _check_sampled(user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, neg_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate shapes; return the (N, K) bool keep-mask of negatives."""
    if user.shape != pos.shape or user.dim() != 2:
        raise ValueError(f"user {tuple(user.shape)} and positive {tuple(pos.shape)} must both be (N, d)")
    if neg.dim() != 3 or neg.shape[0] != user.shape[0] or neg.shape[2] != user.shape[1]:
        raise ValueError(f"negatives {tuple(neg.shape)} must be (N, K, d) = ({user.shape[0]}, K, {user.shape[1]})")
    if neg_mask is None:
        return torch.ones(neg.shape[:2], dtype=torch.bool, device=neg.device)
    if neg_mask.shape != neg.shape[:2]:
        raise ValueError(f"neg_mask {tuple(neg_mask.shape)} must be (N, K) = {tuple(neg.shape[:2])}")
    return ~neg_mask


def _pair_scores(user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s⁺ (N,) and s⁻ (N, K): cosines of unit vectors."""
    return (user * pos).sum(-1), torch.einsum("nd,nkd->nk", user, neg)


def _weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return losses.mean()
    if weights.shape != losses.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must be (N,) = {tuple(losses.shape)}")
    return (losses * weights).sum() / weights.sum().clamp(min=1e-12)


def pointwise_loss(
    user: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    temperature: float,
    neg_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy on logits cos/τ: positive labelled 1, each negative labelled 0.

    BCE(s/τ, 1) = softplus(−s/τ) and BCE(s/τ, 0) = softplus(s/τ); row loss is their mean over the
    positive and the unmasked negatives; the batch loss the (weighted) mean of rows.
    """
    keep = _check_sampled(user, pos, neg, neg_mask)
    sp, sn = _pair_scores(user, pos, neg)
    neg_terms = (F.softplus(sn / temperature) * keep).sum(1)
    rows = (F.softplus(-sp / temperature) + neg_terms) / (1 + keep.sum(1))
    return _weighted_mean(rows, weights)


def _pairwise(per_pair: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over each row's unmasked negatives (0 for a row with none), then over rows."""
    rows = (per_pair * keep).sum(1) / keep.sum(1).clamp(min=1)
    return _weighted_mean(rows, weights)


def triplet_hinge_loss(
    user: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    margin: float,
    neg_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """max(0, cos(a,b⁻) + m − cos(a,b⁺)): zero once the positive beats each negative by m."""
    keep = _check_sampled(user, pos, neg, neg_mask)
    sp, sn = _pair_scores(user, pos, neg)
    return _pairwise(F.relu(sn + margin - sp.unsqueeze(1)), keep, weights)


def triplet_logistic_loss(
    user: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    sigma: float,
    neg_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """log(1 + exp(σ(cos(a,b⁻) − cos(a,b⁺)))): BPR-style, a smooth hinge with scale σ."""
    keep = _check_sampled(user, pos, neg, neg_mask)
    sp, sn = _pair_scores(user, pos, neg)
    return _pairwise(F.softplus(sigma * (sn - sp.unsqueeze(1))), keep, weights)


def listwise_loss(
    user: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    temperature: float,
    neg_log_q: torch.Tensor | None = None,
    pos_log_q: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """−log softmax([s⁺/τ − log q⁺, s⁻_k/τ − log q_k])[0], masked negatives dropped.

    neg_log_q: (N, K) log proposal probability of each negative under the sampler that drew it;
    pos_log_q: (N,) optional correction of the positive (off by default: it is not sampled).
    """
    keep = _check_sampled(user, pos, neg, neg_mask)
    sp, sn = _pair_scores(user, pos, neg)
    lp, ln = sp / temperature, sn / temperature
    if neg_log_q is not None:
        if neg_log_q.shape != sn.shape:
            raise ValueError(f"neg_log_q {tuple(neg_log_q.shape)} must be (N, K) = {tuple(sn.shape)}")
        ln = ln - neg_log_q
    if pos_log_q is not None:
        lp = lp - pos_log_q
    logits = torch.cat([lp.unsqueeze(1), ln.masked_fill(~keep, NEG_INF)], dim=1)
    rows = -torch.log_softmax(logits, dim=1)[:, 0]
    return _weighted_mean(rows, weights)


# ---- objectives: the registry the config validates against -----------------------------------


@dataclass(frozen=True)
class Objective:
    """An objective as the rest of the trainer sees it: its name, whether it trains on sampled
    negatives (else the in-batch softmax's), and its rules on the training config."""

    name: str
    sampled: bool

    def check_config(self, cfg: TrainConfig) -> None:
        """Raise ValueError for settings this objective would ignore or fail on mid-training."""
        if not self.sampled:
            return
        batch_negatives = cfg.negative_sampler == "in_batch" or (
            cfg.negative_sampler == "mixture" and cfg.mixture_easy == "in_batch"
        )
        if batch_negatives and cfg.batch_size < 2:
            raise ValueError(f"batch_size={cfg.batch_size}: in-batch negatives need batches of >= 2 rows")
        if cfg.frequency == "streaming":
            raise ValueError(
                f"frequency='streaming' estimates the in-batch softmax's logQ; objective {self.name!r} "
                "takes its logQ from its sampler's own distribution (leave frequency 'exact')"
            )
        if cfg.mixed_negatives:
            raise ValueError(
                f"mixed_negatives={cfg.mixed_negatives}: applies to objective 'in_batch_softmax' only "
                f"({self.name!r} takes its negatives from negative_sampler)"
            )


OBJECTIVES: dict[str, Objective] = {
    "in_batch_softmax": Objective("in_batch_softmax", sampled=False),
    "pointwise": Objective("pointwise", sampled=True),
    "triplet_hinge": Objective("triplet_hinge", sampled=True),
    "triplet_logistic": Objective("triplet_logistic", sampled=True),
    "listwise": Objective("listwise", sampled=True),
}


@dataclass
class Batch:
    """One training step's rows after the towers ran (what `RetrievalTask.batch_loss` scores).

    `users` / `items`: user-table and catalog rows of the N (user, positive) pairs; `user_vecs`,
    `item_vecs` (N, d) their tower outputs; `weights` (N,) per-row loss weights; `user_dropped`
    (N,) bool, the rows whose user id was dropped to OOV this step (None: id dropout off).
    """

    users: torch.Tensor
    items: torch.Tensor
    user_vecs: torch.Tensor
    item_vecs: torch.Tensor
    weights: torch.Tensor
    user_dropped: torch.Tensor | None = None


@dataclass
class RetrievalTask:
    """The configured objective: loss, logQ correction, accidental-hit masking, negatives.

    Called directly it is pure math over tensors: `task(user, item, ids, log_q, ...)` is the
    in-batch softmax, `task.sampled(user, pos, neg, ...)` the objective over K sampled negatives.
    Built by `build_task` it also holds what a training step needs from the training data (the
    catalog's log q, the known positives, the negative sampler, the mixed negatives), and
    `batch_loss(batch, embed_items)` turns one step's tower outputs into its loss — the fit loop
    calls nothing else, so a new objective is a change to this module alone.
    """

    temperature: float = 0.05
    logq: bool = True
    logq_weight: float = 1.0  # 1.0 = the exact correction; <1 interpolates towards none
    objective: str = "in_batch_softmax"
    margin: float = 0.2       # triplet hinge margin m (in cosine units)
    sigma: float = 10.0       # triplet logistic scale σ
    cold_logq_weight: float | None = None  # logQ weight of rows trained without their id (None: logq_weight)
    # ---- training state (build_task) --------------------------------------------------------
    n_items: int = 0
    log_q_items: torch.Tensor | None = None  # (n_items,) log p of each catalog row under the in-batch proposal
    pos_keys: torch.Tensor | None = None     # sorted user * n_items + item of every training positive
    mask_user_positives: bool = True         # also mask candidates the user clicked elsewhere
    mixed_negatives: int = 0                 # in-batch softmax: uniform catalog candidates per step (MNS)
    stream: StreamingFrequencyEstimator | None = None  # streamed logQ instead of `log_q_items`
    sampler: NegativeSampler | None = None   # sampled objectives: the proposal of the K negatives
    num_negatives: int = 0
    generator: torch.Generator | None = None  # every draw of negatives (CPU, seeded)
    ranks: Ranks = ONE_PROCESS               # data-parallel ranks: the global batch is every rank's rows (training/distributed.py)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {tuple(OBJECTIVES)}")

    @property
    def uses_sampled_negatives(self) -> bool:
        return OBJECTIVES[self.objective].sampled

    # ---- one training step ------------------------------------------------------------------
    def start_epoch(self, vectors: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
        """Per-epoch hook: a hard-negative sampler re-mines its bands with the current model's
        (user, item) vectors; `vectors` is only called when the sampler needs them."""
        if self.sampler is not None and self.sampler.wants_vectors:
            self.sampler.refresh(*vectors())

    def batch_loss(self, batch: Batch, embed_items: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The loss of one step. `embed_items(rows)` runs the item tower on catalog rows (the
        negatives that are not the batch's own positives)."""
        if self.uses_sampled_negatives:
            return self._sampled_batch_loss(batch, embed_items)
        return self._in_batch_loss(batch, embed_items)

    def _in_batch_loss(self, batch: Batch, embed_items: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """In-batch softmax, logQ ∝ clicks (exact or streamed), + M uniform catalog items shared by
        the batch (MNS); the user's other clicks are masked among the in-batch and the uniform
        candidates in one lookup.

        Over W ranks the batch is the global one: each rank scores its own rows against every
        rank's positives (gathered with autograd) + the same M uniform items; masks, logQ and the
        streaming estimator see the gathered ids in rank order, the mixture correction the
        global batch size, and the loss is rescaled to the rank's share of the global weight."""
        if self.log_q_items is None or self.pos_keys is None or self.generator is None:
            raise ValueError("batch_loss needs a task made by build_task (log_q_items, pos_keys, generator)")
        bu, bi = batch.users, batch.items
        device = bi.device
        ranks = self.ranks
        all_bi = ranks.gather_plain(bi)  # the global batch's positives (bi itself in one process)
        n_batch = len(all_bi)
        n_mixed, n_items = self.mixed_negatives, self.n_items
        neg = torch.randint(n_items, (n_mixed,), generator=self.generator).to(device) if n_mixed else None
        cands = all_bi if neg is None else torch.cat([all_bi, neg])
        known = None  # the user's other clicks among the candidates, as (row, column) pairs
        if self.mask_user_positives and len(self.pos_keys):
            known = known_positive_pairs(bu, cands, self.pos_keys, n_items)
            if known is None:  # heavy users: the per-cell search
                known = tuple(known_positive_mask(bu, cands, self.pos_keys, n_items).nonzero().T)
        lq = self.log_q_items[all_bi]
        if self.stream is not None:
            self.stream.update(all_bi.cpu().numpy())
            lq = torch.from_numpy(self.stream.log_q(all_bi.cpu().numpy(), n_batch)).float().to(device)
        nlq = None
        if neg is not None:  # logQ of the mixture
            nlq = self.log_q_items[neg]
            if self.stream is not None:
                nlq = torch.from_numpy(self.stream.log_q(neg.cpu().numpy(), n_batch)).float().to(device)
            lq, nlq = (mixed_log_q(x, n_batch, n_mixed, n_items) for x in (lq, nlq))
        if ranks.world == 1:
            mns = {} if neg is None else {"neg_item": embed_items(neg), "neg_ids": neg, "neg_log_q": nlq}
            return self(batch.user_vecs, batch.item_vecs, bi, lq, weights=batch.weights,
                        id_dropped=batch.user_dropped, mask_pairs=known, **mns)
        # W ranks: the rank's own positives stay the in-batch block (its diagonal holds the
        # positives); the other ranks' positives join the uniform items as shared candidates —
        # the same logits as the one-process row, in another column order (`column` maps a
        # candidate's place in `cands` to its logit column, for the mask pairs).
        own = ranks.local(torch.arange(n_batch, device=device))
        other = ranks.others(len(bi), device)
        column = torch.empty(len(cands), dtype=torch.long, device=device)
        column[own] = torch.arange(len(bi), device=device)
        column[other] = len(bi) + torch.arange(len(other), device=device)
        column[n_batch:] = len(bi) + len(other) + torch.arange(len(cands) - n_batch, device=device)
        shared_vecs = ranks.gather(batch.item_vecs)[other]
        shared_ids, shared_lq = all_bi[other], lq[other]
        if neg is not None:
            shared_vecs, shared_ids = torch.cat([shared_vecs, embed_items(neg)]), torch.cat([shared_ids, neg])
            shared_lq = torch.cat([shared_lq, nlq])
        loss = self(batch.user_vecs, batch.item_vecs, bi, lq[own], weights=batch.weights, id_dropped=batch.user_dropped,
                    neg_item=shared_vecs, neg_ids=shared_ids, neg_log_q=shared_lq,
                    mask_pairs=None if known is None else (known[0], column[known[1]]))
        return ranks.scale_loss(loss, batch.weights, len(bi))

    def _sampled_batch_loss(self, batch: Batch, embed_items: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """K sampled negatives per row, each with the log q of the sampler that drew it."""
        if self.sampler is None or self.generator is None:
            raise ValueError(f"objective {self.objective!r} needs a task made by build_task (sampler, generator)")
        bu, bi = batch.users, batch.items
        # Over W ranks: the global batch's draws (the in-batch sampler's too), each rank its
        # rows; every rank embeds the global batch's distinct negatives, so the item tower's id
        # dropout draws what one process draws (W times the negatives' tower cost).
        ranks = self.ranks
        every, neg_lq = self.sampler.sample(ranks.gather_plain(bu), ranks.gather_plain(bi), self.num_negatives, self.generator)
        neg, neg_lq = ranks.local(every), ranks.local(neg_lq)
        # The item tower runs once per distinct negative: B·K draws from a small catalog
        # repeat items many times (ML-100K: 20,480 draws, at most 1,682 items).
        uniq, inv = torch.unique(every.reshape(-1), return_inverse=True)
        vn = embed_items(uniq)[ranks.local(inv.view(every.shape))].view(*neg.shape, -1)
        hits = sampled_hit_mask(bi, neg, bu if self.mask_user_positives else None, self.pos_keys, self.n_items)
        loss = self.sampled(batch.user_vecs, batch.item_vecs, vn, neg_log_q=neg_lq, neg_mask=hits, weights=batch.weights)
        return ranks.scale_loss(loss, batch.weights, len(bi))

    # ---- the math -----------------------------------------------------------------------------
    def sampled(
        self,
        user: torch.Tensor,
        pos: torch.Tensor,
        neg: torch.Tensor,
        *,
        neg_log_q: torch.Tensor | None = None,
        neg_mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of the configured sampled-negative objective; user/pos (N, d), neg (N, K, d)."""
        if self.objective == "pointwise":
            return pointwise_loss(user, pos, neg, temperature=self.temperature, neg_mask=neg_mask, weights=weights)
        if self.objective == "triplet_hinge":
            return triplet_hinge_loss(user, pos, neg, margin=self.margin, neg_mask=neg_mask, weights=weights)
        if self.objective == "triplet_logistic":
            return triplet_logistic_loss(user, pos, neg, sigma=self.sigma, neg_mask=neg_mask, weights=weights)
        if self.objective == "listwise":
            lq = neg_log_q * self.logq_weight if (self.logq and neg_log_q is not None) else None
            return listwise_loss(
                user, pos, neg, temperature=self.temperature, neg_log_q=lq, neg_mask=neg_mask, weights=weights
            )
        raise ValueError(f"objective {self.objective!r} takes in-batch negatives: call the task, not .sampled()")

    def __call__(
        self,
        user: torch.Tensor,
        item: torch.Tensor,
        item_ids: torch.Tensor,
        log_q: torch.Tensor | None,
        extra_mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        id_dropped: torch.Tensor | None = None,
        *,
        neg_item: torch.Tensor | None = None,
        neg_ids: torch.Tensor | None = None,
        neg_log_q: torch.Tensor | None = None,
        neg_mask: torch.Tensor | None = None,
        mask_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """In-batch softmax loss. `id_dropped` (N,) bool marks rows whose user id was dropped to
        OOV (features only); with `cold_logq_weight` set their logQ term uses that weight.
        `neg_*`: mixed negative sampling, see `in_batch_softmax_loss`."""
        use_q = self.logq and log_q is not None
        lq = log_q if use_q else None
        nlq = neg_log_q if use_q else None
        scale = None
        if lq is not None and id_dropped is not None and self.cold_logq_weight is not None:
            scale = torch.where(id_dropped, self.cold_logq_weight, self.logq_weight).to(lq.dtype)
        elif lq is not None:
            lq = lq * self.logq_weight
            nlq = None if nlq is None else nlq * self.logq_weight
        return in_batch_softmax_loss(
            user, item, item_ids, temperature=self.temperature, log_q=lq, extra_mask=extra_mask, weights=weights,
            row_logq_scale=scale, neg_item=neg_item, neg_ids=neg_ids, neg_log_q=nlq, neg_mask=neg_mask,
            mask_pairs=mask_pairs,
        )


def build_task(
    cfg: TrainConfig, counts: np.ndarray, pos_keys: torch.Tensor, generator: torch.Generator, device: torch.device | str,
    ranks: Ranks = ONE_PROCESS,
) -> RetrievalTask:
    """The task of `cfg` over a catalog with training `counts` per row and the sorted `pos_keys`
    (user * n_items + item) of the training positives; `ranks`: the data-parallel ranks."""
    n_items = len(counts)
    objective = OBJECTIVES[cfg.objective]
    log_q = torch.from_numpy(exact_log_q(counts)).float().to(device)
    sampler = None
    if objective.sampled:
        sampler = build_sampler(
            cfg.negative_sampler, counts=counts, pos_keys=pos_keys.cpu().numpy(), log_q_items=log_q,
            alpha=cfg.popularity_alpha, rank_band=tuple(cfg.hard_rank_band),
            hard_fraction=cfg.mixture_hard_fraction, easy=cfg.mixture_easy,
        )
    n_mixed = cfg.mixed_negatives
    if n_mixed is None:  # the default: MNS with the in-batch softmax (chosen on the nested validation)
        n_mixed = 0 if objective.sampled else min(DEFAULT_MIXED_NEGATIVES, n_items)
    stream = None
    if cfg.frequency == "streaming":
        stream = StreamingFrequencyEstimator(cfg.stream_buckets, cfg.stream_hashes, cfg.stream_alpha, seed=cfg.seed)
    return RetrievalTask(
        temperature=cfg.model.temperature, logq=cfg.logq, logq_weight=cfg.logq_weight,
        objective=cfg.objective, margin=cfg.triplet_margin, sigma=cfg.logistic_sigma,
        cold_logq_weight=cfg.cold_logq_weight, n_items=n_items, log_q_items=log_q, pos_keys=pos_keys,
        mask_user_positives=cfg.mask_user_positives, mixed_negatives=n_mixed, stream=stream, sampler=sampler,
        num_negatives=cfg.num_negatives, generator=generator, ranks=ranks,
    )
