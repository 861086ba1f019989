"""The EVAL.md split, implemented once and used by fit, evaluate and the benchmarks.

1. Cold users (`int(id) % 10 == 0`, or `crc32(id) % 10 == 0` for non-integer ids) never train;
   at evaluation they are known only by their features.
2. Warm users: interactions sorted by (timestamp, item_id); the last ceil(0.2 n) are test.
3. Validation: the last ceil(0.1 n_train) of each warm user's train rows (early stopping and
   tuning only; `train` below still includes them, `fit` does not).

Only clicked rows take part: exposures without a click belong to ranking, not retrieval.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

INTEGER_ID = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also accepts '²', '٣'


def is_integer_id(user_id: str) -> bool:
    """Whether EVAL.md treats the id as an integer (optional '-', then ASCII digits only)."""
    return INTEGER_ID.fullmatch(user_id) is not None


def is_cold_user(user_id: str) -> bool:
    """EVAL.md rule 1 for one id: `int(id) % 10 == 0` for integer ids, else `crc32(id) % 10 == 0`."""
    s = str(user_id)
    if is_integer_id(s):
        return int(s) % 10 == 0
    return zlib.crc32(s.encode()) % 10 == 0


def id_sort_key(ids: pd.Series) -> pd.Series:
    """Ids that all are integers sort numerically (as in EVAL.md's reference); else as text.

    "Integer" is `is_integer_id`: '1e3' or '1.0' are text, as they are for the cold rule.
    Integers beyond int64 (>= 2^63) sort exactly as Python ints rather than overflowing.
    """
    text = ids.astype(str)
    if len(text) == 0 or not text.str.fullmatch(INTEGER_ID.pattern).all():
        return text
    as_int = pd.to_numeric(text, errors="coerce")
    if as_int.dtype == np.int64:
        return as_int
    return pd.Series([int(v) for v in text], index=ids.index, dtype=object)


@dataclass
class Split:
    """The EVAL.md partitions of the clicked interactions.

    train = fit ∪ val (what "the user's train items" means in the metrics); fit is what the
    model trains on when tuning; test holds warm users' held-out rows; cold holds every row of
    cold users. `head_items` are the most-clicked train items making up 50% of train clicks.
    """

    train: pd.DataFrame
    fit: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    cold: pd.DataFrame
    head_items: frozenset[str]

    def summary(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "fit": len(self.fit),
            "val": len(self.val),
            "test": len(self.test),
            "cold": len(self.cold),
            "cold_users": int(self.cold["user_id"].nunique()),
            "head_items": len(self.head_items),
        }


def _tail_mask(df: pd.DataFrame, frac: float) -> np.ndarray:
    """True for each user's last ceil(frac * n) rows; df must be sorted by user, then time."""
    rank = df.groupby("user_id", sort=False).cumcount().to_numpy()
    size = df.groupby("user_id", sort=False)["user_id"].transform("size").to_numpy()
    n_last = np.ceil(size * frac - 1e-9).astype(np.int64)
    return rank >= size - n_last


def head_items(train: pd.DataFrame) -> frozenset[str]:
    """Most-clicked items that together make 50% of training clicks (ties by id, stable)."""
    counts = train["item_id"].value_counts()
    if counts.empty:
        return frozenset()
    order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    pop = np.array([c for _, c in order], dtype=np.float64)
    cum = np.cumsum(pop) / pop.sum()
    n_head = int(np.searchsorted(cum, 0.5)) + 1
    return frozenset(i for i, _ in order[:n_head])


def split_interactions(interactions: pd.DataFrame) -> Split:
    """Apply EVAL.md to interactions (columns user_id, item_id, timestamp[, clicked])."""
    df = interactions
    if "clicked" in df.columns:
        df = df[df["clicked"].to_numpy()]
    users = df["user_id"].astype(str)
    uniq = pd.unique(users)
    cold_users = {u for u in uniq if is_cold_user(u)}
    cold_mask = users.isin(cold_users).to_numpy()
    cold = df[cold_mask].reset_index(drop=True)
    warm = df[~cold_mask]
    warm = (
        warm.assign(_u=id_sort_key(warm["user_id"]), _i=id_sort_key(warm["item_id"]))
        .sort_values(["_u", "timestamp", "_i"], kind="stable")
        .drop(columns=["_u", "_i"])
        .reset_index(drop=True)
    )
    is_test = _tail_mask(warm, 0.2)
    test = warm[is_test].reset_index(drop=True)
    train = warm[~is_test].reset_index(drop=True)
    is_val = _tail_mask(train, 0.1)
    val = train[is_val].reset_index(drop=True)
    fit = train[~is_val].reset_index(drop=True)
    return Split(train=train, fit=fit, val=val, test=test, cold=cold, head_items=head_items(train))
