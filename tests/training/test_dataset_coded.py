"""The streaming, integer-coded interactions reader and the coded EVAL.md split
(training/dataset.py) against the in-memory reader and `split_interactions` as oracles."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.dataset import CodedInteractions, IdCoder, read_coded, read_dataset, split_coded
from training.prepare import prepare_movielens_100k
from training.schema import DatasetError
from training.split import split_interactions
from training.train import user_table

PARTS = ("train", "fit", "val", "test", "cold")


@pytest.fixture
def ds(tiny_dataset: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(tiny_dataset, dst)
    return dst


def assert_same_as_in_memory_reader(path: Path, chunk_rows: int) -> CodedInteractions:
    """Decoded rows, the code order (user table, catalog + retired) and every split part equal
    what `read_dataset` + `split_interactions` give."""
    ds = read_dataset(path)
    coded = read_coded(path, chunk_rows=chunk_rows)
    pd.testing.assert_frame_equal(coded.frame(), ds.interactions, check_dtype=False)
    assert coded.user.dtype == coded.item.dtype == np.int32
    ids, _ = user_table(ds)
    assert list(coded.user_ids) == list(ids)
    assert list(coded.item_ids) == list(ds.items["item_id"])
    assert coded.retired_items == ds.retired_items
    split, coded_split = split_interactions(ds.interactions), split_coded(coded)
    for part in PARTS:
        pd.testing.assert_frame_equal(coded.frame(getattr(coded_split, part)), getattr(split, part), check_dtype=False)
    return coded


def test_ml100k_coded_equals_the_in_memory_reader(ml100k_dir: Path, tmp_path: Path) -> None:
    data = prepare_movielens_100k(ml100k_dir, tmp_path / "ml")
    assert_same_as_in_memory_reader(data, chunk_rows=30_001)  # 4 chunks


def test_synthetic_coded_equals_the_in_memory_reader(tiny_dataset: Path) -> None:
    coded = assert_same_as_in_memory_reader(tiny_dataset, chunk_rows=997)
    assert coded.nbytes == 21 * len(coded)


def test_awkward_ids_weights_exposures_and_retired_items(tmp_path: Path, tiny_dataset: Path) -> None:
    """Integer ids that tie in the sort key ('01' and '1'), ids beyond int64, timestamp ties
    broken by item id, exposures, weights, clicks on retired items, users missing from users.csv."""
    rng = np.random.default_rng(0)
    d = tmp_path / "d"
    shutil.copytree(tiny_dataset, d)
    items = [str(i) for i in range(40)] + ["007", "18446744073709551616"]
    pd.DataFrame({"item_id": items, "category": "c", "tags": "t", "price": 1.0, "year": 2000}).to_csv(
        d / "items.csv", index=False)
    pd.DataFrame({"user_id": ["1", "01", "5"], "age": 30, "country": "k", "device": "ios", "interests": "t"}).to_csv(
        d / "users.csv", index=False)
    n = 3000
    users = rng.choice(["1", "01", "5", "11", "12", "20", "33", "99999999999999999999", "7"], size=n)
    its = rng.choice(items + ["retired9", "500"], size=n)
    pd.DataFrame({
        "user_id": users, "item_id": its, "timestamp": rng.integers(0, 50, n),  # many timestamp ties
        "weight": rng.choice(["", "0.5", "2", "0"], size=n), "clicked": rng.choice(["1", "0", "true", " FALSE", ""], size=n),
        "extra": "ignored",
    }).to_csv(d / "interactions.csv", index=False)
    coded = assert_same_as_in_memory_reader(d, chunk_rows=256)
    assert set(coded.retired_items) == {"retired9", "500"}
    text = tmp_path / "text"  # non-integer user ids: text order
    shutil.copytree(d, text)
    df = pd.read_csv(text / "interactions.csv", dtype=str, keep_default_na=False)
    df.loc[::7, "user_id"] = "alice"
    df.to_csv(text / "interactions.csv", index=False)
    assert_same_as_in_memory_reader(text, chunk_rows=500)


def test_parquet_interactions(ds: Path) -> None:
    df = pd.read_csv(ds / "interactions.csv", dtype=str)
    df["item_id"] = df["item_id"].str[1:].astype("int64")  # integer-typed ids become their text
    pd.DataFrame({"item_id": [str(i) for i in range(200)], "category": "c", "tags": "t", "price": 1.0,
                  "year": 2000}).to_csv(ds / "items.csv", index=False)
    df["timestamp"] = pd.to_datetime(df["timestamp"].astype("int64"), unit="s")
    df.to_parquet(ds / "interactions.parquet", row_group_size=1000)
    (ds / "interactions.csv").unlink()
    assert_same_as_in_memory_reader(ds, chunk_rows=700)


@pytest.mark.parametrize(
    ("row", "col", "value", "message"),
    [
        (4321, "timestamp", "yesterday", "interactions.csv: line 4323, column 'timestamp'"),
        (5000, "user_id", " ", "interactions.csv: line 5002, column 'user_id': empty id"),
        (2048, "item_id", "i999", "line 2050, column 'item_id': 'i999' is not in items (1 row(s)"),
    ],
)
def test_errors_in_later_chunks_name_the_same_line(ds: Path, row: int, col: str, value: str, message: str) -> None:
    df = pd.read_csv(ds / "interactions.csv", dtype=str, keep_default_na=False)
    df.loc[row, col] = value
    df.to_csv(ds / "interactions.csv", index=False)
    for read in (lambda: read_dataset(ds, allow_retired=False), lambda: read_coded(ds, allow_retired=False, chunk_rows=1000)):
        with pytest.raises(DatasetError) as e:
            read()
        assert message in str(e.value)


def test_truncated_row_fails_like_the_in_memory_reader(ds: Path) -> None:
    line = len((ds / "interactions.csv").read_text().splitlines()) + 1
    with open(ds / "interactions.csv", "a") as f:
        f.write("u1,i1\n")
    with pytest.raises(DatasetError, match=rf"interactions.csv: line {line}: 2 field\(s\) where the header has 3"):
        read_coded(ds, chunk_rows=1000)


def test_id_coder_codes_known_ids_first_then_new_ids_in_first_appearance_order() -> None:
    coder = IdCoder(["b", "a"])
    assert coder.encode(np.array(["x", "a", "x", "y"], dtype=object)).tolist() == [2, 1, 2, 3]
    assert coder.encode(np.array(["y", "b", "z"], dtype=object)).tolist() == [3, 0, 4]
    assert coder.ids().tolist() == ["b", "a", "x", "y", "z"]
    with pytest.raises(ValueError, match="unique"):
        IdCoder(["a", "a"])
