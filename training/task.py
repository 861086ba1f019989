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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
) -> torch.Tensor:
    """Mean (weighted) cross-entropy of cos/τ − log q over the batch, positives on the diagonal.

    user, item: (N, d) unit vectors; item_ids: (N,) catalog ids of the positives; log_q: (N,)
    log sampling probability of each in-batch item; extra_mask: (N, N) bool of more logits to
    drop (e.g. other known positives of the user); weights: (N,) per-example weights.
    """
    if user.shape != item.shape:
        raise ValueError(f"user {tuple(user.shape)} and item {tuple(item.shape)} batches must have equal shapes")
    logits = user @ item.T / temperature
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    mask = accidental_hit_mask(item_ids, item_ids)
    if extra_mask is not None:
        mask = mask | (extra_mask & ~torch.eye(len(item_ids), dtype=torch.bool, device=mask.device))
    logits = logits.masked_fill(mask, NEG_INF)
    labels = torch.arange(len(user), device=user.device)
    losses = F.cross_entropy(logits, labels, reduction="none")
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum().clamp(min=1e-12)


@dataclass
class RetrievalTask:
    """Configured objective: call it with tower outputs and the batch's ids to get the loss."""

    temperature: float = 0.05
    logq: bool = True
    logq_weight: float = 1.0  # 1.0 = the exact correction; <1 interpolates towards none

    def __call__(
        self,
        user: torch.Tensor,
        item: torch.Tensor,
        item_ids: torch.Tensor,
        log_q: torch.Tensor | None,
        extra_mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        lq = log_q * self.logq_weight if (self.logq and log_q is not None) else None
        return in_batch_softmax_loss(
            user, item, item_ids, temperature=self.temperature, log_q=lq, extra_mask=extra_mask, weights=weights
        )
