"""The EVAL.md split: rules on hand-made data, and the exact ML-100K row counts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from training.dataset import read_dataset
from training.prepare import prepare_movielens_100k
from training.split import head_items, id_sort_key, is_cold_user, split_interactions


def test_cold_rule() -> None:
    assert is_cold_user("10") and is_cold_user("0") and not is_cold_user("11")
    import zlib

    assert is_cold_user("alice") == (zlib.crc32(b"alice") % 10 == 0)


@pytest.mark.parametrize(
    ("user_id", "integer"),
    [("²", False), ("1²", False), ("٣0", False), ("--10", False), ("+10", False), ("1e3", False), (" 10", False),
     ("-20", True), ("007", True), (str(2**64 * 10), True)],
)
def test_cold_rule_is_total_and_ascii(user_id: str, integer: bool) -> None:
    """str.isdigit() accepted '²' (then int() raised); EVAL.md: integer ids by value, else crc32."""
    import zlib

    expected = int(user_id) % 10 == 0 if integer else zlib.crc32(user_id.encode()) % 10 == 0
    assert is_cold_user(user_id) == expected


@pytest.mark.parametrize(
    ("ids", "order"),
    [
        (["3", "10", "2"], ["2", "3", "10"]),                        # integers by value
        (["3", "1e3", "2"], ["1e3", "2", "3"]),                      # '1e3' is not an integer id: all as text
        (["5", str(2**63), "10", str(2**64 + 1)], ["5", "10", str(2**63), str(2**64 + 1)]),  # beyond int64
        (["-1", "5", str(-(2**63) - 1)], [str(-(2**63) - 1), "-1", "5"]),
    ],
)
def test_id_sort_key_is_total_and_exact(ids: list[str], order: list[str]) -> None:
    s = pd.Series(ids)
    assert list(s.iloc[id_sort_key(s).sort_values(kind="stable").index]) == order


def test_split_rules_by_hand() -> None:
    # user 1: 10 rows -> test = last 2, train 8 -> val = last ceil(0.8) = 1; user 10 is cold
    rows = [("1", str(i), 100 + i) for i in range(10)] + [("10", "a", 5), ("10", "b", 6)]
    # a tie on timestamp is broken by item id (numeric when all ids are integers)
    rows += [("3", "9", 50), ("3", "10", 50), ("3", "2", 40)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    s = split_interactions(df)
    assert list(s.test[s.test.user_id == "1"].item_id) == ["8", "9"]
    assert list(s.val[s.val.user_id == "1"].item_id) == ["7"]
    assert len(s.fit[s.fit.user_id == "1"]) == 7
    assert set(s.cold.user_id) == {"10"} and len(s.cold) == 2
    # user 3: sorted (40,'2'), (50,'9'), (50,'10') -> test = last ceil(0.6)=1 -> '10'
    assert list(s.test[s.test.user_id == "3"].item_id) == ["10"]


def test_exposures_never_enter_the_split() -> None:
    df = pd.DataFrame({
        "user_id": ["1"] * 6, "item_id": list("abcdef"), "timestamp": range(6),
        "clicked": [True, False, True, True, False, True],
    })
    s = split_interactions(df)
    assert set(pd.concat([s.train, s.test]).item_id) == {"a", "c", "d", "f"}


def test_head_items_half_of_clicks() -> None:
    df = pd.DataFrame({"item_id": ["a"] * 5 + ["b"] * 3 + ["c"] * 2})
    assert head_items(df) == frozenset({"a"})  # a has exactly 50%
    df = pd.DataFrame({"item_id": ["a"] * 4 + ["b"] * 4 + ["c"] * 2})
    assert head_items(df) == frozenset({"a", "b"})


def test_ml100k_counts_match_eval_md(ml100k_dir: Path, tmp_path: Path) -> None:
    d = read_dataset(prepare_movielens_100k(ml100k_dir, tmp_path / "ml"))
    s = split_interactions(d.interactions)
    assert (len(s.train), len(s.test), len(s.cold)) == (72501, 18555, 8944)
    assert s.cold["user_id"].nunique() == 94
    assert len(s.head_items) == 192
    assert len(d.items) - len(s.head_items) == 1490
    assert len(s.fit) + len(s.val) == len(s.train)
