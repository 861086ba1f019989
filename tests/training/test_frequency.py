"""Exact counts and the Yi et al. 2019 streaming frequency estimator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.frequency import StreamingFrequencyEstimator, exact_counts, exact_log_q


def test_exact_counts_and_log_q() -> None:
    c = exact_counts(np.array([0, 2, 2, 2]), 4)
    assert c.tolist() == [1.0, 0.0, 3.0, 0.0]
    assert exact_log_q(c) == pytest.approx([math.log(1 / 4), math.log(1 / 4), math.log(3 / 4), math.log(1 / 4)])
    with pytest.raises(ValueError, match=r"\[0, 4\).*\[0, 7\]"):
        exact_counts(np.array([0, 7]), 4)


def test_update_by_hand() -> None:
    est = StreamingFrequencyEstimator(n_buckets=1 << 12, n_hashes=1, alpha=0.5)
    est.update(np.array([5]), step=2)   # B = 0.5·0 + 0.5·(2 − 0) = 1
    est.update(np.array([5]), step=6)   # B = 0.5·1 + 0.5·(6 − 2) = 2.5
    assert est.gap(np.array([5]))[0] == pytest.approx(2.5)
    assert est.probability(np.array([5, 6]))[0] == pytest.approx(0.4)
    assert est.probability(np.array([6]))[0] == 0.0  # never seen (no collision in 4096 buckets)


def test_repeats_within_a_step_equal_the_sequential_loop() -> None:
    a = StreamingFrequencyEstimator(n_buckets=64, n_hashes=2, alpha=0.1, seed=3)
    b = StreamingFrequencyEstimator(n_buckets=64, n_hashes=2, alpha=0.1, seed=3)
    rng = np.random.default_rng(0)
    for t in range(1, 50):
        batch = rng.integers(0, 20, size=6)
        a.update(batch, step=t)
        for y in batch:  # the paper's per-item loop
            b.update(np.array([y]), step=t)
    assert np.allclose(a.B, b.B) and np.allclose(a.A, b.A)


def _stream_error(n_buckets: int, n_hashes: int, steps: int = 6000, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    n = 30
    p = 1.0 / np.arange(1, n + 1) ** 1.1
    p /= p.sum()
    est = StreamingFrequencyEstimator(n_buckets=n_buckets, n_hashes=n_hashes, alpha=0.01, seed=2)
    for _ in range(steps):
        est.update(rng.choice(n, size=batch, p=p))
    return est.probability(np.arange(n)) / batch, p


def test_streaming_converges_to_true_frequencies() -> None:
    got, p = _stream_error(n_buckets=4096, n_hashes=2)
    frequent = p >= 0.02  # ≥ ~960 occurrences: the EMA has forgotten its zero start
    rel = np.abs(got[frequent] - p[frequent]) / p[frequent]
    assert rel.max() < 0.2 and rel.mean() < 0.08, (rel, p[frequent])


def test_max_over_hashes_reduces_collision_overestimate() -> None:
    got1, p = _stream_error(n_buckets=8, n_hashes=1)
    got4, _ = _stream_error(n_buckets=8, n_hashes=4)
    err1 = np.abs(np.log(got1 / p)).mean()
    err4 = np.abs(np.log(got4 / p)).mean()
    assert (got1 >= p * 0.8).mean() > 0.9  # collisions only ever merge streams: over-estimates
    assert err4 < err1, (err1, err4)
