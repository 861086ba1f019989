"""Item attributes of an index version and the filters requests apply to them: pure numpy.

`schema.json` may declare filterable columns of `items.csv` (`item.attributes`, INTERFACES.md §4,
parsed and value-checked in `training.schema` / `training.dataset`). `indexer rebuild` turns them
into an `AttributeTable` stored in the version directory; the service memory-maps it with the
version and evaluates each request's `filter` into an `indexer.topk.Allowed` row mask, which the
one top-k (`indexer.topk`) honours with its exact-k guarantee.

**Columnar, dictionary-coded** (one small set of `.npy` files per attribute, listed with their
sha256 in the manifest, memory-mapped on load):

| type | arrays | missing |
|---|---|---|
| `categorical` | `codes` int32 (n,) into a sorted dictionary (`values.json`) | code -1 |
| `multi_categorical` | CSR: `offsets` int64 (n+1,), `codes` int32 (nnz,), each row's codes unique | an empty row |
| `continuous` | `values` float64 (n,) | NaN |
| `bool` | `values` int8 (n,): 1 true, 0 false | -1 |

Why codes and not per-value bitmaps: a bitmap per value costs n/8 bytes per *value*, so a
high-cardinality column (a seller, a brand: 10^5 values) would need gigabytes at 1M items, while
codes cost 4 bytes per row whatever the cardinality. Any set condition (`in`, `not_in`, `any`,
`all`, equality) is one lookup table over the dictionary gathered by the codes — a single
vectorized pass, ~1 ms per condition at 1M items, independent of how many values the condition
lists. A filter's mask is cached per table (`AttributeTable.allowed`, an LRU bounded in bytes):
production filters repeat (a region, "in stock"), and the table belongs to one immutable version,
so a cached mask can never be applied to another version's rows.

Matching rules (INTERFACES.md §4): all conditions of a filter are ANDed; an item whose attribute
is missing matches no condition on it except `{"exists": false}`; a multi-valued attribute
matches a scalar or `in` if any of its values matches, `all` if it holds every listed value,
`not_in` if it holds none of them (and has at least one value).
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from indexer.topk import Allowed
from training.schema import ATTRIBUTE_TYPES, AttributeSpec

__all__ = [
    "ATTRIBUTES_DIR",
    "AttributeTable",
    "Condition",
    "Filter",
    "FilterError",
    "OPERATORS",
    "parse_condition",
    "parse_filter",
]

ATTRIBUTES_DIR = "attributes"
OPERATORS = ("in", "not_in", "gte", "lte", "exists", "any", "all")
FILTER_CACHE_BYTES = 64 << 20  # per table; at 1M items a cached filter takes ~1.1-9 MB
# A condition matching at most max(MIN, FRACTION × n) rows is answered from its column's index
# (sorted rows of a value / a range) instead of a pass over every row: at 1M rows the pass costs
# ~0.3-0.4 ms plus ~0.2-0.5 ms to list its rows, sorting 10k indexed rows ~0.5 ms.
INDEXED_ROWS_MIN = 1000
INDEXED_ROWS_FRACTION = 0.02
DEFAULT_MAX_VALUES = 1000

Scalar = str | float | int | bool


class FilterError(ValueError):
    """A filter that is malformed or does not fit the version's attributes. `attribute` names the
    filter key at fault (None: the filter as a whole), so the service answers a 422 at
    `body.filter.<attribute>`."""

    def __init__(self, attribute: str | None, message: str) -> None:
        super().__init__(f"{attribute}: {message}" if attribute is not None else message)
        self.attribute = attribute
        self.message = message


class AttributeFileError(ValueError):
    """An attribute file of a version is missing, malformed or inconsistent with the manifest."""


@dataclass(frozen=True)
class Condition:
    """One parsed condition on one attribute (type-independent; the table checks the types).

    `op`: `eq` (a scalar), `in`, `not_in`, `any`, `all` (a tuple of scalars), `range` (`values` =
    (gte or None, lte or None)), `exists` (`values` = (bool,)).
    """

    op: str
    values: tuple


Filter = Mapping[str, Condition]


def _kind(value: object) -> str:
    """'string', 'number' or 'bool' for a JSON scalar, else 'other'."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (int, float)):
        return "number"
    return "other"


def _scalar(value: object, what: str) -> Scalar:
    kind = _kind(value)
    if kind == "other":
        raise FilterError(None, f"{what} must be a string, a number or a boolean, got {type(value).__name__}")
    if kind == "number":
        try:
            finite = math.isfinite(value)  # type: ignore[arg-type]
        except OverflowError:
            finite = False
        if not finite:
            raise FilterError(None, f"{what} must be a finite number (NaN and infinity are not allowed)")
    return value  # type: ignore[return-value]


def parse_condition(raw: object, *, max_values: int = DEFAULT_MAX_VALUES) -> Condition:
    """One condition of the request grammar (README, "Filters"), or FilterError(None, why).

    A scalar is equality; an object holds exactly one operator, except that `gte` and `lte` may
    be combined (either alone is an open range). Lists must be non-empty and at most
    `max_values` long; numbers must be finite.
    """
    if not isinstance(raw, dict):
        return Condition("eq", (_scalar(raw, "an equality value"),))
    if not raw:
        raise FilterError(None, f"an empty condition object; use one of {list(OPERATORS)}")
    unknown = [k for k in raw if k not in OPERATORS]
    if unknown:
        raise FilterError(None, f"unknown operator {str(unknown[0])[:40]!r}; expected one of {list(OPERATORS)}")
    ops = set(raw)
    if ops <= {"gte", "lte"}:
        bounds = []
        for op in ("gte", "lte"):
            v = raw.get(op)
            if v is not None and _kind(v) != "number":
                raise FilterError(None, f"'{op}' must be a number, got {type(v).__name__}")
            bounds.append(None if v is None else float(_scalar(v, f"'{op}'")))
        if bounds == [None, None]:
            raise FilterError(None, "a range needs at least one of 'gte' and 'lte' as a number")
        return Condition("range", tuple(bounds))
    if len(ops) > 1:
        raise FilterError(None, f"one operator per condition ({sorted(ops)} given; only 'gte' and 'lte' combine)")
    (op,) = ops
    value = raw[op]
    if op == "exists":
        if not isinstance(value, bool):
            raise FilterError(None, f"'exists' must be true or false, got {type(value).__name__}")
        return Condition("exists", (value,))
    if not isinstance(value, list):
        raise FilterError(None, f"'{op}' must be a list of values, got {type(value).__name__}")
    if not value:
        raise FilterError(None, f"'{op}' must list at least one value")
    if len(value) > max_values:
        raise FilterError(None, f"'{op}' lists {len(value)} values; at most {max_values} are allowed")
    return Condition(op, tuple(_scalar(v, f"each value of '{op}'") for v in value))


def parse_filter(raw: object, *, max_values: int = DEFAULT_MAX_VALUES) -> dict[str, Condition]:
    """A whole filter object (attribute -> condition), FilterError naming the attribute at fault."""
    if not isinstance(raw, dict):
        raise FilterError(None, f"a filter must be an object mapping attribute -> condition, got {type(raw).__name__}")
    out = {}
    for name, cond in raw.items():
        try:
            out[name] = parse_condition(cond, max_values=max_values)
        except FilterError as e:
            raise FilterError(name, e.message) from None
    return out


# ---- columns -----------------------------------------------------------------------------------

# which operators, and which value kind, each attribute type takes
_OPS = {
    "categorical": ("eq", "in", "not_in", "exists"),
    "multi_categorical": ("eq", "in", "not_in", "any", "all", "exists"),
    "continuous": ("eq", "in", "not_in", "range", "exists"),
    "bool": ("eq", "in", "not_in", "exists"),
}
_VALUE_KIND = {"categorical": "string", "multi_categorical": "string", "continuous": "number", "bool": "bool"}
_OP_NAMES = {"eq": "a scalar (equality)", "range": "gte/lte"}


def _lookup(dictionary_size: int, codes: np.ndarray) -> np.ndarray:
    """A bool table over the dictionary, True at `codes`; its last entry (code -1) stays False."""
    lut = np.zeros(dictionary_size + 1, dtype=bool)
    lut[codes] = True
    return lut


class Column:
    """One attribute's arrays over the catalog rows (subclasses per type)."""

    spec: AttributeSpec
    parts: tuple[str, ...] = ()

    def __init__(self, spec: AttributeSpec, arrays: dict[str, np.ndarray], values: list[str] | None) -> None:
        self.spec = spec
        self.arrays = arrays
        self.values = values  # the dictionary of a (multi_)categorical column, sorted
        self.index = {v: i for i, v in enumerate(values)} if values is not None else None

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())

    def check(self, cond: Condition) -> None:
        """FilterError(None, why) unless `cond` applies to this attribute's type."""
        t = self.spec.type
        if cond.op not in _OPS[t]:
            allowed = ", ".join(_OP_NAMES.get(o, f"'{o}'") for o in _OPS[t])
            name = _OP_NAMES.get(cond.op, f"'{cond.op}'")
            raise FilterError(None, f"{name} does not apply to a {t} attribute (use {allowed})")
        if cond.op in ("range", "exists"):
            return
        want = _VALUE_KIND[t]
        for v in cond.values:
            if _kind(v) != want:
                raise FilterError(None, f"a {t} attribute takes {want} values, got a {_kind(v)}")

    def codes_of(self, values: Sequence[Scalar]) -> np.ndarray:
        """Dictionary codes of the listed values that the catalog holds (others match nothing)."""
        assert self.index is not None
        return np.array([self.index[v] for v in values if v in self.index], dtype=np.int64)

    def mask(self, cond: Condition, rows: np.ndarray | None = None) -> np.ndarray:  # pragma: no cover - abstract
        """The rows (all, or only `rows`) satisfying `cond`, as a bool array."""
        raise NotImplementedError

    def present(self, rows: np.ndarray | None = None) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def matching_rows(self, cond: Condition, limit: int) -> np.ndarray | None:
        """The sorted rows satisfying `cond` from this column's index, without a pass over every
        row — or None when the column has no index for `cond` or more than `limit` rows match
        (then a pass over the rows is as cheap)."""
        return None

    def _main(self, part: str, rows: np.ndarray | None) -> np.ndarray:
        a = self.arrays[part]
        return a if rows is None else a.take(rows)


class CategoricalColumn(Column):
    parts = ("codes",)

    def present(self, rows: np.ndarray | None = None) -> np.ndarray:
        return self._main("codes", rows) >= 0

    @cached_property
    def postings(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows ordered by code then row, start of each code's run; code -1 first): the inverted
        index of the column, built on first use (~50 ms at 1M rows)."""
        codes = self.arrays["codes"]
        order = np.argsort(codes, kind="stable")
        starts = np.zeros(len(self.values or ()) + 2, dtype=np.int64)
        np.cumsum(np.bincount(codes + 1, minlength=len(self.values or ()) + 1), out=starts[1:])
        return order, starts

    def matching_rows(self, cond: Condition, limit: int) -> np.ndarray | None:
        if cond.op not in ("eq", "in"):
            return None
        order, starts = self.postings
        codes = np.unique(self.codes_of(cond.values))
        if int(sum(starts[c + 2] - starts[c + 1] for c in codes)) > limit:
            return None
        runs = [order[starts[c + 1] : starts[c + 2]] for c in codes]
        if not runs:
            return np.zeros(0, dtype=np.int64)
        return runs[0].astype(np.int64) if len(runs) == 1 else np.sort(np.concatenate(runs)).astype(np.int64)

    def mask(self, cond: Condition, rows: np.ndarray | None = None) -> np.ndarray:
        codes = self._main("codes", rows)
        if cond.op == "exists":
            return self.present(rows) if cond.values[0] else ~self.present(rows)
        wanted = np.unique(self.codes_of(cond.values))
        if cond.op != "not_in" and len(wanted) <= 4:  # a compare per value beats a gather
            out = np.zeros(len(codes), dtype=bool)
            for c in wanted:
                out |= codes == c
            return out
        lut = _lookup(len(self.values or ()), wanted)
        if cond.op == "not_in":
            lut[:-1] = ~lut[:-1]  # a missing value (code -1, the last entry) still matches nothing
        return lut[codes]


class MultiColumn(Column):
    parts = ("offsets", "codes")

    def counts(self, lut: np.ndarray) -> np.ndarray:
        """Per row, how many of its values are marked in `lut`."""
        offsets, codes = self.arrays["offsets"], self.arrays["codes"]
        hits = np.zeros(len(codes) + 1, dtype=np.int32)
        np.cumsum(lut[codes], out=hits[1:])
        return hits[offsets[1:]] - hits[offsets[:-1]]

    def present(self, rows: np.ndarray | None = None) -> np.ndarray:
        offsets = self.arrays["offsets"]
        out = offsets[1:] > offsets[:-1]
        return out if rows is None else out[rows]

    def mask(self, cond: Condition, rows: np.ndarray | None = None) -> np.ndarray:
        if rows is not None:  # CSR rows are not gathered cheaply; the full pass, then the rows
            return self.mask(cond)[rows]
        if cond.op == "exists":
            return self.present() if cond.values[0] else ~self.present()
        wanted = self.codes_of(cond.values)
        lut = _lookup(len(self.values or ()), wanted)
        if cond.op in ("eq", "in", "any"):
            return self.counts(lut) > 0
        if cond.op == "not_in":
            return (self.counts(lut) == 0) & self.present()
        # all: every listed (distinct) value among the row's (unique) values
        need = len(set(cond.values))
        if len(np.unique(wanted)) < need:  # a listed value no item holds: nothing has them all
            return np.zeros(len(self.arrays["offsets"]) - 1, dtype=bool)
        return self.counts(lut) == need


class ContinuousColumn(Column):
    parts = ("values",)

    def present(self, rows: np.ndarray | None = None) -> np.ndarray:
        return ~np.isnan(self._main("values", rows))

    @cached_property
    def sorted_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows ordered by value, the present values in that order; NaN rows last and left
        out), built on first use (~100 ms at 1M rows)."""
        x = self.arrays["values"]
        order = np.argsort(x, kind="stable")
        present = int(np.count_nonzero(~np.isnan(x)))
        return order, x[order[:present]]

    def matching_rows(self, cond: Condition, limit: int) -> np.ndarray | None:
        if cond.op not in ("eq", "range", "in"):
            return None
        order, values = self.sorted_index
        if cond.op == "range":
            bounds = [cond.values]
        else:
            bounds = [(float(v), float(v)) for v in set(cond.values)]
        spans = []
        for lo, hi in bounds:
            a = 0 if lo is None else int(np.searchsorted(values, lo, side="left"))
            b = len(values) if hi is None else int(np.searchsorted(values, hi, side="right"))
            if b > a:
                spans.append((a, b))
        if sum(b - a for a, b in spans) > limit:
            return None
        if not spans:
            return np.zeros(0, dtype=np.int64)
        return np.sort(np.concatenate([order[a:b] for a, b in spans])).astype(np.int64)

    def mask(self, cond: Condition, rows: np.ndarray | None = None) -> np.ndarray:
        x = self._main("values", rows)
        if cond.op == "exists":
            return self.present(rows) if cond.values[0] else ~self.present(rows)
        if cond.op == "range":
            lo, hi = cond.values
            out = np.ones(len(x), dtype=bool) if lo is None else x >= lo
            return out if hi is None else out & (x <= hi)
        listed = np.array([float(v) for v in cond.values], dtype=np.float64)
        hit = np.isin(x, listed)
        return hit if cond.op != "not_in" else ~hit & ~np.isnan(x)


class BoolColumn(Column):
    parts = ("values",)

    def present(self, rows: np.ndarray | None = None) -> np.ndarray:
        return self._main("values", rows) >= 0

    def mask(self, cond: Condition, rows: np.ndarray | None = None) -> np.ndarray:
        x = self._main("values", rows)
        if cond.op == "exists":
            return self.present(rows) if cond.values[0] else ~self.present(rows)
        listed = {int(v) for v in cond.values}
        lut = np.zeros(3, dtype=bool)  # index 0: false, 1: true, 2 (= -1): missing
        for v in listed:
            lut[v] = True
        if cond.op == "not_in":
            lut[:2] = ~lut[:2]
        return lut[x]


_COLUMN_TYPES: dict[str, type[Column]] = {
    "categorical": CategoricalColumn,
    "multi_categorical": MultiColumn,
    "continuous": ContinuousColumn,
    "bool": BoolColumn,
}
_DTYPES = {("categorical", "codes"): np.int32, ("multi_categorical", "offsets"): np.int64,
           ("multi_categorical", "codes"): np.int32, ("continuous", "values"): np.float64,
           ("bool", "values"): np.int8}


# ---- the table ---------------------------------------------------------------------------------


class AttributeTable:
    """Every attribute of one catalog (row i = row i of embeddings.npy), and filter evaluation.

    Immutable once built or loaded; `allowed` is thread-safe (its cache takes a lock).
    """

    def __init__(
        self, count: int, columns: Mapping[str, Column], *, cache_bytes: int = FILTER_CACHE_BYTES,
        restrict: Callable[[Allowed], Allowed] | None = None,
    ) -> None:
        self.count = int(count)
        self.columns = dict(columns)
        # a delta version's table: every evaluated filter is intersected with the version's live
        # rows (`indexer.topk.DeltaTopK.restrict`) before it is cached, so a request pays it once
        self._restrict = restrict
        self._cache: OrderedDict[tuple, Allowed] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_bytes)
        self._lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    @property
    def specs(self) -> dict[str, AttributeSpec]:
        return {n: c.spec for n, c in self.columns.items()}

    # ---- building (indexer rebuild) ----
    @classmethod
    def from_frame(cls, items: Any, specs: Mapping[str, AttributeSpec]) -> AttributeTable:
        """From the validated catalog (`training.dataset.read_items`: str cells, '' = missing)."""
        import pandas as pd  # the build side only: the request path never builds a table

        from training.dataset import parse_bool, parse_continuous

        n = len(items)
        columns: dict[str, Column] = {}
        for name, spec in specs.items():
            col = items[name].astype(str)
            if spec.type == "categorical":
                values = sorted(set(col.tolist()) - {""})
                codes = pd.Categorical(col.where(col != "", None), categories=values).codes.astype(np.int32)
                columns[name] = CategoricalColumn(spec, {"codes": codes}, values)
            elif spec.type == "multi_categorical":
                tokens = col.str.split(spec.separator, regex=False).explode()
                rows = tokens.index.to_numpy()
                keep = (tokens != "").to_numpy() & tokens.notna().to_numpy()
                pairs = pd.DataFrame({"row": rows[keep], "token": tokens.to_numpy()[keep]}).drop_duplicates()
                values = sorted(set(pairs["token"].tolist()))
                pairs = pairs.sort_values("row", kind="stable")
                codes = pd.Categorical(pairs["token"], categories=values).codes.astype(np.int32)
                offsets = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(np.bincount(pairs["row"].to_numpy(), minlength=n), out=offsets[1:])
                columns[name] = MultiColumn(spec, {"offsets": offsets, "codes": codes}, values)
            elif spec.type == "continuous":
                columns[name] = ContinuousColumn(spec, {"values": parse_continuous(col)}, None)
            elif spec.type == "bool":
                columns[name] = BoolColumn(spec, {"values": parse_bool(col)}, None)
            else:  # pragma: no cover - the schema admits only ATTRIBUTE_TYPES
                raise ValueError(f"attribute {name!r}: unknown type {spec.type!r}; expected one of {ATTRIBUTE_TYPES}")
        # items.csv's index is 0..n-1 (read_items resets it); explode relies on it
        return cls(n, columns)

    # ---- files ----
    def write(self, directory: Path) -> dict:
        """Write `directory/attributes/` (each file fsynced); return the manifest entry
        `{name: {"type", ["separator"], "column", "values"}}`. Files are named by column number,
        never by attribute name (a name may hold any character)."""
        from training.artifacts import write_bytes_durable, write_npy_durable

        (directory / ATTRIBUTES_DIR).mkdir()
        entry = {}
        for i, (name, col) in enumerate(self.columns.items()):
            for part in col.parts:
                write_npy_durable(directory / ATTRIBUTES_DIR / f"{i}.{part}.npy", np.ascontiguousarray(col.arrays[part]))
            if col.values is not None:
                write_bytes_durable(directory / ATTRIBUTES_DIR / f"{i}.values.json", json.dumps(col.values).encode())
            entry[name] = {**col.spec.to_json(), "column": i, "values": None if col.values is None else len(col.values)}
        return entry

    @staticmethod
    def files(entry: Mapping[str, Any]) -> list[str]:
        """The relative paths a manifest entry names (for the version's completeness check)."""
        out = []
        for decl in entry.values():
            i, t = decl["column"], decl["type"]
            out += [f"{ATTRIBUTES_DIR}/{i}.{p}.npy" for p in _COLUMN_TYPES[t].parts]
            if t in ("categorical", "multi_categorical"):
                out.append(f"{ATTRIBUTES_DIR}/{i}.values.json")
        return out

    def to_frame(self) -> Any:
        """The table as items.csv-shaped str cells ('' missing), one row per table row: what
        `from_frame` reads back into the same table (an update carries unchanged rows over)."""
        import pandas as pd

        out = {}
        for name, col in self.columns.items():
            t = col.spec.type
            if t == "categorical":
                values = np.array([*(col.values or ()), ""], dtype=object)
                out[name] = values[np.asarray(col.arrays["codes"])]  # code -1 -> the last entry, ''
            elif t == "multi_categorical":
                values = np.array(col.values or (), dtype=object)
                offsets, codes = np.asarray(col.arrays["offsets"]), np.asarray(col.arrays["codes"])
                sep = col.spec.separator
                out[name] = [sep.join(values[codes[a:b]]) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
            elif t == "continuous":
                x = np.asarray(col.arrays["values"])
                out[name] = ["" if math.isnan(v) else repr(v) for v in x.tolist()]
            else:
                out[name] = np.array(["false", "true", ""], dtype=object)[np.asarray(col.arrays["values"]).astype(np.int64)]
        return pd.DataFrame(out, index=pd.RangeIndex(self.count))

    @classmethod
    def load(cls, directory: Path, entry: object, count: int, restrict: Callable[[Allowed], Allowed] | None = None) -> AttributeTable:
        """Memory-map the attribute files of a version and check them against the manifest entry
        and the catalog size; AttributeFileError naming the attribute and file otherwise."""
        if not isinstance(entry, dict):
            raise AttributeFileError("manifest 'attributes' must be an object")
        columns: dict[str, Column] = {}
        for name, decl in entry.items():
            try:
                spec = AttributeSpec.from_json(name, {k: v for k, v in decl.items() if k in ("type", "separator")},
                                               f"attribute {name!r}")
                i = decl["column"]
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                raise AttributeFileError(f"manifest attribute {name!r} is malformed ({e})") from None
            kind = _COLUMN_TYPES[spec.type]
            arrays = {}
            for part in kind.parts:
                rel = f"{ATTRIBUTES_DIR}/{i}.{part}.npy"
                try:
                    a = np.load(directory / rel, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise AttributeFileError(f"attribute {name!r}: {rel} unreadable ({e})") from None
                want = _DTYPES[(spec.type, part)]
                if a.dtype != want or a.ndim != 1:
                    raise AttributeFileError(f"attribute {name!r}: {rel} is {a.dtype} {a.shape}, expected 1-D {np.dtype(want)}")
                arrays[part] = a.view(np.ndarray)  # np.memmap's Python-level indexing is slow
            values = None
            if spec.type in ("categorical", "multi_categorical"):
                rel = f"{ATTRIBUTES_DIR}/{i}.values.json"
                try:
                    values = json.loads((directory / rel).read_bytes())
                except (OSError, ValueError) as e:
                    raise AttributeFileError(f"attribute {name!r}: {rel} unreadable ({e})") from None
                if not isinstance(values, list) or not all(isinstance(v, str) for v in values) or len(set(values)) != len(values):
                    raise AttributeFileError(f"attribute {name!r}: {rel} must be a list of distinct strings")
                if decl.get("values") != len(values):
                    raise AttributeFileError(f"attribute {name!r}: {rel} holds {len(values)} values, manifest says {decl.get('values')}")
            _check_arrays(name, spec.type, arrays, values, count)
            columns[name] = kind(spec, arrays, values)
        return cls(count, columns, restrict=restrict)

    # ---- filters ----
    def check(self, filt: Filter) -> None:
        """FilterError naming the attribute unless every condition fits this table."""
        for name, cond in filt.items():
            col = self.columns.get(name)
            if col is None:
                known = ", ".join(sorted(self.columns)[:20])
                raise FilterError(name, f"unknown attribute; this index version has: {known}")
            try:
                col.check(cond)
            except FilterError as e:
                raise FilterError(name, e.message) from None

    def mask(self, filt: Filter) -> np.ndarray:
        """The bool mask of the rows satisfying every condition (not cached, not checked)."""
        out = np.ones(self.count, dtype=bool)
        for name, cond in filt.items():
            out &= self.columns[name].mask(cond)
        return out

    def evaluate(self, filt: Filter) -> Allowed:
        """The rows satisfying every condition (not cached, not checked). When one condition is
        selective and indexed (a categorical value, a continuous range: `Column.matching_rows`),
        its rows come from the index and the other conditions are tested on those rows only —
        no pass over the whole catalog; otherwise one vectorized pass per condition."""
        limit = max(INDEXED_ROWS_MIN, int(INDEXED_ROWS_FRACTION * self.count))
        for name, cond in filt.items():
            rows = self.columns[name].matching_rows(cond, limit)
            if rows is None:
                continue
            for other, ocond in filt.items():
                if other != name and len(rows):
                    rows = rows[self.columns[other].mask(ocond, rows)]
            return Allowed.from_rows(rows, self.count)
        return Allowed(self.mask(filt))

    def allowed(self, filt: Filter) -> Allowed:
        """Check `filt` and return the rows it allows, from the cache when it was asked before."""
        self.check(filt)
        key = tuple(sorted((name, cond.op, tuple((_kind(v), v) for v in cond.values)) for name, cond in filt.items()))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        result = self.evaluate(filt)
        if self._restrict is not None:
            result = self._restrict(result)
        size = result.nbytes_estimate
        if size > self._cache_limit:
            return result
        with self._lock:
            if key not in self._cache:
                self._cache[key] = result
                self._cache_bytes += size
                while self._cache_bytes > self._cache_limit:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= old.nbytes_estimate
        return result


def _check_arrays(name: str, atype: str, arrays: dict[str, np.ndarray], values: list[str] | None, count: int) -> None:
    """Shapes and value ranges of one attribute's arrays against the catalog size."""
    def fail(why: str) -> None:
        raise AttributeFileError(f"attribute {name!r}: {why}")

    if atype == "multi_categorical":
        offsets, codes = arrays["offsets"], arrays["codes"]
        if len(offsets) != count + 1:
            fail(f"{len(offsets)} offsets for {count} items (need count + 1)")
        if offsets[0] != 0 or offsets[-1] != len(codes) or (np.diff(offsets) < 0).any():
            fail("offsets must rise from 0 to the number of codes")
        if len(codes) and (codes.min() < 0 or codes.max() >= len(values or ())):
            fail("a code outside the dictionary")
        return
    main = arrays["codes" if atype == "categorical" else "values"]
    if len(main) != count:
        fail(f"{len(main)} rows for {count} items")
    if atype == "categorical" and len(main) and (main.min() < -1 or main.max() >= len(values or ())):
        fail("a code outside the dictionary")
    if atype == "bool" and len(main) and (main.min() < -1 or main.max() > 1):
        fail("a bool value other than -1/0/1")
    if atype == "continuous" and np.isinf(main).any():
        fail("an infinite value")
