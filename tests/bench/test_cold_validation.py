"""The nested validation split: built from train rows only, pseudo-cold users are cold."""

from __future__ import annotations

import pandas as pd

from bench.cold_validation import (
    is_pseudo_cold,
    nested_frames,
    pseudo_cold_id,
    write_nested_dataset,
)
from training.dataset import read_dataset
from training.split import is_cold_user, split_interactions


def test_nested_split_uses_train_rows_only_and_makes_pseudo_cold_users(tiny_dataset, tmp_path) -> None:
    ds = read_dataset(tiny_dataset)
    clicked = ds.interactions[ds.interactions["clicked"]]
    official = split_interactions(clicked)
    inter, users = nested_frames(clicked, ds.users)
    assert len(inter) == len(official.train)
    # no cold user and no test row survives
    renamed = {pseudo_cold_id(u): u for u in official.train["user_id"].unique() if is_pseudo_cold(u)}
    assert renamed, "the tiny dataset should have pseudo-cold users"
    original_ids = inter["user_id"].map(lambda u: renamed.get(u, u))
    assert not original_ids.map(is_cold_user).any()
    key = ["user_id", "item_id", "timestamp"]
    back = inter.assign(user_id=original_ids)[key]
    assert len(back.merge(official.test[key], on=key)) == 0
    # the renamed users are exactly the cold users of the nested split
    nested = split_interactions(inter.assign(clicked=True, weight=1.0))
    assert set(nested.cold["user_id"]) == set(renamed)
    assert set(users["user_id"]) <= set(inter["user_id"])
    # features travel with the rename
    one_new, one_old = next(iter(renamed.items()))
    pd.testing.assert_series_equal(
        users.set_index("user_id").loc[one_new], ds.users.set_index("user_id").loc[one_old], check_names=False
    )
    out = write_nested_dataset(tiny_dataset, tmp_path / "nested")
    assert len(read_dataset(out).interactions) == len(inter)
