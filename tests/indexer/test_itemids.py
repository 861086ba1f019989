"""The memory-mapped item id column (indexer.itemids) against a list + dict oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer import itemids as idc
from indexer.itemids import ItemIds
from training.artifacts import write_npy_durable

CATALOGS = {
    "ascii": [f"item{i:05d}" for i in range(300)],
    "mixed": ["a", "", "ß-ü", "日本語", "x y", "42", "a\tb", "é" * 30, "b"],
    "one": ["only"],
}


def written(tmp_path: Path, ids: list[str]) -> ItemIds:
    (tmp_path / "item_ids.txt").write_bytes("".join(i + "\n" for i in ids).encode())
    idc.write_id_column(tmp_path, ids, write_npy_durable)
    return ItemIds.open(tmp_path)


def forms(tmp_path: Path, ids: list[str]) -> dict[str, ItemIds]:
    col = written(tmp_path, ids)
    return {"from_list": ItemIds.from_list(ids), "open": col, "from_text": ItemIds.from_text(tmp_path / "item_ids.txt")}


@pytest.mark.parametrize("catalog", sorted(CATALOGS))
def test_column_matches_list_and_dict(tmp_path, catalog):
    ids = CATALOGS[catalog]
    oracle = {item: row for row, item in enumerate(ids)}
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(ids), 50)
    for name, col in forms(tmp_path, ids).items():
        col.check(len(ids))
        assert len(col) == len(ids) and list(col) == ids and col == ids, name
        assert [col[r] for r in range(len(ids))] == ids and col[-1] == ids[-1] and col[np.int64(0)] == ids[0]
        assert col.take(rows) == [ids[r] for r in rows.tolist()]
        assert col.take(np.zeros(0, dtype=np.int64)) == []
        assert all(col.row(i) == r for i, r in oracle.items())
        assert dict(col.rows.items()) == oracle and len(col.rows) == len(ids)
        for missing in ("nope", "item", ids[0] + "x", ids[0][:-1] if ids[0] else "z"):
            if missing not in oracle:
                assert col.row(missing) is None and missing not in col and col.rows.get(missing) is None
                with pytest.raises(KeyError):
                    col.rows[missing]
        with pytest.raises(IndexError):
            col[len(ids)]
    assert isinstance(ItemIds.open(tmp_path)._blob, idc.mmap.mmap)  # mapped, not read


def test_hash_collisions_still_find_the_right_row(monkeypatch):
    """Every id in one of 3 hash buckets: lookups compare bytes, duplicates are still found."""
    monkeypatch.setattr(idc, "id_hash", lambda b: len(b) % 3)
    monkeypatch.setattr(idc, "id_hashes", lambda enc: np.array([len(b) % 3 for b in enc], dtype=np.uint64))
    ids = [f"i{i}" for i in range(200)]
    col = ItemIds.from_list(ids)
    col.check(len(ids))
    assert all(col.row(i) == r for r, i in enumerate(ids)) and col.row("i200") is None
    with pytest.raises(ValueError, match="'i7' appears more than once"):
        ItemIds.from_list([*ids[:10], "i7", *ids[10:]])


def test_duplicates_and_line_breaks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'b' appears more than once"):
        ItemIds.from_list(["a", "b", "c", "b"])
    with pytest.raises(ValueError, match="line break"):
        ItemIds.from_list(["a", "b\nc"])
    (tmp_path / "item_ids.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="duplicate ids"):
        ItemIds.from_text(tmp_path / "item_ids.txt").check(3)


def _damage(tmp_path: Path, what: str) -> None:
    def edit(rel: str, fn) -> None:  # noqa: ANN001
        arr = np.load(tmp_path / rel)
        np.save(tmp_path / rel, fn(arr))

    if what == "offsets":
        edit("ids/offsets.npy", lambda a: np.concatenate([a[:5], a[5:6] + 1, a[6:]]))
    elif what == "hashes_order":
        edit("ids/hashes.npy", lambda a: a[::-1].copy())
    elif what == "rows":
        edit("ids/rows.npy", lambda a: np.where(a == 3, 4, a))
    elif what == "text":
        (tmp_path / "item_ids.txt").write_text("".join(f"item{i:05d}\n" for i in range(299)))
    elif what == "dtype":
        edit("ids/rows.npy", lambda a: a.astype(np.int32))


@pytest.mark.parametrize(("what", "message"), [
    ("offsets", "offsets.npy does not match item_ids.txt's lines"),
    ("hashes_order", "hashes.npy is not sorted"),
    ("rows", "rows.npy is not a permutation"),
    ("text", "item_ids.txt has 299 ids, manifest count is 300"),
    ("dtype", "rows.npy is int32"),
])
def test_check_names_the_inconsistency(tmp_path, what, message):
    written(tmp_path, CATALOGS["ascii"]).check(300)
    _damage(tmp_path, what)
    with pytest.raises(ValueError, match=message):
        ItemIds.open(tmp_path).check(300)


def test_check_rehashes_a_sample(tmp_path):
    ids = CATALOGS["ascii"]
    written(tmp_path, ids)
    h = np.load(tmp_path / "ids/hashes.npy")
    h[0] = h[0] - np.uint64(1) if h[0] > 0 else np.uint64(0)  # entry 0 is always in the sample; still sorted
    np.save(tmp_path / "ids/hashes.npy", h)
    with pytest.raises(ValueError, match="hashes.npy entry 0 is not the hash"):
        ItemIds.open(tmp_path).check(len(ids))


def test_rows_of_is_row_for_every_id_at_once():
    """The bulk lookup (`indexer update`'s diff) answers exactly what `row` answers, id by id:
    present ids (ascii, unicode, prefixes of one another), absent ones, the empty string."""
    ids = [f"i{n}" for n in range(500)] + ["é-ü", "i1x", "日本"]
    col = ItemIds.from_list(ids)
    asked = [*ids[::-1], "absent", "", "i", "i5000", "日", "é-ü"]
    want = [-1 if col.row(x) is None else col.row(x) for x in asked]
    np.testing.assert_array_equal(col.rows_of(asked), want)
    assert col.rows_of([]).shape == (0,)
    assert ItemIds.from_list([]).rows_of(["a"]).tolist() == [-1]
