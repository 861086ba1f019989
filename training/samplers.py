"""Negative samplers and positive re-sampling for the sampled-negative objectives.

Every sampler returns, for a batch of N (user, positive) rows, K negative item rows per row AND
the log probability that its proposal distribution gave each of them. The listwise objective
subtracts exactly that log q, so a mixture of samplers stays correctly corrected: each negative
carries the log q of the component that actually produced it (the mixture is stratified — a
fixed share of the K slots per component — so each stratum is an independent sample from its own
proposal and its own correction is the right one).

Samplers (proposal q over catalog rows 0..n_items−1):

* uniform: q(j) = 1 / n_items, every catalog item, clicked or not (tail and fresh items too).
* popularity: q(j) ∝ clicks_j^α (α = 0.75 as in word2vec: flattens the head, never-clicked items
  are never drawn).
* in-batch: another row's positive of the same batch; an item is in a batch in proportion to
  its clicks, so q(j) = clicks_j / Σ clicks (the same log q as in-batch softmax).
* hard: items the *current* model ranks inside a rank band (e.g. 20..100) for the user,
  excluding the user's training positives; mined with FAISS (exact inner product) over all item
  vectors and refreshed once per epoch; q(j) = 1 / |band| uniformly within the user's band. Ranks
  0..19 are skipped because the very top non-clicked items are often unlabelled positives
  (false negatives), which hurt more than they teach.
* mixture: e.g. 50% easy (popularity) / 50% hard.

Why exposures ("shown but not clicked", clicked = False) are never negatives here: retrieval
learns to separate what a user might want from the whole catalog, and its negatives must
represent that catalog (hence sampling + logQ). An exposed item passed an earlier retrieval
and ranking stage, so it is by construction close to the user's interests; treating it as a
negative teaches retrieval the *ranking* decision ("which of the good candidates gets the
click") and biases the candidate distribution towards whatever the old system showed. That
signal belongs to the ranking model. The EVAL.md split drops those rows before training (see
`training.split`), so no sampler here ever sees them; tests/training/test_samplers.py checks it.

Positive re-sampling: `positive_weights` (weight ∝ count^−β, mean 1 over clicks) down-weights
head clicks and up-weights tail ones; `keep_probability` is word2vec-style sub-sampling
(keep a click of an item with frequency f with probability min(1, sqrt(t / f))).
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

__all__ = [
    "HardNegativeSampler",
    "InBatchSampler",
    "MixtureSampler",
    "NegativeSampler",
    "PopularitySampler",
    "UniformSampler",
    "build_sampler",
    "keep_probability",
    "positive_weights",
]


class NegativeSampler:
    """Base class: `sample(user_idx, pos_ids, k, generator) -> (neg_ids (N, k), log_q (N, k))`."""

    wants_vectors = False  # whether `refresh` needs the current model's vectors each epoch

    def sample(
        self, user_idx: torch.Tensor, pos_ids: torch.Tensor, k: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def refresh(self, user_vecs: np.ndarray, item_vecs: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Called once per epoch with the current model's vectors (only hard mining uses it)."""


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"number of negatives must be >= 1, got {k}")


class UniformSampler(NegativeSampler):
    """q(j) = 1 / n_items over the whole catalog."""

    def __init__(self, n_items: int) -> None:
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        self.n_items = n_items

    def sample(self, user_idx, pos_ids, k, generator):
        _check_k(k)
        ids = torch.randint(0, self.n_items, (len(pos_ids), k), generator=generator).to(pos_ids.device)
        return ids, torch.full(ids.shape, -math.log(self.n_items), device=pos_ids.device)


class PopularitySampler(NegativeSampler):
    """q(j) = clicks_j^α / Σ clicks^α (items with no click are never drawn)."""

    def __init__(self, counts: np.ndarray, alpha: float = 0.75) -> None:
        w = np.asarray(counts, dtype=np.float64) ** alpha
        w[np.asarray(counts) <= 0] = 0.0
        if w.sum() <= 0:
            raise ValueError(f"popularity sampler needs at least one item with clicks; counts shape {np.shape(counts)}")
        self.probs = torch.from_numpy(w / w.sum())
        self.log_probs = torch.log(self.probs.clamp(min=1e-300)).float()

    def sample(self, user_idx, pos_ids, k, generator):
        _check_k(k)
        ids = torch.multinomial(self.probs, len(pos_ids) * k, replacement=True, generator=generator).view(-1, k)
        return ids.to(pos_ids.device), self.log_probs[ids].to(pos_ids.device)


class InBatchSampler(NegativeSampler):
    """Negatives are the positives of other rows of the batch; q(j) = clicks_j / Σ clicks."""

    def __init__(self, log_q_items: torch.Tensor) -> None:
        self.log_q_items = log_q_items

    def sample(self, user_idx, pos_ids, k, generator):
        _check_k(k)
        n = len(pos_ids)
        if n < 2:
            raise ValueError(f"in-batch sampling needs a batch of at least 2 rows, got {n}")
        j = torch.randint(0, n - 1, (n, k), generator=generator)
        j = j + (j >= torch.arange(n).unsqueeze(1)).long()  # skip the row itself: uniform over the others
        ids = pos_ids[j.to(pos_ids.device)]
        return ids, self.log_q_items.to(pos_ids.device)[ids]


class HardNegativeSampler(NegativeSampler):
    """Uniform within each user's band of model ranks [rank_lo, rank_hi), positives excluded.

    `refresh` mines the bands with FAISS `IndexFlatIP` (exact) over the current item vectors.
    Users without a band (before the first refresh, or whose band is empty) fall back to
    uniform-over-catalog, with that proposal's log q.
    """

    wants_vectors = True

    def __init__(self, n_items: int, pos_keys: np.ndarray, rank_lo: int = 20, rank_hi: int = 100) -> None:
        if not 0 <= rank_lo < rank_hi:
            raise ValueError(f"rank band must satisfy 0 <= lo < hi, got [{rank_lo}, {rank_hi})")
        self.n_items = n_items
        self.pos_keys = np.sort(np.asarray(pos_keys, dtype=np.int64))
        self.rank_lo, self.rank_hi = rank_lo, rank_hi
        self.band: torch.Tensor | None = None  # (n_users, hi − lo) item rows, −1 padded
        self.band_size: torch.Tensor | None = None  # (n_users,)
        self._uniform = UniformSampler(n_items)

    def refresh(self, user_vecs: np.ndarray, item_vecs: np.ndarray) -> None:
        if item_vecs.shape[0] != self.n_items or user_vecs.shape[1] != item_vecs.shape[1]:
            raise ValueError(f"user_vecs {user_vecs.shape} / item_vecs {item_vecs.shape} must be (U, d) / ({self.n_items}, d)")
        n_users = user_vecs.shape[0]
        max_pos = int(np.bincount(self.pos_keys // self.n_items, minlength=n_users).max()) if len(self.pos_keys) else 0
        k = min(self.n_items, self.rank_hi + max_pos)
        index = faiss.IndexFlatIP(item_vecs.shape[1])
        index.add(np.ascontiguousarray(item_vecs, dtype=np.float32))
        _, top = index.search(np.ascontiguousarray(user_vecs, dtype=np.float32), k)  # (U, k), best first
        keys = np.arange(n_users, dtype=np.int64)[:, None] * self.n_items + top
        pos = np.searchsorted(self.pos_keys, keys).clip(max=max(len(self.pos_keys) - 1, 0))
        is_pos = (self.pos_keys[pos] == keys) if len(self.pos_keys) else np.zeros_like(top, dtype=bool)
        keep = (top >= 0) & ~is_pos
        rank = np.cumsum(keep, axis=1) - 1  # rank among non-positives
        in_band = keep & (rank >= self.rank_lo) & (rank < self.rank_hi)
        width = self.rank_hi - self.rank_lo
        band = np.full((n_users, width), -1, dtype=np.int64)
        rows, cols = np.nonzero(in_band)
        band[rows, rank[rows, cols] - self.rank_lo] = top[rows, cols]
        self.band = torch.from_numpy(band)
        self.band_size = torch.from_numpy(in_band.sum(1).astype(np.int64))

    def sample(self, user_idx, pos_ids, k, generator):
        _check_k(k)
        ids, log_q = self._uniform.sample(user_idx, pos_ids, k, generator)
        if self.band is None or self.band_size is None:
            return ids, log_q
        u = user_idx.cpu().long()
        size = self.band_size[u]  # (N,)
        r = (torch.rand((len(u), k), generator=generator) * size.clamp(min=1).unsqueeze(1)).long()
        hard = self.band[u.unsqueeze(1), r]
        has = (size > 0).unsqueeze(1).to(ids.device)
        ids = torch.where(has, hard.to(ids.device), ids)
        hard_lq = -torch.log(size.clamp(min=1).double()).float().unsqueeze(1).to(ids.device)
        return ids, torch.where(has, hard_lq.expand_as(log_q), log_q)


class MixtureSampler(NegativeSampler):
    """Stratified mixture: component c fills a fixed share of the K slots (largest remainder)."""

    def __init__(self, components: list[tuple[NegativeSampler, float]]) -> None:
        fr = np.array([f for _, f in components], dtype=np.float64)
        if len(components) == 0 or (fr < 0).any() or fr.sum() <= 0:
            raise ValueError(f"mixture needs non-negative fractions with a positive sum, got {fr.tolist()}")
        self.components = [s for s, _ in components]
        self.fractions = fr / fr.sum()

    @property
    def wants_vectors(self) -> bool:  # type: ignore[override]
        return any(s.wants_vectors for s in self.components)

    def slots(self, k: int) -> list[int]:
        raw = self.fractions * k
        n = np.floor(raw).astype(int)
        for i in np.argsort(-(raw - n), kind="stable")[: k - n.sum()]:
            n[i] += 1
        return n.tolist()

    def sample(self, user_idx, pos_ids, k, generator):
        _check_k(k)
        parts = [s.sample(user_idx, pos_ids, n, generator) for s, n in zip(self.components, self.slots(k), strict=True) if n > 0]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    def refresh(self, user_vecs: np.ndarray, item_vecs: np.ndarray) -> None:
        for s in self.components:
            s.refresh(user_vecs, item_vecs)


SAMPLERS = ("uniform", "popularity", "in_batch", "hard", "mixture")


def build_sampler(
    name: str,
    *,
    counts: np.ndarray,
    pos_keys: np.ndarray,
    log_q_items: torch.Tensor,
    alpha: float = 0.75,
    rank_band: tuple[int, int] = (20, 100),
    hard_fraction: float = 0.5,
    easy: str = "popularity",
) -> NegativeSampler:
    """The sampler named in the training config (`negative_sampler`)."""
    n_items = len(counts)
    if name in ("hard", "mixture") and rank_band[0] >= n_items:
        # every user's band would be empty and each hard draw would fall back to uniform, silently
        raise ValueError(
            f"hard_rank_band {list(rank_band)} starts at rank {rank_band[0]}, beyond the catalog's {n_items} items; "
            f"choose a band within [0, {n_items})"
        )
    if name == "uniform":
        return UniformSampler(n_items)
    if name == "popularity":
        return PopularitySampler(counts, alpha)
    if name == "in_batch":
        return InBatchSampler(log_q_items)
    if name == "hard":
        return HardNegativeSampler(n_items, pos_keys, *rank_band)
    if name == "mixture":
        if easy in ("mixture", "hard"):
            raise ValueError(f"mixture_easy must be an easy sampler (uniform/popularity/in_batch), got {easy!r}")
        easy_s = build_sampler(easy, counts=counts, pos_keys=pos_keys, log_q_items=log_q_items, alpha=alpha)
        hard_s = HardNegativeSampler(n_items, pos_keys, *rank_band)
        return MixtureSampler([(easy_s, 1.0 - hard_fraction), (hard_s, hard_fraction)])
    raise ValueError(f"negative_sampler {name!r} is not one of {SAMPLERS}")


def positive_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """Per-item weight ∝ count^−β for its clicks, scaled so the mean over all clicks is 1.

    β = 0: all ones (off); β = 1: every item contributes the same total weight. Items without
    clicks get 0 (they are never positives).
    """
    c = np.asarray(counts, dtype=np.float64)
    w = np.where(c > 0, np.maximum(c, 1.0) ** -beta, 0.0)
    total = (c * w).sum()
    if total <= 0:
        raise ValueError(f"positive_weights: counts (shape {c.shape}) sum to zero")
    return w * c.sum() / total


def recency_weights(user_rows: np.ndarray, timestamps: np.ndarray, boost: float) -> np.ndarray:
    """Per-row weight 1 + boost · r, r ∈ [0, 1] the row's position in its user's clicks sorted by
    time (0 oldest, 1 newest; a single click gets 1), scaled so the mean is 1.

    Why: the next clicks of a user resemble their latest ones more than their first ones, so
    the loss leans towards each user's recent taste. boost = 0: all ones (off).
    """
    u = np.asarray(user_rows, dtype=np.int64)
    t = np.asarray(timestamps)
    if u.shape != t.shape:
        raise ValueError(f"user_rows {u.shape} and timestamps {t.shape} must have the same shape")
    if boost < 0:
        raise ValueError(f"recency boost must be >= 0, got {boost}")
    if boost == 0 or len(u) == 0:
        return np.ones(len(u))
    order = np.lexsort((t, u))             # by user, then time (stable among ties)
    su = u[order]
    starts = np.r_[0, np.flatnonzero(su[1:] != su[:-1]) + 1]
    lens = np.diff(np.r_[starts, len(su)])
    pos = np.arange(len(su)) - np.repeat(starts, lens)
    n = np.repeat(lens, lens)
    r = np.empty(len(u))
    r[order] = np.where(n > 1, pos / np.maximum(n - 1, 1), 1.0)
    w = 1.0 + boost * r
    return w / w.mean()


def keep_probability(counts: np.ndarray, t: float) -> np.ndarray:
    """Sub-sampling of head clicks: keep with min(1, sqrt(t / f)), f = count / Σ counts; t ≤ 0: keep all."""
    c = np.asarray(counts, dtype=np.float64)
    if t <= 0:
        return np.ones_like(c)
    f = c / max(c.sum(), 1.0)
    return np.where(f > 0, np.minimum(1.0, np.sqrt(t / np.maximum(f, 1e-300))), 1.0)
