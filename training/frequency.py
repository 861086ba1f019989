"""Item frequency estimation for the logQ correction: exact counts and a streaming estimator.

Exact: `exact_log_q` counts training clicks, log q_j = log(count_j / Σ counts) (an item with no
click is floored to one count so its log q stays finite).

Streaming (Yi et al. 2019, "Sampling-bias-corrected neural modeling", Algorithm 2): for data that
does not fit in memory, estimate for each item the average number of steps δ between two
consecutive occurrences; then p̂ = 1/δ is the per-step probability of seeing it. Two arrays of
size H indexed by a hash h(y):

    A[h(y)]  step at which y was last seen
    B[h(y)]  exponential moving average of the gap:  B ← (1 − α)·B + α·(t − A),  then A ← t

With several hash functions h_1..h_k (independent arrays A_i, B_i), a collision merges the
streams of two items, which makes the observed gaps *shorter* (frequency over-estimated); the
estimate therefore takes δ = max_i B_i[h_i(y)], the least-collided array (like a count-min
sketch takes the min count). With a batch of b items per step the estimate is a per-step rate:
p̂ / b is the probability of one row being that item.

Repeats of an item within a step are processed as the paper's sequential loop would: the first
has gap t − A, the others gap 0, i.e. c occurrences give B ← (1−α)^c·B + α(1−α)^{c−1}·(t − A).
"""

from __future__ import annotations

import numpy as np

_PRIME = 2_147_483_647  # 2^31 − 1


def exact_counts(item_rows: np.ndarray, n_items: int) -> np.ndarray:
    """Clicks per catalog row, float64 (n_items,)."""
    item_rows = np.asarray(item_rows)
    if len(item_rows) and (item_rows.min() < 0 or item_rows.max() >= n_items):
        raise ValueError(f"item rows must be in [0, {n_items}), got range [{item_rows.min()}, {item_rows.max()}]")
    return np.bincount(item_rows, minlength=n_items).astype(np.float64)


def exact_log_q(counts: np.ndarray) -> np.ndarray:
    """log(max(count, 1) / Σ counts): the in-batch proposal of each item (float64)."""
    c = np.asarray(counts, dtype=np.float64)
    return np.log(np.maximum(c, 1.0) / max(c.sum(), 1.0))


class StreamingFrequencyEstimator:
    """Yi et al. 2019 hashed frequency estimator (see module docstring).

    n_buckets: H, size of each hash array; n_hashes: k arrays (max over them at read time);
    alpha: EMA rate of the gap estimate.
    """

    def __init__(self, n_buckets: int = 1 << 20, n_hashes: int = 2, alpha: float = 0.01, seed: int = 0) -> None:
        if n_buckets < 1 or n_hashes < 1 or not 0 < alpha <= 1:
            raise ValueError(f"need n_buckets >= 1, n_hashes >= 1, 0 < alpha <= 1; got {n_buckets}, {n_hashes}, {alpha}")
        rng = np.random.default_rng(seed)
        self.n_buckets, self.n_hashes, self.alpha = n_buckets, n_hashes, alpha
        self._a = rng.integers(1, _PRIME, size=n_hashes, dtype=np.int64)
        self._b = rng.integers(0, _PRIME, size=n_hashes, dtype=np.int64)
        self.A = np.zeros((n_hashes, n_buckets), dtype=np.float64)
        self.B = np.zeros((n_hashes, n_buckets), dtype=np.float64)
        self.step = 0

    def _hash(self, ids: np.ndarray) -> np.ndarray:
        """(k, n) bucket of each id under each hash: ((a·x + b) mod p) mod H (universal hashing)."""
        x = np.asarray(ids, dtype=np.int64) % _PRIME
        return ((self._a[:, None] * x[None, :] + self._b[:, None]) % _PRIME) % self.n_buckets

    def update(self, ids: np.ndarray, step: int | None = None) -> None:
        """Observe the items of one step (a training batch); `step` defaults to the next one."""
        t = self.step + 1 if step is None else step
        self.step = t
        if len(ids) == 0:
            return
        a = self.alpha
        for i, buckets in enumerate(self._hash(ids)):
            uniq, c = np.unique(buckets, return_counts=True)
            gap = t - self.A[i, uniq]
            self.B[i, uniq] = (1 - a) ** c * self.B[i, uniq] + a * (1 - a) ** (c - 1) * gap
            self.A[i, uniq] = t

    def gap(self, ids: np.ndarray) -> np.ndarray:
        """δ̂ = max over hashes of B (0 for never-seen items)."""
        h = self._hash(ids)
        return np.max(self.B[np.arange(self.n_hashes)[:, None], h], axis=0)

    def probability(self, ids: np.ndarray) -> np.ndarray:
        """p̂ = 1/δ̂ per step (0 for never-seen items)."""
        d = self.gap(ids)
        return np.where(d > 0, 1.0 / np.maximum(d, 1e-300), 0.0)

    def log_q(self, ids: np.ndarray, batch_size: int, floor: float = 1e-9) -> np.ndarray:
        """log of the per-row probability p̂ / batch_size, floored (unseen items)."""
        return np.log(np.maximum(self.probability(ids) / batch_size, floor))
