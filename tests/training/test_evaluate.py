"""EVAL.md metrics against hand-computed values and a brute-force oracle."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from training.dataset import read_dataset
from training.evaluate import METRICS, evaluate_model, ranking_metrics, topk_excluding
from training.split import split_interactions


def test_ranking_metrics_by_hand() -> None:
    top = np.array([[3, 1, 4, 0, 2], [0, 1, 2, 3, 4]])
    truth = [np.array([1, 2]), np.array([4])]
    is_tail = np.array([False, False, True, False, True])
    m = ranking_metrics(top, truth, is_tail, n_items=10, ks=(2, 5))
    assert m["recall@2"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["recall@5"] == pytest.approx(1.0)
    d = 1 / np.log2(np.arange(2, 7))
    ndcg2_u0 = d[1] / (d[0] + d[1])
    ndcg5_u0 = (d[1] + d[4]) / (d[0] + d[1])
    ndcg5_u1 = d[4] / d[0]
    assert m["ndcg@2"] == pytest.approx(ndcg2_u0 / 2)
    assert m["ndcg@5"] == pytest.approx((ndcg5_u0 + ndcg5_u1) / 2)
    assert m["coverage@20"] == pytest.approx(5 / 10)
    # tail items 2 and 4 are both in the top 100 of their users
    assert m["tail_recall@100"] == pytest.approx(1.0)


def test_tail_recall_skips_users_without_tail_items() -> None:
    top = np.tile(np.arange(200), (2, 1))
    is_tail = np.zeros(300, dtype=bool)
    is_tail[[150, 250]] = True
    m = ranking_metrics(top, [np.array([0]), np.array([150, 250])], is_tail, n_items=300)
    assert m["tail_recall@100"] == 0.0  # user 0 skipped; user 1: neither tail item in top-100
    assert m["recall@100"] == pytest.approx((1 + 0) / 2)
    assert math.isclose(m["coverage@20"], 20 / 300)


def test_a_catalog_smaller_than_k_is_ranked_whole() -> None:
    """30 items and K = 100: every list holds the whole catalog, so recall@100 is 1."""
    top = np.tile(np.arange(30)[::-1], (2, 1))
    m = ranking_metrics(top, [np.array([29, 0]), np.array([5])], np.zeros(30, dtype=bool), n_items=30)
    assert m["recall@100"] == 1.0
    assert m["recall@20"] == pytest.approx((0.5 + 0.0) / 2)  # item 0 is ranked 30th, item 5 25th
    d = 1 / np.log2(np.arange(2, 32))
    assert m["ndcg@100"] == pytest.approx(((d[0] + d[29]) / (d[0] + d[1]) + d[24] / d[0]) / 2)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_topk_excluding_matches_oracle(k: int) -> None:
    rng = np.random.default_rng(k)
    u, it = rng.normal(size=(7, 4)).astype(np.float32), rng.normal(size=(30, 4)).astype(np.float32)
    excl = [rng.choice(30, size=rng.integers(0, 5), replace=False) for _ in range(7)]
    got = topk_excluding(u, it, k, excl, chunk=3)
    for r in range(7):
        s = u[r] @ it.T
        s[excl[r]] = -np.inf
        want = np.argsort(-s, kind="stable")[: min(k, 30)]
        n_left = min(k, 30 - len(excl[r]))
        np.testing.assert_allclose(s[got[r][:n_left]], s[want[:n_left]], rtol=1e-6)
        assert not set(got[r].tolist()) & set(excl[r].tolist())
        assert (got[r][n_left:] == -1).all()  # fewer items left than k: empty slots, not excluded items


def test_an_excluded_item_is_never_a_hit_in_a_small_catalog() -> None:
    """5 items, K = 20, the user's one test item is also one of their train items (a re-click):
    ranked without the train items, it cannot be recommended, so recall is 0, not 1."""
    items = np.eye(5, dtype=np.float32)
    user = np.array([[1.0, 0.5, 0.4, 0.3, 0.2]], dtype=np.float32)
    top = topk_excluding(user, items, 20, [np.array([0, 1, 2, 3])])
    assert top.tolist() == [[4, -1, -1, -1, -1]]
    m = ranking_metrics(top, [np.array([0])], np.zeros(5, dtype=bool), n_items=5, ks=(20,))
    assert m["recall@20"] == 0.0 and m["ndcg@20"] == 0.0
    assert m["coverage@20"] == pytest.approx(1 / 5)  # only item 4 was shown


def test_every_metric_key_is_reported_even_without_cold_users(tiny_bundle, tiny_dataset) -> None:
    """The CLI contract lists the warm keys and the same keys prefixed cold_: a dataset without
    cold users still gets all of them, the cold ones as None (undefined, not 0)."""
    dataset = read_dataset(tiny_dataset)
    split = split_interactions(dataset.interactions)
    with_cold = evaluate_model(tiny_bundle.model, dataset, split)
    no_cold = evaluate_model(tiny_bundle.model, dataset, dataclasses.replace(split, cold=split.cold.iloc[:0]))
    want = list(METRICS) + [f"cold_{m}" for m in METRICS]
    assert list(with_cold) == list(no_cold) == want
    assert all(isinstance(with_cold[m], float) for m in want)
    assert all(no_cold[f"cold_{m}"] is None for m in METRICS)
    assert {m: no_cold[m] for m in METRICS} == {m: with_cold[m] for m in METRICS}
