"""Feature encoders: OOV handling, buckets, multi-categorical padding, request validation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from training.features import ContinuousStats, FeatureError, TowerEncoder, Vocabulary
from training.schema import FeatureSpec


def test_vocabulary_oov_and_order() -> None:
    v = Vocabulary.fit(["b", "a", "b", "", "c"], min_count=1)
    assert v.tokens == ["b", "a", "c"]  # by frequency, then text; '' is never a token
    assert list(v.encode(["a", "zzz", "b", ""])) == [2, 0, 1, 0]
    assert v.encode_one("c") == 3 and v.encode_one("nope") == 0
    assert Vocabulary.fit(["x", "y", "y"], min_count=2).tokens == ["y"]


def test_continuous_bucket_and_zscore() -> None:
    s = ContinuousStats.fit(np.array([0.0, 1, 2, 3, np.nan]), n_buckets=2)
    assert s.boundaries == [1.5] and s.n_buckets == 3
    z, b = s.encode(np.array([0.0, 3.0, np.nan, 100.0]))
    assert list(b) == [1, 2, 0, 2]
    assert z[0] == pytest.approx((0 - 1.5) / math.sqrt(1.25)) and z[2] == 0.0 and z[3] == 5.0


SPECS = {
    "age": FeatureSpec("age", "continuous"),
    "g": FeatureSpec("g", "categorical"),
    "tags": FeatureSpec("tags", "multi_categorical", ";"),
}


@pytest.fixture
def enc() -> TowerEncoder:
    table = pd.DataFrame({"age": ["10", "20", "", "40"], "g": ["M", "F", "F", ""], "tags": ["a;b", "b", "", "c;a;b"]})
    return TowerEncoder.fit("user", SPECS, ["u1", "u2"], table, n_buckets=2, max_multi_len=2)


def test_table_and_records_encode_identically(enc: TowerEncoder) -> None:
    table = pd.DataFrame({"age": ["20", ""], "g": ["F", "X"], "tags": ["b;zz", ""]})
    t = enc.encode_table(["u2", "new"], table)
    r = enc.encode_records([
        {"user_id": "u2", "features": {"age": 20, "g": "F", "tags": ["b", "zz"]}},
        {"user_id": "new", "features": {"g": "X"}},
    ])
    assert t.keys() == r.keys()
    for k in t:
        np.testing.assert_array_equal(t[k], r[k], err_msg=k)
    assert list(t["id"]) == [2, 0]
    assert t["multi.tags"][0].tolist() == [2, 1]  # 'b' is token 2 (offset 2), 'zz' is OOV (1)
    assert t["multi.tags"][1].tolist() == [0, 0]  # empty list: all padding


@pytest.mark.parametrize(
    ("features", "field"),
    [
        ({"height": 3}, "features.height"),
        ({"age": "old"}, "features.age"),
        ({"age": True}, "features.age"),
        ({"age": float("nan")}, "features.age"),
        ({"age": float("inf")}, "features.age"),
        ({"g": 1.5}, "features.g"),
        ({"tags": [1.5]}, "features.tags"),
    ],
)
def test_record_validation_names_field(enc: TowerEncoder, features: dict, field: str) -> None:
    with pytest.raises(FeatureError) as e:
        enc.encode_records([{"user_id": None, "features": features}])
    assert e.value.field == field


def test_json_round_trip(enc: TowerEncoder) -> None:
    back = TowerEncoder.from_json(enc.to_json())
    rec = [{"user_id": "u1", "features": {"age": 33, "g": "M", "tags": "c;a"}}]
    a, b = enc.encode_records(rec), back.encode_records(rec)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
