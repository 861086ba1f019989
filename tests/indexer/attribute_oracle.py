"""A random catalog with one attribute of each type, and a row-by-row oracle of the filter rules.

The oracle reads the raw `items.csv` cells with plain Python and applies INTERFACES.md §4's rules
literally (missing matches nothing but `{"exists": false}`; a multi-valued attribute matches a
scalar / `in` / `any` if any value matches, `all` if it holds every listed value, `not_in` if it
has values and none is listed), so it shares no code with `indexer.attributes`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.schema import AttributeSpec

SPECS = {
    "color": AttributeSpec("color", "categorical"),
    "labels": AttributeSpec("labels", "multi_categorical", ";"),
    "cost": AttributeSpec("cost", "continuous"),
    "in_stock": AttributeSpec("in_stock", "bool"),
}
SCHEMA_ATTRIBUTES = {n: s.to_json() for n, s in SPECS.items()}


def random_items(n: int, seed: int = 0) -> pd.DataFrame:
    """items.csv cells (str, '' = missing): color power-law over c0..c9, labels 0-3 of t0..t14
    (with repeats and empty tokens), cost with two decimals, in_stock in mixed literals."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, 11) ** 1.2
    color = rng.choice([f"c{i}" for i in range(10)], n, p=weights / weights.sum()).astype(object)
    color[rng.random(n) < 0.1] = ""
    tags = []
    for _ in range(n):
        k = int(rng.integers(0, 4))
        toks = [f"t{int(t)}" for t in rng.integers(0, 15, k)]
        if k and rng.random() < 0.1:
            toks.append("")  # "a;;b" style empty token
        tags.append(";".join(toks))
    price = np.round(rng.uniform(0, 100, n), 2).astype(str).astype(object)
    price[rng.random(n) < 0.1] = ""
    price[:3] = ["10", "10.0", "20"]  # equal numbers written differently
    stock = rng.choice(["true", "False", "1", "0", "TRUE", ""], n).astype(object)
    return pd.DataFrame({
        "item_id": [f"i{i}" for i in range(n)], "color": color, "labels": tags, "cost": price, "in_stock": stock,
    })


def _cell(df: pd.DataFrame, name: str, row: int):  # noqa: ANN202 - per type
    raw = df[name].iloc[row]
    t = SPECS[name].type
    if t == "categorical":
        return raw if raw != "" else None
    if t == "multi_categorical":
        toks = {x for x in raw.split(SPECS[name].separator) if x}
        return toks or None
    if t == "continuous":
        return float(raw) if raw != "" else None
    if raw == "":
        return None
    return raw.strip().lower() in ("true", "1")


def matches(value, cond) -> bool:  # noqa: ANN001 - the oracle of one condition on one cell
    if isinstance(cond, dict) and "exists" in cond:
        return (value is not None) == cond["exists"]
    if value is None:
        return False
    multi = isinstance(value, set)
    if not isinstance(cond, dict):
        return cond in value if multi else value == cond
    if "in" in cond or "any" in cond:
        vals = cond.get("in", cond.get("any"))
        return bool(value & set(vals)) if multi else any(value == v for v in vals)
    if "not_in" in cond:
        return not (value & set(cond["not_in"])) if multi else all(value != v for v in cond["not_in"])
    if "all" in cond:
        return set(cond["all"]) <= value
    lo, hi = cond.get("gte"), cond.get("lte")
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def oracle_mask(df: pd.DataFrame, filt: dict) -> np.ndarray:
    """The rows of `df` satisfying every condition of `filt` (raw request JSON)."""
    out = np.ones(len(df), dtype=bool)
    for name, cond in filt.items():
        out &= np.array([matches(_cell(df, name, i), cond) for i in range(len(df))], dtype=bool)
    return out


# one list of raw conditions per attribute: every operator its type takes, values present and absent
CONDITIONS = {
    "color": ["c0", "c3", "nope", {"in": ["c1", "c2", "zz"]}, {"not_in": ["c0", "c1"]}, {"exists": True},
              {"exists": False}],
    "labels": ["t1", {"in": ["t2", "t3"]}, {"any": ["t4", "none"]}, {"all": ["t1", "t2"]}, {"all": ["t5"]},
             {"all": ["t5", "absent"]}, {"not_in": ["t0", "t1", "t2"]}, {"exists": True}, {"exists": False}],
    "cost": [10, 20.0, {"gte": 50}, {"lte": 10}, {"gte": 10, "lte": 20}, {"gte": 30, "lte": 10},
              {"in": [10, 20, 55.5]}, {"not_in": [10]}, {"exists": False}],
    "in_stock": [True, False, {"in": [True]}, {"not_in": [True]}, {"exists": True}, {"exists": False}],
}
