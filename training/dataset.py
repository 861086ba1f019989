"""The dataset directory (INTERFACES.md §1): reading and validation.

A dataset is `interactions.csv` (positive clicks), `items.csv` (the catalog, including items
nobody clicked yet), an optional `users.csv` and a `schema.json` declaring each feature's type.
`.parquet` files are accepted in place of `.csv`. Ids are strings, whatever they look like.

Everything is validated on read, and errors name the file, the line and the column, because the
person fixing a broken nightly export needs exactly that and nothing else.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training.schema import BOOL_FALSE, BOOL_TRUE, AttributeSpec, DatasetError, FeatureSpec, Schema

log = logging.getLogger("trainer")

INT64_BOUND = 2.0**63  # timestamps must lie in (-2^63, 2^63): the int64 seconds they are cast to


@dataclass
class Dataset:
    """A validated dataset directory held in memory.

    `interactions` has columns user_id (str), item_id (str), timestamp (int64), weight (float32)
    and clicked (bool; rows with clicked == False are exposures without a click, kept for
    completeness but never used by retrieval training). `items` is the catalog in file order,
    then the `retired_items` (clicked items no longer in items.csv, every feature missing), `users`
    may be None.
    """

    path: Path
    schema: Schema
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None
    retired_items: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """sha256 over the dataset files, so a bundle records exactly what it was trained on."""
        return fingerprint(self.path)


def fingerprint(path: str | Path) -> str:
    """sha256 over a dataset directory's .csv / .parquet / .json files (names and bytes)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).iterdir()):
        if p.is_file() and p.suffix in (".csv", ".parquet", ".json"):
            h.update(p.name.encode())
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


def _find(path: Path, stem: str, required: bool) -> Path | None:
    for suffix in (".csv", ".parquet"):
        p = path / f"{stem}{suffix}"
        if p.is_file():
            return p
    if required:
        raise DatasetError(f"{path}: missing required file {stem}.csv (or {stem}.parquet)")
    return None


def _read_table(p: Path, separators: Mapping[str, str] | None = None, used: Collection[str] = ()) -> pd.DataFrame:
    """Read every column as str with '' for missing, so validation sees the raw values.

    Parquet list cells are joined with the separator of the declared multi_categorical feature
    in `separators`; in any other column of `used` they are an error (str() of a list would
    silently become one token such as "['a' 'b']").
    """
    try:
        if p.suffix == ".parquet":
            return _parquet_text(p, pd.read_parquet(p), separators or {}, used)
        df = pd.read_csv(p, dtype=str, keep_default_na=False, na_filter=False)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p.name}: {_bad_utf8_where(p, e)}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as e:
        raise DatasetError(f"{p.name}: cannot be parsed: {str(e).splitlines()[0]}") from None
    _check_row_shapes(p)
    return df


def _parquet_text(p: Path, df: pd.DataFrame, separators: Mapping[str, str], used: Collection[str]) -> pd.DataFrame:
    """A Parquet frame (or one record batch of it) as the str columns a CSV read gives."""
    df = _join_list_cells(p, df, separators, used)
    df = _datetimes_as_seconds(df)
    return df.astype(object).where(df.notna(), "").astype(str)


def first_invalid_utf8(p: Path) -> tuple[int, int] | None:
    """(line number, byte value) of the first byte of `p` that is not UTF-8, or None.

    A UnicodeDecodeError only knows an offset into whatever buffer the reader decoded (pandas
    reads in chunks), so the line a user can look at is found by a pass of its own."""
    with open(p, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return n, line[bad.start]
    return None


def _bad_utf8_where(p: Path, e: UnicodeDecodeError) -> str:
    """'line 7: not valid UTF-8 (byte 0xe9)', for the error of a table or schema read."""
    where = first_invalid_utf8(p)
    if where is None:
        return f"not valid UTF-8 ({e.reason}); save the file as UTF-8"
    return f"line {where[0]}: not valid UTF-8 (byte 0x{where[1]:02x}); save the file as UTF-8"


def _check_row_shapes(p: Path) -> None:
    """Every CSV row must have the header's fields, and header names must be distinct.

    pandas is lenient in three silent ways: it fills a short row (`i999,c1` under a 5-column
    header, a truncated export) with '', which passes as missing feature values; when every row
    has one field more than the header it takes the first column as the index, shifting every
    column by one; and it renames a repeated header name to `name.1`. Each must fail instead.
    One pass of the C csv reader: about 0.2 s per million rows.
    """
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        seen: set[str] = set()
        for name in header:
            if name in seen:
                raise DatasetError(f"{p.name}: line 1: column {name!r} appears twice in the header")
            seen.add(name)
        for row in reader:
            if row and len(row) != len(header):
                why = "a truncated row?" if len(row) < len(header) else "a separator inside an unquoted value?"
                raise DatasetError(
                    f"{p.name}: line {reader.line_num}: {len(row)} field(s) where the header has {len(header)} ({why})"
                )


def _join_list_cells(p: Path, df: pd.DataFrame, separators: Mapping[str, str], used: Collection[str]) -> pd.DataFrame:
    """Parquet list<string> cells → separator-joined strings in multi_categorical columns."""
    for col in df.columns:
        if df[col].dtype != object:
            continue
        is_list = df[col].map(lambda v: isinstance(v, (list, tuple, np.ndarray))).to_numpy(dtype=bool)
        if not is_list.any():
            continue
        if col not in separators:
            if col in used:
                i = int(np.flatnonzero(is_list)[0])
                raise DatasetError(
                    f"{p.name}: row {i}, column '{col}': a list value; only multi_categorical features may hold lists"
                )
            continue
        sep = separators[col]
        df[col] = [
            sep.join(str(t) for t in v if not is_missing(t)) if isinstance(v, (list, tuple, np.ndarray)) else v
            for v in df[col]
        ]
    return df


def _datetimes_as_seconds(df: pd.DataFrame) -> pd.DataFrame:
    """Parquet timestamp columns → integer Unix seconds (UTC; naive times are taken as UTC).

    Parquet has a native timestamp type, and exports use it; as text ('2024-01-01 00:00:00')
    it would only be rejected as "not an integer number of seconds". Sub-second parts are
    floored: the contract's unit is the second.
    """
    for col in df.columns:
        if pd.api.types.is_datetime64_any_dtype(df[col]):
            t = df[col].dt.tz_localize("UTC") if df[col].dt.tz is None else df[col].dt.tz_convert("UTC")
            secs = t.astype("datetime64[s, UTC]").astype("int64").astype(object)
            df[col] = secs.where(t.notna(), None)
    return df


def _multi_separators(feats: Mapping[str, FeatureSpec | AttributeSpec]) -> dict[str, str]:
    return {n: s.separator for n, s in feats.items() if s.type == "multi_categorical"}


def _line(p: Path, row: int) -> str:
    """Human line reference: CSV data row i is line i + 2 (line 1 is the header)."""
    return f"line {row + 2}" if p.suffix == ".csv" else f"row {row}"


def _require_columns(p: Path, df: pd.DataFrame, cols: list[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DatasetError(f"{p.name}: missing column(s) {missing}; found {list(df.columns)}")


def _check_ids(p: Path, df: pd.DataFrame, col: str) -> None:
    empty = np.flatnonzero(df[col].str.strip().to_numpy() == "")
    if len(empty):
        raise DatasetError(f"{p.name}: {_line(p, int(empty[0]))}, column '{col}': empty id")


def _check_features(p: Path, df: pd.DataFrame, feats: dict[str, FeatureSpec]) -> None:
    _require_columns(p, df, list(feats))
    for name, spec in feats.items():
        if spec.type != "continuous":
            continue
        col = df[name]
        values = pd.to_numeric(col.where(col != "", None), errors="coerce")
        bad = np.flatnonzero((values.isna() & (col != "")).to_numpy())
        if len(bad):
            i = int(bad[0])
            raise DatasetError(f"{p.name}: {_line(p, i)}, column '{name}': {col.iloc[i]!r} is not a number")
        nonfinite = np.flatnonzero(~np.isfinite(values.fillna(0.0).to_numpy(dtype=np.float64)))
        if len(nonfinite):
            i = int(nonfinite[0])
            raise DatasetError(f"{p.name}: {_line(p, i)}, column '{name}': {col.iloc[i]!r} is not finite")


def _check_attributes(p: Path, df: pd.DataFrame, attrs: Mapping[str, AttributeSpec]) -> None:
    """The filterable columns (INTERFACES.md §4): present, numbers finite, bools literal."""
    _require_columns(p, df, list(attrs))
    continuous = {n: FeatureSpec(n, "continuous") for n, a in attrs.items() if a.type == "continuous"}
    _check_features(p, df, continuous)
    for name, spec in attrs.items():
        if spec.type != "bool":
            continue
        col = df[name].str.strip().str.lower()
        ok = col.isin([*BOOL_TRUE, *BOOL_FALSE, ""]).to_numpy()
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise DatasetError(
                f"{p.name}: {_line(p, i)}, column '{name}': {df[name].iloc[i]!r} is not a bool (true/false/1/0, any case)"
            )


def parse_bool(values: pd.Series) -> np.ndarray:
    """Checked bool cells → int8: 1 true, 0 false, -1 missing ('')."""
    col = values.str.strip().str.lower()
    out = np.full(len(col), -1, dtype=np.int8)
    out[col.isin(BOOL_TRUE).to_numpy()] = 1
    out[col.isin(BOOL_FALSE).to_numpy()] = 0
    return out


def read_schema(path: str | Path) -> Schema:
    p = Path(path) / "schema.json"
    if not p.is_file():
        raise DatasetError(f"{Path(path)}: missing required file schema.json")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DatasetError(f"schema.json: {_bad_utf8_where(p, e)}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"schema.json: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    return Schema.from_json(obj)


def _check_id_column(p: Path, df: pd.DataFrame, id_col: str) -> None:
    """items.csv / users.csv's id column: present, valid ids, each id once (the first
    duplicate named by its line)."""
    _require_columns(p, df, [id_col])
    _check_ids(p, df, id_col)
    dup = df[id_col].duplicated(keep="first").to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise DatasetError(f"{p.name}: {_line(p, i)}, column '{id_col}': duplicate id {df[id_col].iloc[i]!r}")


def _read_entities(
    p: Path, id_col: str, feats: dict[str, FeatureSpec], attrs: Mapping[str, AttributeSpec] | None = None
) -> pd.DataFrame:
    """items.csv / users.csv: one row per unique, non-empty id, with the declared feature columns
    (and, for items, the declared attribute columns)."""
    attrs = attrs or {}
    df = _read_table(p, {**_multi_separators(attrs), **_multi_separators(feats)}, [id_col, *feats, *attrs])
    _check_id_column(p, df, id_col)
    _check_features(p, df, feats)
    _check_attributes(p, df, attrs)
    return df.reset_index(drop=True)


def read_items(path: str | Path, schema: Schema | None = None) -> pd.DataFrame:
    """The validated catalog: item_id (str) + the declared item feature and attribute columns, file order."""
    path = Path(path)
    schema = schema or read_schema(path)
    p = _find(path, "items", required=True)
    df = _read_entities(p, "item_id", schema.item, schema.item_attributes)
    if len(df) == 0:
        raise DatasetError(f"{p.name}: the catalog is empty")
    return df


def read_item_rows(path: str | Path, schema: Schema) -> pd.DataFrame:
    """Rows in the items.csv format from any .csv / .parquet file (`indexer update --upsert`):
    validated like items.csv (ids unique, declared features and attributes); may be empty."""
    return _read_entities(Path(path), "item_id", schema.item, schema.item_attributes)


def read_users(path: str | Path, schema: Schema) -> pd.DataFrame | None:
    path = Path(path)
    p = _find(path, "users", required=False)
    if p is None:
        if schema.user:
            raise DatasetError(f"{path}: schema.json declares user features {sorted(schema.user)} but there is no users.csv")
        return None
    return _read_entities(p, "user_id", schema.user)


INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "weight", "clicked")


def _interaction_columns(p: Path, df: pd.DataFrame, row0: int = 0) -> dict[str, np.ndarray]:
    """Validate rows `row0 ...` of interactions (str columns, '' missing) → typed columns.

    Shared by the in-memory reader (one chunk: the whole file) and the streaming, integer-coding
    one (`read_interactions_coded`, chunk by chunk), so both accept and reject exactly the same
    files with the same messages. Checks that need every row (all weights 0, unknown items) are
    the callers'.
    """
    _require_columns(p, df, ["user_id", "item_id", "timestamp"])
    for col in ("user_id", "item_id"):
        empty = np.flatnonzero(df[col].str.strip().to_numpy() == "")
        if len(empty):
            raise DatasetError(f"{p.name}: {_line(p, row0 + int(empty[0]))}, column '{col}': empty id")
    ts = pd.to_numeric(df["timestamp"], errors="coerce")
    tsf = ts.to_numpy(dtype=np.float64, na_value=np.nan)
    # 'inf' and '1e25' parse as numbers but would cast to int64's minimum: a silent wrong order
    bad = np.flatnonzero(~np.isfinite(tsf) | (tsf != np.round(tsf)) | (np.abs(tsf) >= INT64_BOUND))
    if len(bad):
        i = int(bad[0])
        raise DatasetError(
            f"{p.name}: {_line(p, row0 + i)}, column 'timestamp': {df['timestamp'].iloc[i]!r} is not an integer number "
            "of seconds (finite, within the int64 range)"
        )
    out = {  # ids stay Series: a coder factorizes them without a Python string per row
        "user_id": df["user_id"],
        "item_id": df["item_id"],
        "timestamp": ts.to_numpy(dtype=np.int64),
    }
    if "weight" in df.columns:
        w = pd.to_numeric(df["weight"].where(df["weight"] != "", "1"), errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
        if len(bad):
            i = int(bad[0])
            raise DatasetError(
                f"{p.name}: {_line(p, row0 + i)}, column 'weight': {df['weight'].iloc[i]!r} is not a finite non-negative number"
            )
        out["weight"] = w.astype(np.float32)
    else:
        out["weight"] = np.ones(len(df), dtype=np.float32)
    if "clicked" in df.columns:
        c = df["clicked"].str.strip().str.lower()
        ok = c.isin(["1", "0", "true", "false", ""])
        if not ok.all():
            i = int(np.flatnonzero(~ok.to_numpy())[0])
            raise DatasetError(
                f"{p.name}: {_line(p, row0 + i)}, column 'clicked': {df['clicked'].iloc[i]!r} is not 0/1/true/false"
            )
        out["clicked"] = ~c.isin(["0", "false"]).to_numpy()
    else:
        out["clicked"] = np.ones(len(df), dtype=bool)
    return out


def _unknown_items_error(p: Path, first_row: int, item: str, count: int) -> DatasetError:
    return DatasetError(
        f"{p.name}: {_line(p, first_row)}, column 'item_id': {item!r} is not in items "
        f"({count} row(s) reference items missing from the catalog)"
    )


def read_interactions(path: str | Path, catalog_ids: pd.Index | None = None) -> pd.DataFrame:
    path = Path(path)
    p = _find(path, "interactions", required=True)
    df = _read_table(p, used=list(INTERACTION_COLUMNS))
    cols = _interaction_columns(p, df)
    out = pd.DataFrame(cols | {"user_id": cols["user_id"].to_numpy(), "item_id": cols["item_id"].to_numpy()})
    if "weight" in df.columns and not (out["weight"] > 0).any():
        raise DatasetError(f"{p.name}: column 'weight': every weight is 0; nothing to train on")
    if catalog_ids is not None:
        unknown = np.flatnonzero(~out["item_id"].isin(catalog_ids).to_numpy())
        if len(unknown):
            i = int(unknown[0])
            raise _unknown_items_error(p, i, out["item_id"].iloc[i], len(unknown))
    if len(out) == 0:
        raise DatasetError(f"{p.name}: no interactions")
    return out


class IdCoder:
    """Growing id → integer code map: the ids given up front (users.csv or the catalog, in file
    order) are codes 0..n-1, every other id gets the next code at its first appearance.

    So codes are the order of `pd.unique(known ∪ ids in file order)`: exactly the user-table rows
    (`training.train.user_table`) and the catalog rows + retired items of `read_dataset`. The
    known ids are looked up through one pandas hash index (built once, C), the others through a
    dict; a chunk costs a `pd.factorize` plus a Python step per *new* id of the chunk, and memory
    is O(distinct ids), never O(rows).
    """

    def __init__(self, known: pd.Index | Collection[str] = ()) -> None:
        self._known = known if isinstance(known, pd.Index) else pd.Index(np.asarray(list(known), dtype=object))
        if not self._known.is_unique:
            raise ValueError("IdCoder: the known ids must be unique")
        self._extra: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._known) + len(self._extra)

    @property
    def n_known(self) -> int:
        return len(self._known)

    def encode(self, values: pd.Series | np.ndarray) -> np.ndarray:
        """Codes of `values` (new ids are added), int32 while the vocabulary fits, else int64."""
        codes, uniques = pd.factorize(values if isinstance(values, pd.Series) else pd.Series(values, dtype=object))
        uniques = np.asarray(uniques, dtype=object)
        pos = self._known.get_indexer(uniques) if len(self._known) else np.full(len(uniques), -1, dtype=np.int64)
        miss = np.flatnonzero(pos < 0)
        if len(miss):
            extra, base = self._extra, len(self._known)
            pos[miss] = [base + extra.setdefault(u, len(extra)) for u in uniques[miss]]  # len() before insertion
        dtype = np.int32 if len(self) < 2**31 else np.int64
        return pos.astype(dtype)[codes]

    def ids(self) -> np.ndarray:
        """code → id (object array of str)."""
        out = np.empty(len(self), dtype=object)
        out[: len(self._known)] = self._known.to_numpy(dtype=object)
        out[len(self._known):] = list(self._extra)
        return out


@dataclass
class CodedInteractions:
    """interactions.csv / .parquet as integer-coded columns, one entry per row in file order.

    `user` / `item` are codes into `user_ids` / `item_ids` (int32 below 2^31 distinct ids):
    `item_ids` is the catalog in items.csv order (`n_catalog` of them), then the retired items
    (clicked, no longer in items.csv) in first-click order, as `read_dataset` orders `items`;
    `user_ids` is users.csv's ids, then the other users in first-click order (`user_table`).
    21 bytes a row (4 + 4 + 8 + 4 + 1), against ~150 for the str frame of `read_interactions`.
    """

    user: np.ndarray          # int32 (int64 beyond 2^31 ids)
    item: np.ndarray
    timestamp: np.ndarray     # int64 seconds
    weight: np.ndarray        # float32
    clicked: np.ndarray       # bool
    user_ids: np.ndarray      # object str, code → id
    item_ids: np.ndarray
    n_catalog: int

    def __len__(self) -> int:
        return len(self.user)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.user, self.item, self.timestamp, self.weight, self.clicked))

    @property
    def retired_items(self) -> tuple[str, ...]:
        return tuple(self.item_ids[self.n_catalog:].tolist())

    def frame(self, rows: np.ndarray | slice = slice(None)) -> pd.DataFrame:
        """The rows as `read_interactions` returns them (str ids): for tests and small slices."""
        return pd.DataFrame({
            "user_id": self.user_ids[self.user[rows]],
            "item_id": self.item_ids[self.item[rows]],
            "timestamp": self.timestamp[rows],
            "weight": self.weight[rows],
            "clicked": self.clicked[rows],
        })


CHUNK_ROWS = 1 << 20


def _interaction_chunks(p: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """interactions.csv / .parquet as str frames of at most `chunk_rows` rows, only the columns
    the reader uses (extra columns are never materialized)."""
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(p)
            cols = [c for c in f.schema_arrow.names if c in INTERACTION_COLUMNS]
            for batch in f.iter_batches(batch_size=chunk_rows, columns=cols):
                yield _parquet_text(p, batch.to_pandas(), {}, INTERACTION_COLUMNS)
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these
            raise DatasetError(f"{p.name}: cannot be parsed: {str(e).splitlines()[0]}") from None
        return
    try:
        reader = pd.read_csv(p, dtype=str, keep_default_na=False, na_filter=False, chunksize=chunk_rows,
                             usecols=lambda c: c in INTERACTION_COLUMNS)
        with reader:
            yield from reader
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p.name}: {_bad_utf8_where(p, e)}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as e:
        raise DatasetError(f"{p.name}: cannot be parsed: {str(e).splitlines()[0]}") from None


def read_interactions_coded(
    path: str | Path, items: pd.Index | Collection[str], users: pd.Index | Collection[str] = (), *,
    allow_retired: bool = True, chunk_rows: int = CHUNK_ROWS,
) -> CodedInteractions:
    """Stream interactions in chunks of `chunk_rows`, validating each exactly as
    `read_interactions` does and integer-coding its ids as it goes (`IdCoder`): peak memory is
    the coded columns (21 bytes a row; 29 while the last column's chunks are joined) plus one
    chunk of text, not a frame of strings. `items`: the catalog ids (items.csv order); `users`: users.csv's ids, if any.
    """
    path = Path(path)
    p = _find(path, "interactions", required=True)
    if p.suffix == ".csv":
        _check_row_shapes(p)  # the same pass as the in-memory reader: short rows, shifted columns
    item_coder, user_coder = IdCoder(items), IdCoder(users)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "item", "timestamp", "weight", "clicked")}
    n, has_weight = 0, False
    for df in _interaction_chunks(p, chunk_rows):
        c = _interaction_columns(p, df, n)
        has_weight |= "weight" in df.columns
        cols["user"].append(user_coder.encode(c["user_id"]))
        cols["item"].append(item_coder.encode(c["item_id"]))
        for k in ("timestamp", "weight", "clicked"):
            cols[k].append(c[k])
        n += len(df)
        del df, c
    if n == 0:
        raise DatasetError(f"{p.name}: no interactions")
    out = {}
    for k in list(cols):  # column by column, freeing its chunks: the peak is the chunks + one column
        parts = cols.pop(k)
        out[k] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        del parts
    if has_weight and not (out["weight"] > 0).any():
        raise DatasetError(f"{p.name}: column 'weight': every weight is 0; nothing to train on")
    item_ids = item_coder.ids()
    if not allow_retired and len(item_ids) > item_coder.n_known:
        gone = out["item"] >= item_coder.n_known
        i = int(np.argmax(gone))
        raise _unknown_items_error(p, i, item_ids[out["item"][i]], int(gone.sum()))
    return CodedInteractions(
        user=out["user"], item=out["item"], timestamp=out["timestamp"], weight=out["weight"], clicked=out["clicked"],
        user_ids=user_coder.ids(), item_ids=item_ids, n_catalog=item_coder.n_known,
    )


def _read_id_column(p: Path, id_col: str) -> pd.Index:
    """Only the id column of items / users (.csv or .parquet), with `_read_entities`' id checks
    (present, non-empty, unique): what integer-coding needs, without the feature columns."""
    try:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.ParquetFile(p).schema_arrow.names
            df = _parquet_text(p, pd.read_parquet(p, columns=[c for c in names if c == id_col]), {}, [id_col])
        else:
            df = pd.read_csv(p, dtype=str, keep_default_na=False, na_filter=False, usecols=lambda c: c == id_col)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p.name}: {_bad_utf8_where(p, e)}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as e:
        raise DatasetError(f"{p.name}: cannot be parsed: {str(e).splitlines()[0]}") from None
    _check_id_column(p, df, id_col)
    return pd.Index(df[id_col].to_numpy(dtype=object))


def read_coded(path: str | Path, *, allow_retired: bool = True, chunk_rows: int = CHUNK_ROWS) -> CodedInteractions:
    """A dataset directory's interactions, integer-coded against its catalog and users.csv ids
    (`read_interactions_coded`); only the id columns of items / users are read."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: not a dataset directory")
    items = _read_id_column(_find(path, "items", required=True), "item_id")
    if len(items) == 0:
        raise DatasetError(f"{_find(path, 'items', required=True).name}: the catalog is empty")
    users_file = _find(path, "users", required=False)
    users = _read_id_column(users_file, "user_id") if users_file is not None else pd.Index([], dtype=object)
    return read_interactions_coded(path, items, users, allow_retired=allow_retired, chunk_rows=chunk_rows)


@dataclass
class CodedSplit:
    """The EVAL.md partitions of `CodedInteractions` as row positions (int32 below 2^31 rows),
    each in the row
    order of the frames of `training.split.split_interactions` (warm rows by user, timestamp,
    item id; cold rows in file order), so `coded.frame(split.fit)` equals `split_interactions(...).fit`.
    """

    train: np.ndarray
    fit: np.ndarray
    val: np.ndarray
    test: np.ndarray
    cold: np.ndarray


def _sort_ranks(ids: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Dense rank of each code's id under `split.id_sort_key`, decided over the codes `present`
    (as the split decides integer vs text over the warm rows' ids); equal keys ('01', '1') tie."""
    from training.split import id_sort_key

    rank = np.zeros(len(ids), dtype=np.int32 if len(ids) < 2**31 else np.int64)
    key = id_sort_key(pd.Series(ids[present], dtype=object)).to_numpy()
    rank[present] = np.unique(key, return_inverse=True)[1].reshape(-1)
    return rank


def _tail_rows(users: np.ndarray, frac: float) -> np.ndarray:
    """True for each user's last ceil(frac * n) rows of `users` (codes, rows in split order;
    one user's rows need not be contiguous when two ids tie in the sort key)."""
    n = len(users)
    if n == 0:
        return np.zeros(0, dtype=bool)
    starts = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1]
    if len(starts) == np.count_nonzero(np.bincount(users)):
        # each user's rows are one run (the usual case): mark [end - n_last, end) of each run
        # with +1/-1 and a running sum, 2 bytes a row instead of sorting
        sizes = np.diff(np.r_[starts, n])
        end = starts + sizes
        mark = np.zeros(n + 1, dtype=np.int8)
        np.add.at(mark, end - np.ceil(sizes * frac - 1e-9).astype(np.int64), 1)
        np.add.at(mark, end, -1)
        return np.cumsum(mark[:n], dtype=np.int8) > 0
    order = np.argsort(users, kind="stable")
    u = users[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    sizes = np.diff(np.r_[starts, n])
    n_last = np.ceil(sizes * frac - 1e-9).astype(np.int64)
    # position of each sorted row from its group's end: the last n_last of each group are the tail
    end = np.repeat(starts + sizes, sizes)
    tail_sorted = (end - np.arange(n)) <= np.repeat(n_last, sizes)
    out = np.empty(n, dtype=bool)
    out[order] = tail_sorted
    return out


def split_coded(coded: CodedInteractions) -> CodedSplit:
    """`training.split.split_interactions` on integer-coded rows: the same rules (cold users by
    `is_cold_user` over the distinct ids, warm rows by user, timestamp, item id; the tails of
    each user's rows), in numpy over the codes. Peak memory is a few int64 arrays over the
    clicked rows (lexsort and the tail masks), not a sorted copy of a str frame."""
    from training.split import is_cold_user

    clicked = np.flatnonzero(coded.clicked)
    if len(coded) < 2**31:
        clicked = clicked.astype(np.int32)  # positions: half the memory of every array below
    cold_user = np.fromiter((is_cold_user(u) for u in coded.user_ids), dtype=bool, count=len(coded.user_ids))
    is_cold = cold_user[coded.user[clicked]]
    cold = clicked[is_cold]
    warm = clicked[~is_cold]
    del clicked, is_cold
    wu, wi = coded.user[warm], coded.item[warm]
    seen_u = np.zeros(len(coded.user_ids), dtype=bool)
    seen_u[wu] = True
    seen_i = np.zeros(len(coded.item_ids), dtype=bool)
    seen_i[wi] = True
    order = np.lexsort((_sort_ranks(coded.item_ids, seen_i)[wi], coded.timestamp[warm],
                        _sort_ranks(coded.user_ids, seen_u)[wu]))  # last key first: user, time, item
    del wu, wi
    warm = warm[order]  # keeps warm's dtype
    del order
    is_test = _tail_rows(coded.user[warm], 0.2)
    test, train = warm[is_test], warm[~is_test]
    del warm, is_test
    is_val = _tail_rows(coded.user[train], 0.1)
    return CodedSplit(train=train, fit=train[~is_val], val=train[is_val], test=test, cold=cold)


def read_dataset(path: str | Path, *, allow_retired: bool = True) -> Dataset:
    """Read and validate a whole dataset directory; raises DatasetError naming the problem.

    Clicks on items that are no longer in items.csv (a retired product) are real signal and real
    negatives, so they train: such items join `items` after the catalog with every feature
    missing (their id embedding still learns) and are listed in `retired_items`. The index is
    built from items.csv alone, so they are never served. `allow_retired=False` rejects such
    rows instead, naming the first (a converter checking its own output).
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: not a dataset directory")
    schema = read_schema(path)
    items = read_items(path, schema)
    users = read_users(path, schema)
    catalog = pd.Index(items["item_id"])
    interactions = read_interactions(path, None if allow_retired else catalog)
    retired: tuple[str, ...] = ()
    gone = ~interactions["item_id"].isin(catalog).to_numpy()
    if gone.any():
        retired = tuple(pd.unique(interactions["item_id"].to_numpy()[gone]).tolist())
        log.info(
            "interactions: %d row(s) on %d retired item(s) (not in items.csv): they train with missing features "
            "and are never indexed", int(gone.sum()), len(retired),
        )
        filler = pd.DataFrame({c: [""] * len(retired) for c in items.columns})
        filler["item_id"] = list(retired)
        items = pd.concat([items, filler], ignore_index=True)
    return Dataset(path=path, schema=schema, interactions=interactions, items=items, users=users, retired_items=retired)


def parse_continuous(values: pd.Series) -> np.ndarray:
    """Strings → float64 with NaN for missing ('')."""
    return pd.to_numeric(values.where(values != "", None), errors="coerce").to_numpy(dtype=np.float64)


def is_missing(value: object) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))
