"""Dataset directory validation: errors name file, line and column; valid data round-trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from training.dataset import read_dataset
from training.schema import DatasetError, Schema


@pytest.fixture
def ds(tiny_dataset: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(tiny_dataset, dst)
    return dst


def test_reads_tiny_dataset(tiny_dataset: Path) -> None:
    d = read_dataset(tiny_dataset)
    assert set(d.schema.user) == {"age", "country", "device", "interests"}
    assert d.interactions["user_id"].map(type).eq(str).all()
    assert d.interactions["timestamp"].dtype.kind == "i"
    assert len(d.items) == 200
    assert d.users is not None and len(d.users) == 300


def _edit_csv(path: Path, row: int, col: str, value: str) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[row, col] = value
    df.to_csv(path, index=False)


@pytest.mark.parametrize(
    ("file", "row", "col", "value", "message"),
    [
        ("interactions.csv", 4, "timestamp", "yesterday", "interactions.csv: line 6, column 'timestamp'"),
        ("interactions.csv", 0, "user_id", "", "interactions.csv: line 2, column 'user_id': empty id"),
        ("items.csv", 7, "price", "cheap", "items.csv: line 9, column 'price': 'cheap' is not a number"),
        ("items.csv", 3, "item_id", "i0", "items.csv: line 5, column 'item_id': duplicate id 'i0'"),
        ("users.csv", 10, "age", "inf", "users.csv: line 12, column 'age': 'inf' is not finite"),
        # timestamps that parse as numbers but not as int64 seconds (were cast to int64's minimum)
        ("interactions.csv", 3, "timestamp", "inf", "interactions.csv: line 5, column 'timestamp': 'inf' is not an integer"),
        ("interactions.csv", 3, "timestamp", "-inf", "interactions.csv: line 5, column 'timestamp': '-inf' is not an integer"),
        ("interactions.csv", 3, "timestamp", "1e25", "interactions.csv: line 5, column 'timestamp': '1e25' is not an integer"),
        ("interactions.csv", 3, "timestamp", "9223372036854775808", "line 5, column 'timestamp': '9223372036854775808'"),
    ],
)
def test_malformed_rows_are_named(ds: Path, file: str, row: int, col: str, value: str, message: str) -> None:
    _edit_csv(ds / file, row, col, value)
    with pytest.raises(DatasetError) as e:
        read_dataset(ds)
    assert message in str(e.value)


def test_clicks_on_retired_items_train_and_are_counted(ds: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A clicked item removed from items.csv joins the training items with missing features (its
    id still learns, its clicks are positives and negatives); the strict mode still names it."""
    items = pd.read_csv(ds / "items.csv", dtype=str, keep_default_na=False)
    clicks = pd.read_csv(ds / "interactions.csv", dtype=str, keep_default_na=False)
    gone = clicks["item_id"].value_counts().index[:3].tolist()
    items[~items["item_id"].isin(gone)].to_csv(ds / "items.csv", index=False)
    with caplog.at_level("INFO", logger="trainer"):
        d = read_dataset(ds)
    n_rows = int(clicks["item_id"].isin(gone).sum())
    assert set(d.retired_items) == set(gone)
    assert len(d.interactions) == len(clicks) and d.interactions["item_id"].isin(gone).sum() == n_rows
    assert len(d.items) == len(items) and set(d.items["item_id"]) == set(items["item_id"])
    retired_rows = d.items[d.items["item_id"].isin(gone)]
    assert (retired_rows.drop(columns=["item_id"]) == "").all().all()  # every feature missing
    assert f"{n_rows} row(s) on 3 retired item(s)" in caplog.text
    with pytest.raises(DatasetError, match=r"column 'item_id': .* is not in items"):
        read_dataset(ds, allow_retired=False)


def test_missing_files_and_columns(ds: Path) -> None:
    (ds / "items.csv").rename(ds / "catalog.csv")
    with pytest.raises(DatasetError, match="missing required file items.csv"):
        read_dataset(ds)
    (ds / "catalog.csv").rename(ds / "items.csv")
    df = pd.read_csv(ds / "items.csv", dtype=str).drop(columns=["tags"])
    df.to_csv(ds / "items.csv", index=False)
    with pytest.raises(DatasetError, match=r"items.csv: missing column\(s\) \['tags'\]"):
        read_dataset(ds)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"user": {"features": {}}}, "missing required section 'item'"),
        ({"item": {"features": {"x": {"type": "float"}}}}, "item.features.x: unknown type 'float'"),
        ({"item": {"features": {"item_id": {"type": "categorical"}}}}, "must not be declared"),
        ({"item": {"features": {}}, "ranking": {}}, "unknown top-level key"),
        # misspelled keys were ignored (a default separator, no features at all)
        ({"item": {"feature": {"x": {"type": "categorical"}}}}, "schema.json: item: unknown key 'feature'"),
        ({"user": {"features": {}, "extra": 1}, "item": {"features": {}}}, "schema.json: user: unknown key 'extra'"),
        ({"item": {"features": {"tags": {"type": "multi_categorical", "seperator": ";"}}}},
         "schema.json: item.features.tags: unknown key 'seperator'"),
        # names a torch ModuleDict cannot hold (a KeyError in model.py after the data was read)
        ({"item": {"features": {"price.usd": {"type": "continuous"}}}}, "item.features.price.usd: .*must not contain '.'"),
        ({"user": {"features": {"type": {"type": "categorical"}}}, "item": {"features": {}}}, "user.features.type: .*reserved"),
        ({"item": {"features": {"": {"type": "categorical"}}}}, "must not be empty"),
    ],
)
def test_schema_errors(schema: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        Schema.from_json(schema)


def test_user_section_may_be_empty_and_users_csv_optional(ds: Path) -> None:
    schema = json.loads((ds / "schema.json").read_text())
    schema["user"] = {"features": {}}
    (ds / "schema.json").write_text(json.dumps(schema))
    (ds / "users.csv").unlink()
    d = read_dataset(ds)
    assert d.users is None and d.schema.user == {}


def test_parquet_in_place_of_csv(ds: Path) -> None:
    items = pd.read_csv(ds / "items.csv", dtype=str, keep_default_na=False)
    items.to_parquet(ds / "items.parquet")
    (ds / "items.csv").unlink()
    d = read_dataset(ds)
    assert list(d.items["item_id"]) == list(items["item_id"])


def test_exposure_flag_parsed(ds: Path) -> None:
    df = pd.read_csv(ds / "interactions.csv", dtype=str)
    df["clicked"] = ["0" if i % 5 == 0 else "1" for i in range(len(df))]
    df.to_csv(ds / "interactions.csv", index=False)
    d = read_dataset(ds)
    assert (~d.interactions["clicked"]).sum() == (len(df) + 4) // 5


@pytest.mark.parametrize("file", ["items.csv", "users.csv", "interactions.csv"])
def test_truncated_row_is_named(ds: Path, file: str) -> None:
    """A row with fewer fields than the header was read with '' for the missing ones."""
    with open(ds / file, "a", encoding="utf-8") as f:
        f.write("x999,c1\n")
    n_lines = len((ds / file).read_text(encoding="utf-8").splitlines())
    with pytest.raises(DatasetError, match=rf"{file}: line {n_lines}: 2 field\(s\) where the header has"):
        read_dataset(ds)


def test_every_row_one_field_longer_is_named(ds: Path) -> None:
    """pandas took the first column as the index when every row had one field more than the
    header, shifting every column left by one, silently."""
    lines = (ds / "items.csv").read_text(encoding="utf-8").splitlines()
    (ds / "items.csv").write_text("\n".join([lines[0]] + [row + ",extra" for row in lines[1:]]) + "\n", encoding="utf-8")
    n = len(lines[0].split(","))
    with pytest.raises(DatasetError, match=rf"items.csv: line 2: {n + 1} field\(s\) where the header has {n}"):
        read_dataset(ds)


@pytest.mark.parametrize("tz", [None, "Europe/Paris"])
def test_parquet_timestamps_become_unix_seconds(ds: Path, tz: str | None) -> None:
    """A parquet timestamp column is read as integer seconds, not rejected as text."""
    inter = pd.read_csv(ds / "interactions.csv", dtype=str, keep_default_na=False)
    secs = inter["timestamp"].astype("int64")
    when = pd.to_datetime(secs, unit="s", utc=True) + pd.Timedelta(milliseconds=250)
    inter["timestamp"] = when.dt.tz_convert(tz) if tz else when.dt.tz_localize(None)
    (ds / "interactions.csv").unlink()
    inter.to_parquet(ds / "interactions.parquet")
    got = read_dataset(ds).interactions["timestamp"]
    assert got.tolist() == secs.tolist()


def test_repeated_header_name_is_named(ds: Path) -> None:
    """pandas renamed a second 'category' column to 'category.1' and read on."""
    lines = (ds / "items.csv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    (ds / "items.csv").write_text(
        "\n".join([",".join(header + [header[1]])] + [row + ",zz" for row in lines[1:]]) + "\n", encoding="utf-8"
    )
    with pytest.raises(DatasetError, match=rf"items.csv: line 1: column '{header[1]}' appears twice"):
        read_dataset(ds)


@pytest.mark.parametrize("file", ["items.csv", "users.csv", "schema.json"])
def test_non_utf8_byte_names_file_and_line(ds: Path, file: str) -> None:
    lines = (ds / file).read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b",", b",\xe9", 1) if file != "schema.json" else lines[2] + b" \xe9"
    (ds / file).write_bytes(b"\n".join(lines))
    with pytest.raises(DatasetError, match=rf"{file}: line 3: not valid UTF-8 \(byte 0xe9\)"):
        read_dataset(ds)


def test_parquet_list_column_joined_with_separator(ds: Path) -> None:
    """list<string> cells of a multi_categorical feature were str()-ed into "['a' 'b']"."""
    items = pd.read_csv(ds / "items.csv", dtype=str, keep_default_na=False)
    as_lists = items.assign(tags=[t.split("|") for t in items["tags"]])
    as_lists.to_parquet(ds / "items.parquet")
    (ds / "items.csv").unlink()
    assert list(read_dataset(ds).items["tags"]) == list(items["tags"])
    as_lists.assign(category=[[c] for c in items["category"]]).to_parquet(ds / "items.parquet")
    with pytest.raises(DatasetError, match="items.parquet: row 0, column 'category': a list value"):
        read_dataset(ds)


def test_all_zero_weights_rejected(ds: Path) -> None:
    df = pd.read_csv(ds / "interactions.csv", dtype=str)
    df["weight"] = "0"
    df.to_csv(ds / "interactions.csv", index=False)
    with pytest.raises(DatasetError, match="interactions.csv: column 'weight': every weight is 0"):
        read_dataset(ds)
    df.loc[3, "weight"] = "0.5"  # one positive weight is enough for the reader
    df.to_csv(ds / "interactions.csv", index=False)
    assert read_dataset(ds).interactions["weight"].sum() == 0.5


# ---- item attributes (INTERFACES.md §4) -------------------------------------------------------


def _declare_attributes(ds: Path, attributes: dict) -> None:
    schema = json.loads((ds / "schema.json").read_text())
    schema["item"]["attributes"] = attributes
    (ds / "schema.json").write_text(json.dumps(schema))


ATTRS = {"category": {"type": "categorical"}, "tags": {"type": "multi_categorical", "separator": "|"},
         "price": {"type": "continuous"}, "in_stock": {"type": "bool"}}


def _with_stock(ds: Path, values: list[str]) -> None:
    df = pd.read_csv(ds / "items.csv", dtype=str, keep_default_na=False)
    df["in_stock"] = [values[i % len(values)] for i in range(len(df))]
    df.to_csv(ds / "items.csv", index=False)


def test_attributes_are_read_with_the_catalog(ds: Path) -> None:
    _declare_attributes(ds, ATTRS)
    _with_stock(ds, ["true", "FALSE", " 1 ", "0", ""])
    d = read_dataset(ds)
    assert set(d.schema.item_attributes) == set(ATTRS)
    assert d.schema.item_attributes["tags"].separator == "|"
    assert "in_stock" in d.items.columns and "in_stock" not in d.schema.item  # an attribute, not a feature
    # the schema round-trips, and a schema without attributes writes none (bundles unchanged)
    assert Schema.from_json(d.schema.to_json()) == d.schema
    assert "attributes" not in Schema.from_json({"item": {"features": {}}}).to_json()["item"]


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("in_stock", "yes", "items.csv: line 5, column 'in_stock': 'yes' is not a bool"),
        ("price", "cheap", "items.csv: line 5, column 'price': 'cheap' is not a number"),
        ("price", "inf", "items.csv: line 5, column 'price': 'inf' is not finite"),
    ],
)
def test_bad_attribute_values_are_named(ds: Path, column: str, value: str, message: str) -> None:
    _declare_attributes(ds, ATTRS)
    _with_stock(ds, ["true"])
    _edit_csv(ds / "items.csv", 3, column, value)
    with pytest.raises(DatasetError) as e:
        read_dataset(ds)
    assert message in str(e.value)


def test_an_attribute_column_must_exist(ds: Path) -> None:
    _declare_attributes(ds, {"region": {"type": "categorical"}})
    with pytest.raises(DatasetError, match=r"items.csv: missing column\(s\) \['region'\]"):
        read_dataset(ds)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"a": {"type": "text"}}, "item.attributes.a: unknown type 'text'"),
        ({"a": {}}, "item.attributes.a: must be an object with a 'type'"),
        ({"a": {"type": "bool", "separator": ","}}, "'separator' only applies to a multi_categorical"),
        ({"a": {"type": "multi_categorical", "separator": ""}}, "'separator' must be a non-empty string"),
        ({"a": {"type": "categorical", "sep": "|"}}, "unknown key 'sep'"),
        ({"item_id": {"type": "categorical"}}, "item_id cannot be an attribute"),
        ({"tags": {"type": "multi_categorical", "separator": ";"}}, "separator ';' differs from the feature's '|'"),
        (["a"], "item.attributes must be an object"),
    ],
)
def test_attribute_schema_errors(attributes: object, message: str) -> None:
    schema = {"item": {"features": {"tags": {"type": "multi_categorical", "separator": "|"}}, "attributes": attributes}}
    with pytest.raises(DatasetError, match=message):
        Schema.from_json(schema)


def test_attributes_only_in_the_item_section() -> None:
    with pytest.raises(DatasetError, match="user: unknown key 'attributes'"):
        Schema.from_json({"user": {"features": {}, "attributes": {}}, "item": {"features": {}}})
