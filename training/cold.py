"""Cold-start calibration: refit the user tower's out-of-vocabulary id row, every user counting once.

A user the model has never seen is served from their features alone: the tower runs with the
OOV id row (the row id dropout trains) next to the feature embeddings. During training that
path learns from id-dropped rows, i.e. per *click*, at the sharp training temperature, so heavy
users dominate it. The cold-start metric (EVAL.md) averages recall *per user*, and most users
are light users whose clicks concentrate on widely liked items. On ML-100K's pseudo-cold
validation users (bench/cold_validation.py) a ranking by popularity in which every training user
counts once beats per-click popularity (recall@20 0.140 against 0.128), and the trained cold path
sat at per-click popularity's level (0.129); calibrated, it reaches 0.143.

This step, run after training, fits only the OOV id row (id_dim numbers) so that features-only
user vectors maximize the softmax likelihood of each user's clicks, with a user drawn uniformly
and then one of their clicks uniformly (so each user counts once), at its own, softer
temperature. Every other weight is frozen, so warm users, items and the index are untouched:
users in the id vocabulary never use the OOV row (an id rarer than `min_count` does, and is a
cold user in effect). Serving stays a plain cosine; the calibrated row is part of
the saved weights like any other.

The softmax runs over the whole catalog when it has at most `candidates` items; else over the
positive plus `candidates` items drawn uniformly (fresh every step), whose sampling correction
is a constant and drops out of the softmax. 4,096 (it was 16,384): the calibration fits one
64-number row, 300 steps × 4,096 draws still see 1.2M negatives, and the (1024, 4097) logits
made the step 4× cheaper (at 1M items the calibration took 89 s of the 15 s budget for the
work after training). ML-100K (1,682 items) uses its whole catalog either way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from training.model import Tower


def calibrate_cold_start(
    user_tower: Tower,
    item_tower: Tower,
    users: dict[str, torch.Tensor],
    items: dict[str, torch.Tensor],
    click_users: np.ndarray,
    click_items: np.ndarray,
    *,
    steps: int,
    temperature: float,
    batch_users: int = 1024,
    candidates: int = 4096,
    lr: float = 1e-2,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Fit `user_tower.id_emb.weight[0]` (the OOV row) in place; return the loss every step.

    `users`: the encoded user table (its "id" column is ignored: every row is embedded as OOV);
    `items`: the encoded catalog. `click_users[j]`, `click_items[j]`: row numbers into those two
    tables of training click j. Only rows of users with at least one click are drawn.
    """
    if steps < 0 or temperature <= 0 or batch_users < 1 or candidates < 1 or lr <= 0:
        raise ValueError(
            f"cold-start calibration needs steps >= 0, temperature > 0, batch_users >= 1, candidates >= 1, lr > 0; "
            f"got steps={steps}, temperature={temperature}, batch_users={batch_users}, candidates={candidates}, lr={lr}"
        )
    cu, ci = np.asarray(click_users, np.int64), np.asarray(click_items, np.int64)
    if cu.shape != ci.shape or cu.ndim != 1:
        raise ValueError(f"click_users {cu.shape} and click_items {ci.shape} must be equal-length 1-d arrays")
    if steps == 0 or len(cu) == 0:
        return []
    device = user_tower.id_emb.weight.device
    n_items = len(items["id"])
    gen = generator or torch.Generator().manual_seed(0)

    # CSR of clicks per user: a uniform user, then a uniform click of theirs.
    order = np.argsort(cu, kind="stable")
    who, starts, counts = np.unique(cu[order], return_index=True, return_counts=True)
    who_t, starts_t, counts_t = (torch.from_numpy(a) for a in (who, starts, counts))
    clicks_t = torch.from_numpy(ci[order])

    was = user_tower.training, item_tower.training
    user_tower.eval()
    item_tower.eval()
    vecs = item_tower.embed_encoded(items)
    emb = user_tower.id_emb.weight
    oov = torch.nn.Parameter(emb[0].detach().clone())
    opt = torch.optim.Adam([oov], lr=lr)
    losses: list[float] = []
    try:
        for _ in range(steps):
            pick = torch.randint(len(who), (batch_users,), generator=gen)
            nth = (torch.rand(batch_users, generator=gen) * counts_t[pick]).long()
            rows = who_t[pick].to(device)
            pos = clicks_t[starts_t[pick] + nth].to(device)
            batch = {k: v[rows] for k, v in users.items() if k != "id"}
            offset = (oov - emb[0].detach()).expand(batch_users, -1)  # id row 0 + (oov − row 0) = oov
            batch["id"] = torch.zeros(batch_users, dtype=torch.long, device=device)
            u = user_tower(batch, offset, None)
            if n_items <= candidates:
                loss = F.cross_entropy(u @ vecs.T / temperature, pos)
            else:
                neg = torch.randint(n_items, (candidates,), generator=gen).to(device)
                pos_logit = (u * vecs[pos]).sum(-1, keepdim=True) / temperature
                neg_logit = (u @ vecs[neg].T / temperature).masked_fill(neg.unsqueeze(0) == pos.unsqueeze(1), float("-inf"))
                loss = -F.log_softmax(torch.cat([pos_logit, neg_logit], dim=1), dim=1)[:, 0].mean()
            (oov.grad,) = torch.autograd.grad(loss, [oov])  # the towers' own .grad stay untouched
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            emb[0].copy_(oov.detach())
    finally:
        user_tower.train(was[0])
        item_tower.train(was[1])
    return losses
