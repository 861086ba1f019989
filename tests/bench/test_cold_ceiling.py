"""Feature-conditioned popularity: the scores by hand, a planted segment found, the report written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bench.cold_ceiling import Ranker, evaluate_ranker, main, segment_popularity
from bench.common import user_popularity
from training.split import split_interactions


def test_user_popularity_counts_every_user_once() -> None:
    # user 0 clicked items 0, 1; user 1 clicked item 1 three times; user 2 clicked item 2
    users = np.array([0, 0, 1, 1, 1, 2])
    items = np.array([0, 1, 1, 1, 1, 2])
    np.testing.assert_allclose(user_popularity(users, items, 4), [0.5, 1.5, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"item codes must lie in 0\.\.3, got 0\.\.4"):
        user_popularity(users, np.array([0, 1, 1, 1, 1, 4]), 4)
    with pytest.raises(ValueError, match="equal 1-d arrays"):
        user_popularity(users, items[:-1], 4)


@pytest.mark.parametrize("beta", [0.0, 1.0, 4.0])
def test_segment_popularity_shrinks_toward_everyone_by_beta(beta: float) -> None:
    users = np.array([0, 0, 1, 2])
    items = np.array([0, 1, 1, 2])
    segment = np.array([0, 0, 0, 1])  # users 0, 1 in segment 0; user 2 in segment 1
    p = np.array([0.5, 1.5, 1.0]) / 3
    seg0 = np.array([0.5, 1.5, 0.0])  # C_0, over m_0 = 2 users
    seg1 = np.array([0.0, 0.0, 1.0])  # m_1 = 1
    out = segment_popularity(users, items, segment, 3, 2, beta)
    np.testing.assert_allclose(out[0], (seg0 + beta * p) / (2 + beta))
    np.testing.assert_allclose(out[1], (seg1 + beta * p) / (1 + beta))
    np.testing.assert_allclose(out[2], p)  # unseen segment: the population
    with pytest.raises(ValueError, match="beta must be >= 0, got -1"):
        segment_popularity(users, items, segment, 3, 2, -1.0)


def planted(n_users: int = 200, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Users whose one categorical feature decides which half of the 60-item catalog they click;
    group a clicks three times as much, so per-click popularity ranks its half first. Cold users
    (id % 10 == 0) are all in group b."""
    rng = np.random.default_rng(seed)
    rows, users = [], []
    for u in range(1, n_users + 1):
        group = "a" if u % 2 else "b"
        users.append({"user_id": str(u), "group": group, "age": float(rng.integers(18, 60))})
        own = range(0, 30) if group == "a" else range(30, 60)
        for t, i in enumerate(rng.choice(list(own), 4, replace=False)):
            rows.append({"user_id": str(u), "item_id": f"i{i}", "timestamp": t})
    inter = pd.DataFrame(rows)
    # group a clicks a lot more per user, so per-click popularity favours its items
    heavy = inter[inter["item_id"].isin([f"i{i}" for i in range(30)])]
    return pd.concat([inter, heavy, heavy]), pd.DataFrame(users)


def test_a_planted_segment_beats_popularity_and_an_uninformative_feature_does_not() -> None:
    inter, users = planted()
    split = split_interactions(inter)
    items = pd.Index([f"i{i}" for i in range(60)])
    assert split.cold["user_id"].nunique() == 20
    per_click = evaluate_ranker(Ranker("pop", per_click=True), split, items, users, ["age"])
    per_user = evaluate_ranker(Ranker("pop"), split, items, users, ["age"])
    by_group = evaluate_ranker(Ranker("group", ("group",), 0.0), split, items, users, ["age"])
    by_age = evaluate_ranker(Ranker("age", ("age",), 5.0), split, items, users, ["age"])
    assert per_click["recall@20"] == 0.0  # its top 20 are all group a's items
    assert by_group["recall@20"] > 0.5  # 20 of group b's 30 items, ranked by group b's clicks
    assert abs(by_age["recall@20"] - per_user["recall@20"]) < (by_group["recall@20"] - per_user["recall@20"]) / 2
    assert by_group["users"] == 20 and by_group["se_recall@20"] > 0.0


def test_main_writes_both_reports(tiny_dataset, tmp_path) -> None:
    assert main(["--data", str(tiny_dataset), "--out", str(tmp_path), "--buckets", "3", "7"]) == 0
    report = json.loads((tmp_path / "cold_ceiling.json").read_text(encoding="utf-8"))
    val = report["validation"]["rows"]
    assert [r["ranker"] for r in report["test"]["rows"]][:2] == [val[0]["ranker"], val[1]["ranker"]]
    chosen = max(val[2:], key=lambda r: r["recall@20"])
    assert report["chosen_on_validation"] == chosen["ranker"] == report["test"]["rows"][2]["ranker"]
    assert all(0.0 <= r["recall@20"] <= 1.0 and r["users"] > 0 for r in val + report["test"]["rows"])
    assert report["validation"]["buckets"] == [3, 7] and len(report["validation"]["splits"]) == 2
    gain = report["validation"]["chosen_minus_popularity_each_user_once"]
    assert gain["mean"] == pytest.approx(chosen["recall@20"] - val[1]["recall@20"], abs=2e-4)
    with pytest.raises(SystemExit):
        main(["--data", str(tiny_dataset), "--out", str(tmp_path), "--buckets", "12"])
    text = (tmp_path / "cold_ceiling.md").read_text(encoding="utf-8")
    assert "(chosen)" in text and report["command"] in text
