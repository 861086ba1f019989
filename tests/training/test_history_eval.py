"""The EVAL.md request-time history protocols and their fold-in anchors (training/history_eval.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.dataset import read_dataset
from training.history_eval import PROTOCOLS, evaluate_history, history_anchors, history_protocols
from training.prepare import prepare_movielens_100k
from training.split import split_interactions

ITEMS = [f"i{j}" for j in range(8)]


def _clicks(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


@pytest.fixture
def split():
    """Cold users 10 (5 clicks, one timestamp tie) and 20 (2 clicks); warm users 1 (10 clicks:
    8 train, 2 test) and 2 (5 clicks: 4 train, 1 test -> not in warm_fresh)."""
    rows = [("10", "i3", 5), ("10", "i1", 5), ("10", "i0", 1), ("10", "i7", 9), ("10", "retired", 7)]
    rows += [("20", "i2", 1), ("20", "i4", 2)]
    rows += [("1", f"i{j % 8}", t) for j, t in zip([0, 1, 2, 3, 4, 5, 6, 7, 5, 1], range(10), strict=True)]
    rows += [("2", f"i{j}", t) for j, t in zip([7, 6, 5, 4, 3], range(5), strict=True)]
    return split_interactions(_clicks(rows))


def test_cold_protocols_reveal_the_first_clicks_in_eval_order(split) -> None:
    p = history_protocols(split, ITEMS, revealed=(1, 3), fresh_history=50)
    assert set(p) == {"cold_m1", "cold_m3", "warm_fresh"}
    # user 10 in (timestamp, item id) order: i0@1, i1@5, i3@5, retired@7, i7@9
    m1, m3 = p["cold_m1"], p["cold_m3"]
    assert m1.user_ids == ["10", "20"] and m3.user_ids == ["10"]  # user 20 has only 2 clicks
    assert m1.history == [["i0"], ["i2"]]
    assert m3.history == [["i0", "i1", "i3"]]
    np.testing.assert_array_equal(m3.exclude[0], [0, 1, 3])
    np.testing.assert_array_equal(m3.fold_in_rows[0], [0, 1, 3])
    np.testing.assert_array_equal(m3.relevant[0], [7])  # the retired item can be neither ranked nor hit
    np.testing.assert_array_equal(m1.relevant[1], [4])


def test_warm_fresh_reveals_half_of_the_test_clicks(split) -> None:
    p = history_protocols(split, ITEMS, revealed=(), fresh_history=4)["warm_fresh"]
    # user 1: 10 clicks -> test = last ceil(2) = (i5@8, i1@9); revealed floor(2/2) = 1 -> i5
    assert p.user_ids == ["1"]
    assert p.history == [["i5", "i6", "i7", "i5"]]  # last 4 of train (i0..i7) + revealed, oldest first
    np.testing.assert_array_equal(p.exclude[0], [0, 1, 2, 3, 4, 5, 6, 7])  # train + revealed
    np.testing.assert_array_equal(p.relevant[0], [1])  # a re-click of a train item: excluded, a miss


def test_bad_lengths_are_refused(split) -> None:
    with pytest.raises(ValueError, match="fresh_history must be >= 1, got 0"):
        history_protocols(split, ITEMS, fresh_history=0)
    with pytest.raises(ValueError, match="revealed history lengths must be >= 1, got 0"):
        history_protocols(split, ITEMS, revealed=(0,))


def test_evaluate_history_passes_the_request_history_and_applies_exclusions(split) -> None:
    protocols = history_protocols(split, ITEMS, revealed=(1,), fresh_history=50)
    item_vecs = np.eye(len(ITEMS), dtype=np.float32)
    seen: list[tuple[list[str], list[list[str]]]] = []

    def oracle(user_ids, histories):  # points at the relevant items, and more at the excluded ones
        seen.append((list(user_ids), [list(h) for h in histories]))
        p = next(p for p in protocols.values() if p.user_ids == list(user_ids))
        out = np.zeros((len(user_ids), len(ITEMS)), np.float32)
        for j in range(len(user_ids)):
            out[j, p.relevant[j]] = 1.0
            out[j, p.exclude[j]] = 2.0
        return out

    res = evaluate_history(oracle, item_vecs, protocols, np.ones(len(ITEMS), bool))
    assert seen[0] == (["10", "20"], [["i0"], ["i2"]])
    assert res["cold_m1"]["recall@20"] == 1.0 and res["cold_m1"]["users"] == 2
    assert res["warm_fresh"]["recall@20"] == 0.0  # its only relevant item is excluded
    with pytest.raises(ValueError, match="cold_m1: user_vectors returned 1 vectors for 2 users"):
        evaluate_history(lambda u, h: np.zeros((1, len(ITEMS))), item_vecs, {"cold_m1": protocols["cold_m1"]}, np.ones(8, bool))


def _dense_train(split) -> np.ndarray:
    users = sorted(split.train["user_id"].unique())
    x = np.zeros((len(users), len(ITEMS)))
    for u, i in zip(split.train["user_id"], split.train["item_id"], strict=True):
        x[users.index(u), ITEMS.index(i)] = 1.0
    return x


@pytest.mark.parametrize("lam", [1.0, 10.0])
def test_anchors_equal_their_textbook_formulas(split, lam: float) -> None:
    protocols = history_protocols(split, ITEMS, revealed=(1,), fresh_history=50)
    res = history_anchors(split, ITEMS, protocols, ease_lambdas=(lam,))
    x = _dense_train(split)
    cos = (x.T @ x) / np.sqrt(np.outer(x.sum(0), x.sum(0)).clip(min=1.0))
    p = np.linalg.inv(x.T @ x + lam * np.eye(len(ITEMS)))
    ease = -p / np.diag(p)
    np.fill_diagonal(ease, 0.0)
    for name, prot in protocols.items():
        for anchor, weights in (("item_knn", cos), ("ease", ease), ("popularity", None)):
            want = []
            for rows, ex, rel in zip(prot.fold_in_rows, prot.exclude, prot.relevant, strict=True):
                h = np.zeros(len(ITEMS))
                h[rows] = 1.0
                s = x.sum(0) if weights is None else h @ weights
                s[ex] = -np.inf
                top = [i for i in np.argsort(-s, kind="stable")[:20] if np.isfinite(s[i])]
                want.append(len(set(top) & set(rel.tolist())) / len(rel))
            assert res[name][anchor]["recall@20"] == pytest.approx(np.mean(want), abs=1e-4), (name, anchor)
    assert res["cold_m1"]["ease"]["lambda"] == lam


def test_ml100k_protocols_reproduce_eval_md(ml100k_dir: Path, tmp_path: Path) -> None:
    """EVAL.md's user counts and anchors (popularity and item-kNN exactly; EASE within its λ grid)."""
    ds = read_dataset(prepare_movielens_100k(ml100k_dir, tmp_path / "ml"))
    split = split_interactions(ds.interactions)
    ids = ds.items["item_id"].astype(str).tolist()
    protocols = history_protocols(split, ids)
    assert tuple(protocols) == PROTOCOLS
    assert [len(protocols[p]) for p in PROTOCOLS] == [94, 94, 94, 94, 849]
    res = history_anchors(split, ids, protocols)
    table = {  # EVAL.md: popularity, EASE fold-in, item-kNN fold-in recall@20
        "cold_m1": (0.1326, 0.1402, 0.1465), "cold_m3": (0.1240, 0.1479, 0.1634),
        "cold_m5": (0.1207, 0.1570, 0.1749), "cold_m10": (0.1139, 0.1649, 0.1769),
        "warm_fresh": (0.0973, 0.2052, 0.1696),
    }
    for name, (pop, ease, knn) in table.items():
        assert res[name]["popularity"]["recall@20"] == pytest.approx(pop, abs=1e-4), name
        assert res[name]["item_knn"]["recall@20"] == pytest.approx(knn, abs=1e-4), name
        assert res[name]["ease"]["recall@20"] == pytest.approx(ease, abs=0.005), name
