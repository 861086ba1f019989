"""Each sampler's distribution (statistical tests with tolerances) and its log q."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.samplers import (
    HardNegativeSampler,
    InBatchSampler,
    MixtureSampler,
    PopularitySampler,
    UniformSampler,
    build_sampler,
    keep_probability,
    positive_weights,
    recency_weights,
)

N_DRAWS = 20_000


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _freq(ids: torch.Tensor, n: int) -> np.ndarray:
    return np.bincount(ids.reshape(-1).numpy(), minlength=n) / ids.numel()


def test_uniform_distribution_and_log_q() -> None:
    s = UniformSampler(5)
    ids, lq = s.sample(torch.zeros(N_DRAWS // 4, dtype=torch.long), torch.zeros(N_DRAWS // 4, dtype=torch.long), 4, _gen())
    assert ids.shape == (N_DRAWS // 4, 4)
    assert np.abs(_freq(ids, 5) - 0.2).max() < 0.015  # ~5σ for n = 20000
    assert torch.allclose(lq, torch.full_like(lq, -math.log(5)))


def test_popularity_alpha_distribution() -> None:
    counts = np.array([1.0, 8.0, 27.0, 0.0])
    s = PopularitySampler(counts, alpha=1 / 3)  # weights 1, 2, 3, 0 → q = 1/6, 2/6, 3/6, 0
    z = torch.zeros(N_DRAWS, dtype=torch.long)
    ids, lq = s.sample(z, z, 1, _gen())
    want = np.array([1, 2, 3, 0]) / 6
    assert np.abs(_freq(ids, 4) - want).max() < 0.02
    assert _freq(ids, 4)[3] == 0.0  # never-clicked items are never drawn
    assert torch.allclose(lq, torch.log(torch.tensor(want, dtype=torch.float32))[ids], atol=1e-6)
    with pytest.raises(ValueError, match="at least one item with clicks"):
        PopularitySampler(np.zeros(3))


def test_in_batch_sampler_never_picks_its_own_row() -> None:
    log_q_items = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    s = InBatchSampler(log_q_items)
    pos = torch.tensor([1, 2, 2, 3])
    ids, lq = s.sample(torch.arange(4), pos, 3000, _gen())
    # row 0's candidates are rows 1, 2, 3 → items 2 (w.p. 2/3) and 3 (1/3); never item 1
    f0 = _freq(ids[0], 4)
    assert f0[1] == 0.0 and abs(f0[2] - 2 / 3) < 0.04 and abs(f0[3] - 1 / 3) < 0.04
    # row 1 (item 2): rows 0, 2, 3 → items 1, 2, 3 each 1/3 (item 2 is an accidental hit, masked later)
    assert np.abs(_freq(ids[1], 4)[1:] - 1 / 3).max() < 0.04
    assert torch.equal(lq, log_q_items[ids])
    with pytest.raises(ValueError, match="at least 2 rows, got 1"):
        s.sample(torch.arange(1), pos[:1], 2, _gen())


def _ring(n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Items at increasing angles from the user's direction: model rank of item j is j."""
    ang = np.linspace(0, 2.5, n_items)
    items = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
    users = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    return users, items


def test_hard_negatives_rank_band_excludes_positives() -> None:
    n_items = 10
    # user 0 clicked items 1 and 3 → non-positive ranking 0, 2, 4, 5, 6, ...; band [2, 5) = items 4, 5, 6
    pos_keys = np.array([0 * n_items + 1, 0 * n_items + 3])
    s = HardNegativeSampler(n_items, pos_keys, rank_lo=2, rank_hi=5)
    u = torch.zeros(N_DRAWS // 10, dtype=torch.long)
    ids, lq = s.sample(u, u, 10, _gen())  # before any refresh: uniform fallback
    assert torch.allclose(lq, torch.full_like(lq, -math.log(n_items)))
    s.refresh(*_ring(n_items))
    assert s.band is not None and s.band[0].tolist() == [4, 5, 6]
    assert s.band[1].tolist() == [2, 3, 4]  # user 1 has no positives
    ids, lq = s.sample(u, u, 10, _gen())
    f = _freq(ids, n_items)
    assert set(np.nonzero(f)[0]) == {4, 5, 6} and np.abs(f[[4, 5, 6]] - 1 / 3).max() < 0.02
    assert torch.allclose(lq, torch.full_like(lq, -math.log(3)))


def test_hard_band_shorter_than_requested() -> None:
    s = HardNegativeSampler(5, np.array([0 * 5 + 0]), rank_lo=2, rank_hi=100)
    s.refresh(*_ring(5))
    assert int(s.band_size[0]) == 2 and s.band[0, :2].tolist() == [3, 4]  # non-positives 1, 2, 3, 4
    ids, lq = s.sample(torch.zeros(100, dtype=torch.long), torch.zeros(100, dtype=torch.long), 4, _gen())
    assert set(ids.reshape(-1).tolist()) <= {3, 4}
    assert torch.allclose(lq, torch.full_like(lq, -math.log(2)))


def test_mixture_keeps_each_component_log_q() -> None:
    n_items = 10
    hard = HardNegativeSampler(n_items, np.array([1, 3]), rank_lo=2, rank_hi=5)
    hard.refresh(*_ring(n_items))
    mix = MixtureSampler([(UniformSampler(n_items), 0.5), (hard, 0.5)])
    assert mix.slots(4) == [2, 2] and mix.slots(3) == [2, 1]
    u = torch.zeros(500, dtype=torch.long)
    ids, lq = mix.sample(u, u, 4, _gen())
    assert ids.shape == lq.shape == (500, 4)
    assert torch.allclose(lq[:, :2], torch.full((500, 2), -math.log(n_items)))
    assert torch.allclose(lq[:, 2:], torch.full((500, 2), -math.log(3)))
    assert set(ids[:, 2:].reshape(-1).tolist()) <= {4, 5, 6}
    b = build_sampler("mixture", counts=np.ones(n_items), pos_keys=np.array([1]), log_q_items=torch.zeros(n_items),
                      hard_fraction=0.25, easy="uniform", rank_band=(2, 5))
    assert isinstance(b, MixtureSampler) and b.slots(4) == [3, 1]
    with pytest.raises(ValueError, match="negative_sampler 'hardest' is not one of"):
        build_sampler("hardest", counts=np.ones(3), pos_keys=np.array([]), log_q_items=torch.zeros(3))


def test_positive_resampling_by_hand() -> None:
    w = positive_weights(np.array([1.0, 4.0, 0.0]), beta=0.5)
    # raw weights 1, 1/2, 0; mean over the 5 clicks = (1 + 4·0.5)/5 = 0.6
    assert w == pytest.approx([1 / 0.6, 0.5 / 0.6, 0.0])
    assert positive_weights(np.array([3.0, 5.0]), beta=0.0) == pytest.approx([1.0, 1.0])
    p = keep_probability(np.array([90.0, 10.0]), t=0.01)
    assert p == pytest.approx([math.sqrt(0.01 / 0.9), math.sqrt(0.01 / 0.1)])
    assert keep_probability(np.array([90.0, 10.0]), t=0.0) == pytest.approx([1.0, 1.0])


def test_recency_weights_by_hand() -> None:
    # user 0 clicked at t=5, 3, 9 (rows 0, 2, 3): positions 1/2, 0, 1; users 1 and 2 once (r = 1)
    w = recency_weights(np.array([0, 1, 0, 0, 2]), np.array([5, 1, 3, 9, 4]), boost=1.0)
    raw = np.array([1.5, 2.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(w, raw / raw.mean())
    assert recency_weights(np.array([3, 3]), np.array([1, 2]), boost=0.0).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="same shape"):
        recency_weights(np.array([0, 1]), np.array([1]), boost=1.0)
    with pytest.raises(ValueError, match=">= 0, got -1"):
        recency_weights(np.array([0]), np.array([1]), boost=-1.0)


@pytest.mark.parametrize("name", ["hard", "mixture"])
def test_a_hard_band_beyond_the_catalog_is_an_error(name: str) -> None:
    """The default band [20, 100) on a 15-item catalog left every user's band empty, so each hard
    draw fell back to uniform without a word."""
    with pytest.raises(ValueError, match=r"hard_rank_band \[20, 100\] starts at rank 20, beyond the catalog's 15 items"):
        build_sampler(name, counts=np.ones(15), pos_keys=np.array([1]), log_q_items=torch.zeros(15), rank_band=(20, 100))
    assert build_sampler(name, counts=np.ones(15), pos_keys=np.array([1]), log_q_items=torch.zeros(15), rank_band=(5, 100))
