"""The nested validation split: built from train rows only, pseudo-cold users are cold."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bench.cold_validation import main, pooled, write_nested_dataset
from bench.common import is_pseudo_cold, nested_frames, pseudo_cold_id
from training.bundle import load_bundle
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


def test_buckets_are_disjoint_folds_and_a_bad_one_is_named(tiny_dataset) -> None:
    ds = read_dataset(tiny_dataset)
    clicked = ds.interactions[ds.interactions["clicked"]]
    cold = [set(split_interactions(nested_frames(clicked, ds.users, b)[0].assign(clicked=True)).cold["user_id"])
            for b in (1, 3)]
    assert cold[0] and cold[1] and not cold[0] & cold[1]
    with pytest.raises(ValueError, match="bucket must be in 0..9, got 10"):
        nested_frames(clicked, ds.users, 10)


def test_pooled_weights_cold_metrics_by_users() -> None:
    rows = [{"cold_users": 1, "cold_recall@20": 0.4, "recall@20": 0.2},
            {"cold_users": 3, "cold_recall@20": 0.0, "recall@20": 0.4}]
    assert pooled(rows, ["cold_recall@20", "recall@20"]) == {"cold_recall@20": 0.1, "recall@20": 0.3}


def test_main_pools_folds_and_keeps_the_bundles(tiny_dataset, tmp_path) -> None:
    argv = ["--data", str(tiny_dataset), "--out", str(tmp_path / "out"), "--field", "epochs", "--values", "1",
            "--buckets", "1", "3", "--models", str(tmp_path / "models")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "cold_validation_epochs_buckets13.json").read_text(encoding="utf-8"))
    (row,) = report["rows"]
    folds = row["folds"]
    assert [f["bucket"] for f in folds] == [1, 3]
    n = [f["cold_users"] for f in folds]
    assert report["pseudo_cold_users"] == sum(n) > 0
    assert row["cold_recall@20"] == pytest.approx(
        sum(f["cold_recall@20"] * k for f, k in zip(folds, n, strict=True)) / sum(n), abs=1e-4)
    for f in folds:  # each fold's bundle is kept, and says what it measured
        bundle = load_bundle(tmp_path / "models" / f"bucket-{f['bucket']}" / f["bundle"])
        assert bundle.manifest["metrics"]["cold_recall@20"] == f["cold_recall@20"]
    ref = report["popularity_each_user_once"]["cold_recall@20"]
    # the paired difference is the model's pooled cold recall minus the reference's
    assert row["cold_recall@20_minus_popularity"]["mean"] == pytest.approx(row["cold_recall@20"] - ref, abs=2e-4)
    assert row["cold_recall@20_minus_popularity"]["se"] >= 0.0
    with pytest.raises(SystemExit):
        main(argv[:-2] + ["--buckets", "3", "3"])
