"""Feature encoding: raw strings and numbers → the integer/float arrays the towers consume.

Each tower has an id plus its declared features (INTERFACES.md §1):

* id and `categorical`: a vocabulary fitted on training data; index 0 is the out-of-vocabulary
  bucket, which also takes missing values. Unknown users, fresh items and unseen categories all
  land there, so the model must learn a useful OOV row (see `id_dropout` in the model config).
* `multi_categorical`: separator-joined tokens → a padded (n, max_len) index matrix; 0 pads
  (ignored when pooling), 1 is the OOV token.
* `continuous`: both a z-score (missing → 0) and a quantile bucket (0 = missing), because a
  normalized scalar is good at monotone effects and a bucket embedding at non-linear ones.

Statistics come from training data only: user vocabularies/statistics from users that appear
in the training interactions, item ones from the catalog at training time (item features are
catalog metadata, not labels), id vocabularies from the training interactions.

pandas is imported only by the table-side functions (fitting, `encode_table`): the request path
(`validate_value`, `Vocabulary.encode_one`, `encode_records`) runs on numpy alone, so the serving
image needs no pandas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from training.schema import FeatureSpec

if TYPE_CHECKING:
    import pandas as pd

OOV = 0
PAD = 0
POPULARITY = "__popularity"
MULTI_OOV = 1


class FeatureError(ValueError):
    """A request feature is unknown or has the wrong type; `field` is its dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class Vocabulary:
    """Token → index (1-based; 0 is OOV). Tokens are kept in first-seen-by-frequency order."""

    tokens: list[str]
    offset: int = 1

    def __post_init__(self) -> None:
        self._index: pd.Index | None = None  # built on first `encode` (table side, needs pandas)
        self._map: dict[str, int] | None = None

    @classmethod
    def fit(cls, values: Iterable[str], min_count: int = 1, offset: int = 1) -> Vocabulary:
        import pandas as pd

        counts = pd.Series(list(values), dtype=object).value_counts(sort=False)
        counts = counts[(counts.index != "") & (counts >= min_count)]
        tokens = sorted(counts.index.astype(str), key=lambda t: (-int(counts[t]), t))
        return cls(tokens=tokens, offset=offset)

    @property
    def size(self) -> int:
        """Rows the embedding table needs (OOV/pad rows included)."""
        return len(self.tokens) + self.offset

    def encode(self, values: Sequence[str] | np.ndarray | pd.Series) -> np.ndarray:
        import pandas as pd

        if self._index is None:
            self._index = pd.Index(self.tokens)
        pos = self._index.get_indexer(pd.Index(np.asarray(values, dtype=object)))
        return np.where(pos >= 0, pos + self.offset, OOV if self.offset == 1 else MULTI_OOV).astype(np.int64)

    def encode_one(self, value: str) -> int:
        if self._map is None:
            self._map = {t: i + self.offset for i, t in enumerate(self.tokens)}
        return self._map.get(value, OOV if self.offset == 1 else MULTI_OOV)


@dataclass
class ContinuousStats:
    """z-score parameters and quantile bucket boundaries of one continuous feature."""

    mean: float
    std: float
    boundaries: list[float]

    @classmethod
    def fit(cls, values: np.ndarray, n_buckets: int) -> ContinuousStats:
        v = values[np.isfinite(values)]
        if len(v) == 0:
            return cls(mean=0.0, std=1.0, boundaries=[])
        std = float(v.std())
        qs = np.quantile(v, np.linspace(0, 1, n_buckets + 1)[1:-1]) if n_buckets > 1 else []
        return cls(mean=float(v.mean()), std=std if std > 1e-12 else 1.0, boundaries=sorted({float(q) for q in qs}))

    @property
    def n_buckets(self) -> int:
        """Embedding rows: missing + len(boundaries) + 1 intervals."""
        return len(self.boundaries) + 2

    def encode(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        finite = np.isfinite(values)
        z = np.where(finite, (np.nan_to_num(values) - self.mean) / self.std, 0.0)
        z = np.clip(z, -5.0, 5.0).astype(np.float32)
        b = np.searchsorted(np.asarray(self.boundaries, dtype=np.float64), np.nan_to_num(values), side="right") + 1
        return z, np.where(finite, b, 0).astype(np.int64)


@dataclass
class TowerEncoder:
    """Everything needed to turn one side's raw rows into model inputs."""

    side: str
    specs: dict[str, FeatureSpec]
    ids: Vocabulary
    vocabs: dict[str, Vocabulary] = field(default_factory=dict)
    stats: dict[str, ContinuousStats] = field(default_factory=dict)
    max_len: dict[str, int] = field(default_factory=dict)
    # training clicks per id (aligned with ids.tokens) when the tower takes its own popularity
    # as an input; encoded as the continuous feature POPULARITY = log1p(clicks), 0 for OOV ids
    id_counts: list[int] | None = None

    @property
    def continuous_names(self) -> list[str]:
        names = [n for n, s in self.specs.items() if s.type == "continuous"]
        return names + ([POPULARITY] if self.id_counts is not None else [])

    def _popularity(self, id_index: np.ndarray) -> np.ndarray:
        counts = np.concatenate([[0.0], np.asarray(self.id_counts, dtype=np.float64)])
        return np.log1p(counts[id_index])

    @classmethod
    def fit(
        cls,
        side: str,
        specs: dict[str, FeatureSpec],
        train_ids: Iterable[str],
        table: pd.DataFrame | None,
        *,
        min_count: int = 1,
        n_buckets: int = 10,
        max_multi_len: int = 16,
        popularity: bool = False,
    ) -> TowerEncoder:
        """Fit vocabularies/statistics. `table` holds the rows statistics are computed from.

        `train_ids` has one entry per training interaction; with `popularity` the tower also
        gets log1p(training clicks of its id) as an input (used for items).
        """
        import pandas as pd

        from training.dataset import parse_continuous

        train_ids = pd.Series(np.asarray(list(train_ids), dtype=object))
        enc = cls(side=side, specs=specs, ids=Vocabulary.fit(train_ids))
        if popularity:
            counts = train_ids.value_counts()
            enc.id_counts = [int(counts[t]) for t in enc.ids.tokens]
            enc.stats[POPULARITY] = ContinuousStats.fit(np.log1p(counts.to_numpy(dtype=np.float64)), n_buckets)
        table = table if table is not None else pd.DataFrame({n: pd.Series(dtype=str) for n in specs})
        for name, spec in specs.items():
            col = table[name].astype(str)
            if spec.type == "categorical":
                enc.vocabs[name] = Vocabulary.fit(col, min_count=min_count)
            elif spec.type == "multi_categorical":
                tokens = col.str.split(spec.separator, regex=False).explode()
                tokens = tokens[tokens.notna() & (tokens != "")]
                enc.vocabs[name] = Vocabulary.fit(tokens.astype(str), min_count=min_count, offset=2)
                lens = col.map(lambda s, sep=spec.separator: len([t for t in s.split(sep) if t]))
                enc.max_len[name] = int(max(1, min(max_multi_len, lens.max() if len(lens) else 1)))
            else:
                enc.stats[name] = ContinuousStats.fit(parse_continuous(col), n_buckets)
        return enc

    # ---- encoding -----------------------------------------------------------------------
    def encode_table(self, ids: Sequence[str] | np.ndarray, table: pd.DataFrame | None) -> dict[str, np.ndarray]:
        """Encode aligned rows: `ids[i]` with the feature values of `table.iloc[i]` (None: all missing)."""
        import pandas as pd

        from training.dataset import parse_continuous

        n = len(ids)
        out: dict[str, np.ndarray] = {"id": self.ids.encode(np.asarray([i if i is not None else "" for i in ids], dtype=object))}
        self._encode_popularity(out)
        for name, spec in self.specs.items():
            col = table[name].astype(str) if table is not None and name in table else pd.Series([""] * n)
            col = col.reset_index(drop=True)
            if spec.type == "categorical":
                out[f"cat.{name}"] = self.vocabs[name].encode(col.to_numpy(dtype=object))
            elif spec.type == "multi_categorical":
                out[f"multi.{name}"] = self._encode_multi(name, col.str.split(spec.separator, regex=False))
            else:
                z, b = self.stats[name].encode(parse_continuous(col))
                out[f"cont.{name}"], out[f"bucket.{name}"] = z, b
        return out

    def _encode_popularity(self, out: dict[str, np.ndarray]) -> None:
        if self.id_counts is not None:
            out[f"cont.{POPULARITY}"], out[f"bucket.{POPULARITY}"] = self.stats[POPULARITY].encode(self._popularity(out["id"]))

    def _encode_multi(self, name: str, lists: pd.Series) -> np.ndarray:
        import pandas as pd

        L = self.max_len[name]
        mat = np.zeros((len(lists), L), dtype=np.int64)
        exploded = lists.explode()
        exploded = exploded[exploded.notna() & (exploded != "")]
        if len(exploded):
            rows = exploded.index.to_numpy()
            pos = pd.Series(rows).groupby(rows).cumcount().to_numpy()
            keep = pos < L
            mat[rows[keep], pos[keep]] = self.vocabs[name].encode(exploded.to_numpy(dtype=object)[keep])
        return mat

    def validate_value(self, name: str, value: object) -> object:
        """Check one request feature value; returns it normalized (str / float / list[str] / None)."""
        path = f"features.{name}"
        spec = self.specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self.specs)) or "none"
            raise FeatureError(path, f"unknown feature (known {self.side} features: {known})")
        if value is None:
            return None
        if spec.type == "continuous":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FeatureError(path, f"expected a number, got {type(value).__name__}")
            if not math.isfinite(float(value)):
                raise FeatureError(path, "must be a finite number (NaN and infinity are not allowed)")
            return float(value)
        if spec.type == "categorical":
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise FeatureError(path, f"expected a string, got {type(value).__name__}")
            return str(value)
        if isinstance(value, str):
            return [t for t in value.split(spec.separator) if t]
        if isinstance(value, list) and all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in value):
            return [str(t) for t in value]
        raise FeatureError(path, f"expected a list of strings or a {spec.separator!r}-joined string")

    def encode_records(self, records: Sequence[dict]) -> dict[str, np.ndarray]:
        """Encode request-shaped records {"<side>_id": str|None, "features": {...}}; validates types."""
        n = len(records)
        id_key = f"{self.side}_id"
        out: dict[str, np.ndarray] = {
            "id": np.array([OOV if r.get(id_key) is None else self.ids.encode_one(str(r[id_key])) for r in records], dtype=np.int64)
        }
        self._encode_popularity(out)
        cols: dict[str, list] = {name: [None] * n for name in self.specs}
        for i, r in enumerate(records):
            for name, value in (r.get("features") or {}).items():
                cols_name = self.validate_value(name, value)
                cols[name][i] = cols_name
        for name, spec in self.specs.items():
            vals = cols[name]
            if spec.type == "categorical":
                out[f"cat.{name}"] = np.array([OOV if v is None else self.vocabs[name].encode_one(v) for v in vals], dtype=np.int64)
            elif spec.type == "multi_categorical":
                L = self.max_len[name]
                mat = np.zeros((n, L), dtype=np.int64)
                for i, v in enumerate(vals):
                    toks = (v or [])[:L]
                    mat[i, : len(toks)] = [self.vocabs[name].encode_one(t) for t in toks]
                out[f"multi.{name}"] = mat
            else:
                arr = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
                out[f"cont.{name}"], out[f"bucket.{name}"] = self.stats[name].encode(arr)
        return out

    # ---- (de)serialization ----------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "side": self.side,
            "specs": {n: s.to_json() for n, s in self.specs.items()},
            "ids": self.ids.tokens,
            "vocabs": {n: v.tokens for n, v in self.vocabs.items()},
            "stats": {n: {"mean": s.mean, "std": s.std, "boundaries": s.boundaries} for n, s in self.stats.items()},
            "max_len": self.max_len,
            "id_counts": self.id_counts,
        }

    @classmethod
    def from_json(cls, obj: dict) -> TowerEncoder:
        specs = {n: FeatureSpec(name=n, type=d["type"], separator=d.get("separator", "|")) for n, d in obj["specs"].items()}
        return cls(
            side=obj["side"],
            specs=specs,
            ids=Vocabulary(obj["ids"]),
            vocabs={n: Vocabulary(t, offset=2 if specs[n].type == "multi_categorical" else 1) for n, t in obj["vocabs"].items()},
            stats={n: ContinuousStats(**s) for n, s in obj["stats"].items()},
            max_len={n: int(v) for n, v in obj["max_len"].items()},
            id_counts=obj.get("id_counts"),
        )
