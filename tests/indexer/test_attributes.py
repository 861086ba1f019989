"""Attribute tables and filter evaluation (indexer.attributes) against the row-by-row oracle."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from indexer.attributes import (
    AttributeFileError,
    AttributeTable,
    FilterError,
    parse_condition,
    parse_filter,
)
from tests.indexer.attribute_oracle import CONDITIONS, SPECS, oracle_mask, random_items

N = 600


@pytest.fixture(scope="module")
def items():
    return random_items(N, seed=3)


@pytest.fixture(scope="module")
def table(items) -> AttributeTable:
    return AttributeTable.from_frame(items, SPECS)


SINGLE = [(name, cond) for name, conds in CONDITIONS.items() for cond in conds]


@pytest.fixture(params=["indexed", "scan"])
def evaluation(request, monkeypatch) -> str:
    """Both ways a filter is evaluated: from a column's index (sorted rows of a value or range,
    the other conditions tested on those rows) and by a pass over every row."""
    from indexer import attributes

    if request.param == "indexed":
        monkeypatch.setattr(attributes, "INDEXED_ROWS_MIN", N)
    else:
        monkeypatch.setattr(attributes, "INDEXED_ROWS_MIN", 0)
        monkeypatch.setattr(attributes, "INDEXED_ROWS_FRACTION", 0.0)
    return request.param


@pytest.mark.parametrize(("name", "cond"), SINGLE, ids=[f"{n}={c}" for n, c in SINGLE])
def test_every_condition_matches_the_oracle(table, items, name, cond, evaluation):
    filt = {name: cond}
    allowed = table.evaluate(parse_filter(filt))
    want = oracle_mask(items, filt)
    np.testing.assert_array_equal(allowed.mask, want)
    np.testing.assert_array_equal(allowed.rows, np.flatnonzero(want))
    assert allowed.count == want.sum()


# pairs and triples over different attributes: conditions are ANDed
COMBOS = [
    {a: ca, b: cb}
    for (a, b) in itertools.combinations(CONDITIONS, 2)
    for ca, cb in zip(CONDITIONS[a][:3], CONDITIONS[b][-3:], strict=False)
] + [{"color": {"in": ["c0", "c1", "c2"]}, "labels": "t1", "cost": {"lte": 60}, "in_stock": True}]


@pytest.mark.parametrize("filt", COMBOS, ids=[json.dumps(c) for c in COMBOS])
def test_combinations_are_anded(table, items, filt, evaluation):
    allowed = table.evaluate(parse_filter(filt))
    np.testing.assert_array_equal(allowed.mask, oracle_mask(items, filt))
    np.testing.assert_array_equal(allowed.rows, np.flatnonzero(oracle_mask(items, filt)))


def test_the_oracle_sees_every_kind_of_cell(items):
    """The catalog exercises what the rules distinguish: missing cells of every type, equal
    numbers written differently, repeated and empty multi tokens, every bool literal."""
    assert (items["color"] == "").any() and (items["labels"] == "").any() and (items["cost"] == "").any()
    assert (items["in_stock"] == "").any() and {"true", "False", "1", "0", "TRUE"} <= set(items["in_stock"])
    assert items["labels"].str.contains(";;|;$", regex=True).any()
    assert oracle_mask(items, {"cost": 10}).sum() >= 2  # "10" and "10.0"


def test_write_and_load_round_trip(tmp_path: Path, table, items):
    entry = table.write(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "attributes").iterdir()) == sorted(
        AttributeTable.files(entry)
    )
    loaded = AttributeTable.load(tmp_path, json.loads(json.dumps(entry)), N)
    assert loaded.specs == table.specs
    for name, cond in SINGLE:
        f = parse_filter({name: cond})
        np.testing.assert_array_equal(loaded.mask(f), table.mask(f))
    assert isinstance(loaded.columns["color"].arrays["codes"], np.ndarray)


def _corrupt(tmp_path: Path, table: AttributeTable, rel: str, array: np.ndarray) -> dict:
    entry = table.write(tmp_path)
    np.save(tmp_path / rel, array)
    return entry


@pytest.mark.parametrize(
    ("rel", "array", "message"),
    [
        ("attributes/0.codes.npy", np.zeros(N, dtype=np.int64), "expected 1-D int32"),
        ("attributes/0.codes.npy", np.zeros(N - 1, dtype=np.int32), f"{N - 1} rows for {N} items"),
        ("attributes/0.codes.npy", np.full(N, 99, dtype=np.int32), "outside the dictionary"),
        ("attributes/1.offsets.npy", np.zeros(N + 1, dtype=np.int64), "offsets must rise"),
        ("attributes/2.values.npy", np.full(N, np.inf), "infinite"),
        ("attributes/3.values.npy", np.full(N, 2, dtype=np.int8), "other than -1/0/1"),
    ],
)
def test_load_refuses_inconsistent_files(tmp_path: Path, table, rel, array, message):
    entry = _corrupt(tmp_path, table, rel, array)
    with pytest.raises(AttributeFileError, match=message):
        AttributeTable.load(tmp_path, entry, N)


def test_load_refuses_a_dictionary_of_another_size(tmp_path: Path, table):
    entry = table.write(tmp_path)
    (tmp_path / "attributes" / "0.values.json").write_text(json.dumps(["c0"]))
    with pytest.raises(AttributeFileError, match="holds 1 values, manifest says 10"):
        AttributeTable.load(tmp_path, entry, N)


# ---- the grammar ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "op", "values"),
    [
        ("x", "eq", ("x",)),
        (3, "eq", (3,)),
        (True, "eq", (True,)),
        ({"in": ["a", "b"]}, "in", ("a", "b")),
        ({"not_in": [1]}, "not_in", (1,)),
        ({"gte": 1}, "range", (1.0, None)),
        ({"lte": 2.5}, "range", (None, 2.5)),
        ({"gte": 1, "lte": 2}, "range", (1.0, 2.0)),
        ({"exists": False}, "exists", (False,)),
        ({"any": ["a"]}, "any", ("a",)),
        ({"all": ["a", "b"]}, "all", ("a", "b")),
    ],
)
def test_parse_condition(raw, op, values):
    cond = parse_condition(raw)
    assert (cond.op, cond.values) == (op, values)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"in": []}, "at least one value"),
        ({"in": "a"}, "must be a list"),
        ({"gte": float("nan")}, "finite"),
        ({"lte": float("inf")}, "finite"),
        ({"gte": "1"}, "must be a number"),
        ({"gte": True}, "must be a number"),
        ({"gte": None, "lte": None}, "at least one"),
        ({"in": ["a"], "not_in": ["b"]}, "one operator per condition"),
        ({"gt": 1}, "unknown operator"),
        ({}, "empty condition"),
        ({"exists": 1}, "true or false"),
        ({"in": [["a"]]}, "string, a number or a boolean"),
        ({"in": [None]}, "string, a number or a boolean"),
        (None, "string, a number or a boolean"),
        (float("nan"), "finite"),
        ({"in": list(range(4))}, "at most 3"),
    ],
)
def test_parse_condition_rejects(raw, message):
    with pytest.raises(FilterError, match=message):
        parse_condition(raw, max_values=3)


def test_parse_filter_names_the_attribute():
    with pytest.raises(FilterError) as e:
        parse_filter({"color": "c1", "cost": {"in": []}})
    assert e.value.attribute == "cost"


@pytest.mark.parametrize(
    ("filt", "attribute", "message"),
    [
        ({"nope": "x"}, "nope", "unknown attribute"),
        ({"color": 3}, "color", "takes string values, got a number"),
        ({"color": {"gte": 1}}, "color", "does not apply to a categorical"),
        ({"color": {"all": ["c1"]}}, "color", "'all' does not apply"),
        ({"labels": {"gte": 1}}, "labels", "does not apply to a multi_categorical"),
        ({"cost": "10"}, "cost", "takes number values, got a string"),
        ({"cost": {"any": [1]}}, "cost", "'any' does not apply"),
        ({"cost": True}, "cost", "got a bool"),
        ({"in_stock": 1}, "in_stock", "takes bool values, got a number"),
        ({"in_stock": {"in": ["true"]}}, "in_stock", "got a string"),
    ],
)
def test_table_check_names_the_attribute(table, filt, attribute, message):
    with pytest.raises(FilterError, match=message) as e:
        table.allowed(parse_filter(filt))
    assert e.value.attribute == attribute


LIMIT = 2 * (N + 8 * N + N // 8)  # two full masks' worth


def test_masks_are_cached_per_filter_and_bounded(items):
    table = AttributeTable(N, AttributeTable.from_frame(items, SPECS).columns, cache_bytes=LIMIT)
    a = table.allowed(parse_filter({"color": "c1"}))
    assert table.allowed(parse_filter({"color": "c1"})) is a
    assert table.allowed(parse_filter({"color": "c2"})) is not a
    for i in range(10):  # more filters than fit: the oldest go, memory stays bounded
        table.allowed(parse_filter({"cost": {"gte": i}}))
    assert 0 < table._cache_bytes <= LIMIT
    assert table.allowed(parse_filter({"color": "c1"})) is not a
    # 1 (a number) and True (a bool) are different filters even though 1 == True in Python
    assert table.allowed(parse_filter({"cost": 1})).count == 0
    assert not a.mask.flags.writeable


def test_to_frame_reads_back_into_the_same_table() -> None:
    """`indexer update --upsert` carries unchanged rows over through `to_frame`: every type's
    cells (missing ones too) must read back into a table that answers every filter the same."""
    cells = random_items(300, seed=11)
    table = AttributeTable.from_frame(cells, SPECS)
    again = AttributeTable.from_frame(table.to_frame(), SPECS)
    for name, conds in CONDITIONS.items():
        for cond in conds:
            filt = parse_filter({name: cond})
            np.testing.assert_array_equal(again.mask(filt), table.mask(filt))
