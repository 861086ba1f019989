"""The user tower in plain numpy: the request path's only tower; next to `training.model.Tower`.

`TwoTowerModel.embed_users` (torch) is the reference: it validates a record, encodes it and runs
the torch tower. `NumpyTower` runs the same arithmetic (embedding rows → concatenation →
Linear/ReLU stack → L2 normalization) with a handful of numpy calls over the tower's weights,
read by their state-dict names (`user_tower.id_emb.weight`, `user_tower.mlp.0.weight`, ...) and
laid out as `Tower.__init__` lays them out. The torch tower costs ~0.2-0.5 ms per request, almost
all of it torch's per-operator overhead on tensors of one row; the numpy path avoids that, and it
lets the service run without torch installed.

`UserTower` is what a served version holds: request-feature validation plus embedding, built
from (encoder, model config, numpy weights) — what `training.bundle.read_bundle_arrays` reads
without torch. An architecture the numpy path cannot run is refused when the tower is built
(TowerError naming the missing or unplaced weights); it is never served through another path.
`UserTower.check_against(model)` holds the numpy tower to the torch reference on probe records
(OOV user, known ids and tokens, extreme continuous values): `indexer rebuild` runs it, so a
bundle the service would embed differently from the trainer is refused before it is indexed.
A change to `Tower`'s architecture is a change here too (tests/training/test_numpy_tower.py).

Each record is embedded on its own (a batch is a loop over rows, not one matrix product) so that
a user's vector is bit-identical whether it was computed by /retrieve, /embed or
/retrieve/batch: a cached vector written by one endpoint is exactly what the others would compute.

This module imports neither torch nor pandas.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from training.config import RECENCY_POSITIONS, ModelConfig
from training.features import OOV, POPULARITY, FeatureError, TowerEncoder, Vocabulary

if TYPE_CHECKING:
    from training.model import TwoTowerModel

FAST_PATH_TOLERANCE = 1e-5

__all__ = [
    "FAST_PATH_TOLERANCE", "HistoryFoldIn", "NumpyHistory", "NumpyTower", "TowerError", "UserRecord", "UserTower", "encode_history", "mlp_layout",
]


class TowerError(RuntimeError):
    """The user tower of a version is unusable (e.g. it produces non-finite vectors)."""


@dataclass(frozen=True)
class UserRecord:
    """A validated user: id (None = absent), normalized feature values (no nulls) and the
    request's history as history-table rows (`encode_history`; None: no history sent)."""

    user_id: str | None
    features: dict[str, object]
    history: tuple[int, ...] | None = None


def encode_history(items: Vocabulary, item_ids: Sequence[str], max_len: int | None) -> tuple[tuple[int, ...], int]:
    """(history-table rows of the ids the tower uses, how many ids were unknown).

    The rows are the item tower's id codes (`items`); ids unseen in training have no trained
    history embedding and are dropped (counted); of the rest the most recent `max_len` are kept,
    oldest first. The torch tower (`TwoTowerModel.history_codes`) encodes with this too.
    """
    codes = [items.encode_one(i) for i in item_ids]
    known = tuple(c for c in codes if c != OOV)
    unknown = len(codes) - len(known)
    if max_len is not None and len(known) > max_len:
        known = known[len(known) - max_len :]
    return known, unknown


class NumpyHistory:
    """`training.model.HistoryPooling` and `TwoTowerModel.user_id_vectors` in numpy: the id slot
    of a user who sent a history. Weights by state-dict name under `user_history.`."""

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, np.ndarray], n_items: int, n_users: int) -> None:
        h = cfg.history
        if h is None:
            raise NotImplementedError("the model config has no history input")
        def get(name: str, shape: tuple[int, ...] | None) -> np.ndarray:
            key = "user_history." + name
            if key not in weights:
                raise NotImplementedError(f"the weights have no {key!r}")
            arr = np.ascontiguousarray(weights[key], dtype=np.float32)
            if shape is not None and arr.shape != shape:
                raise NotImplementedError(f"{key!r} has shape {arr.shape}, expected {shape}")
            return arr

        self.max_len, self.alpha = h.max_len, float(h.alpha)
        self.emb = get("emb.weight", (n_items, cfg.id_dim))
        self.cold_id = get("cold_id", (cfg.id_dim,))
        self.free_id = get("free_id", (n_users, cfg.id_dim)) if h.free_id else None
        # weights of distances 0 (newest) .. max_len - 1, as float32 like torch's exp
        positions = h.max_len or RECENCY_POSITIONS
        self.position_weights = np.exp(get("position_logits", (positions,))) if h.encoder == "recency" else None
        expected = {"user_history.emb.weight", "user_history.cold_id"} | (
            {"user_history.free_id"} if h.free_id else set()) | ({"user_history.position_logits"} if h.encoder == "recency" else set())
        unused = sorted(k for k in weights if k.startswith("user_history.") and k not in expected)
        if unused:
            raise NotImplementedError(f"weights {unused} have no place in the numpy history pooling")

    def id_vector(self, row: int, codes: tuple[int, ...]) -> np.ndarray:
        """The id slot (id_dim,) float32 for user id row `row` (0 = OOV) with history `codes`."""
        if self.max_len is not None and len(codes) > self.max_len:
            codes = codes[len(codes) - self.max_len :]
        if row == 0:
            out = self.cold_id.copy()
        elif self.free_id is not None:
            out = self.free_id[row].copy()
        else:
            out = np.zeros_like(self.cold_id)
        n = len(codes)
        if n:
            rows = self.emb.take(codes, axis=0)
            if self.position_weights is None:
                pooled = rows.sum(axis=0) * np.float32(n ** (1.0 - self.alpha) / n)
            else:
                pw = self.position_weights
                if n > len(pw):  # distances beyond the learned ones share the last weight
                    pw = np.concatenate([pw, np.repeat(pw[-1:], n - len(pw))])
                w = pw[:n][::-1]  # oldest first: distance n - 1 .. 0
                pooled = (w @ rows) * (np.float32(n ** (1.0 - self.alpha)) / np.float32(w.sum()))
            out += pooled
        return out


@dataclass(frozen=True)
class HistoryFoldIn:
    """The request history folded into the user vector in retrieval space, after the tower.

    u' = normalize(u + b * m / (m + c) * normalize(sum_j r^(m-1-j) v_j)), where u is the tower's
    unit vector, v_1..v_m the catalog vectors (the item tower's unit outputs, the rows the index
    holds) of the history items the tower pooled (`encode_history`'s rows, oldest first), b =
    `weight`, c = `half` and r = `recency`. It is an item-kNN over the index added to the tower:
    the user moves towards the items they just clicked, more so the more clicks are known. The
    tower's own history path learns this poorly for users with few clicks (cold_mM, issue 18);
    the fold-in needs no training, so its constants are chosen on the nested validation
    (docs/bench/history.md) and recorded in the bundle's `model.history`.

    One implementation for every path: the service (`service.retrieval`, over the version's index
    rows) and `trainer evaluate`'s history protocols (`training.evaluate.history_metrics`, over the
    catalog vectors it ranks) both call `apply`. The output is a unit vector, so scores stay plain
    cosines (invariant 1).
    """

    weight: float
    half: float
    recency: float = 1.0

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> HistoryFoldIn | None:
        """The rule a model config records (None: no history input, or a fold-in weight of 0)."""
        h = cfg.history
        if h is None or h.fold_in_weight == 0:
            return None
        return cls(float(h.fold_in_weight), float(h.fold_in_half), float(h.fold_in_recency))

    def apply_one(self, user: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The folded unit vector (float32, (d,)) of one tower vector `user` (d,) and its history's
        catalog vectors `items` (m, d), oldest first; m = 0 returns `user` unchanged."""
        m = len(items)
        if m == 0:
            return user
        if items.ndim != 2 or items.shape[1] != user.shape[0]:
            raise ValueError(f"history item vectors have shape {items.shape}, the user vector {user.shape}")
        if self.recency == 1.0:
            pooled = items.sum(axis=0, dtype=np.float32)
        else:
            w = np.power(np.float32(self.recency), np.arange(m - 1, -1, -1, dtype=np.float32))
            pooled = w @ items
        norm = math.sqrt(float(np.dot(pooled, pooled)))
        if norm <= 1e-12:
            return user
        beta = self.weight * m / (m + self.half)
        out = user + np.float32(beta / norm) * pooled
        out /= max(math.sqrt(float(np.dot(out, out))), 1e-12)
        return out.astype(np.float32, copy=False)

    def apply(self, users: np.ndarray, items: Sequence[np.ndarray | None]) -> np.ndarray:
        """(n, d) float32: `apply_one` row by row (None: no history sent, the row unchanged)."""
        if len(items) != len(users):
            raise ValueError(f"{len(items)} histories for {len(users)} user vectors")
        out = np.array(users, dtype=np.float32, copy=True)
        for i, v in enumerate(items):
            if v is not None:
                out[i] = self.apply_one(out[i], np.asarray(v, dtype=np.float32))
        return out


@dataclass(frozen=True)
class _Layer:
    weight_t: np.ndarray  # (in, out) float32, C-contiguous
    bias: np.ndarray      # (out,) float32
    relu: bool


def mlp_layout(cfg: ModelConfig) -> list[tuple[int, bool]]:
    """(index in `Tower.mlp`, followed by a ReLU) of each Linear layer, as `Tower` builds them:
    per hidden width Linear, ReLU and (with dropout) Dropout, then the output Linear."""
    out, i = [], 0
    for _ in cfg.hidden:
        out.append((i, True))
        i += 3 if cfg.dropout > 0 else 2
    out.append((i, False))
    return out


class NumpyTower:
    """One tower's inference arithmetic over its weights as numpy arrays.

    `weights` maps state-dict names to arrays; `prefix` selects the tower (`"user_tower."`).
    Raises NotImplementedError naming what the weights lack for the layout of `cfg`/`encoder`.
    """

    def __init__(self, encoder: TowerEncoder, cfg: ModelConfig, weights: Mapping[str, np.ndarray], prefix: str) -> None:
        self._enc = enc = encoder
        used: set[str] = set()

        def table(name: str, rows: int | None = None) -> np.ndarray:
            key = prefix + name
            if key not in weights:
                raise NotImplementedError(f"the weights have no {key!r}")
            used.add(key)
            arr = np.ascontiguousarray(weights[key], dtype=np.float32)
            if rows is not None and (arr.ndim != 2 or arr.shape[0] != rows):
                raise NotImplementedError(f"{key!r} has shape {arr.shape}, the feature encoder needs ({rows}, *)")
            return arr

        self._id = table("id_emb.weight", enc.ids.size)
        self._cat = [
            (n, enc.vocabs[n], table(f"cat.{n}.weight", enc.vocabs[n].size))
            for n, s in enc.specs.items() if s.type == "categorical"
        ]
        self._multi = [
            (n, enc.vocabs[n], table(f"multi.{n}.weight", enc.vocabs[n].size), enc.max_len[n])
            for n, s in enc.specs.items() if s.type == "multi_categorical"
        ]
        # boundaries as a list of Python floats: bisect on it is np.searchsorted(side="right")
        # without the ~1 µs call overhead
        self._cont = [
            (n, enc.stats[n], [float(b) for b in enc.stats[n].boundaries], table(f"bucket.{n}.weight", enc.stats[n].n_buckets))
            for n in enc.continuous_names
        ]
        # the tower's own training clicks as an input (`TowerEncoder.id_counts`): log1p(clicks of
        # the id row), 0 for the OOV row
        self._popularity = (
            None if enc.id_counts is None else [0.0] + [math.log1p(c) for c in enc.id_counts]
        )
        self.width = (
            self._id.shape[1]
            + sum(t.shape[1] for _, _, t in self._cat)
            + sum(t.shape[1] for _, _, t, _ in self._multi)
            + sum(1 + t.shape[1] for _, _, _, t in self._cont)
        )
        self._layers = [
            _Layer(np.ascontiguousarray(table(f"mlp.{i}.weight").T), table(f"mlp.{i}.bias"), relu)
            for i, relu in mlp_layout(cfg)
        ]
        unused = sorted(k for k in weights if k.startswith(prefix) and k not in used)
        if unused:
            raise NotImplementedError(f"weights {unused} have no place in the numpy tower's layout")
        width = self.width
        for (i, _), layer in zip(mlp_layout(cfg), self._layers, strict=True):
            w = layer.weight_t
            if w.ndim != 2 or w.shape[0] != width or layer.bias.shape != (w.shape[1],):
                raise NotImplementedError(
                    f"{prefix}mlp.{i}: weight {w.T.shape} / bias {layer.bias.shape} do not take an input of width {width}"
                    + (" (the feature layout)" if i == 0 else "")
                )
            width = w.shape[1]
        self.dim = self._layers[-1].weight_t.shape[1]

    def embed_one(self, record: UserRecord, history: NumpyHistory | None = None) -> np.ndarray:
        """The unit vector (float32, (dim,)) of one validated record (its history pooled by
        `history`; without one, or without a history in the record, the saved id row)."""
        enc = self._enc
        feats = record.features
        x = np.empty(self.width, dtype=np.float32)
        uid = record.user_id
        row = 0 if uid is None else enc.ids.encode_one(uid)
        w = self._id.shape[1]
        x[:w] = self._id[row] if history is None or record.history is None else history.id_vector(row, record.history)
        pos = w
        for name, vocab, tab in self._cat:
            value = feats.get(name)
            w = tab.shape[1]
            x[pos : pos + w] = tab[0 if value is None else vocab.encode_one(value)]
            pos += w
        for name, vocab, tab, max_len in self._multi:
            tokens = feats.get(name) or ()
            w = tab.shape[1]
            idx = [vocab.encode_one(t) for t in list(tokens)[:max_len]]
            if idx:
                x[pos : pos + w] = tab.take(idx, axis=0).sum(axis=0) / np.float32(len(idx))
            else:
                x[pos : pos + w] = 0.0
            pos += w
        for name, stats, bounds, tab in self._cont:
            value = self._popularity[row] if name == POPULARITY and self._popularity is not None else feats.get(name)
            w = tab.shape[1]
            if value is None or not math.isfinite(value):
                x[pos] = 0.0
                x[pos + 1 : pos + 1 + w] = tab[0]
            else:
                v = float(value)
                x[pos] = min(5.0, max(-5.0, (v - stats.mean) / stats.std))  # rounded to float32
                x[pos + 1 : pos + 1 + w] = tab[bisect.bisect_right(bounds, v) + 1]
            pos += 1 + w
        h = x
        for layer in self._layers:
            h = h @ layer.weight_t
            h += layer.bias
            if layer.relu:
                np.maximum(h, 0.0, out=h)
        # math.sqrt of the float32 dot: the same float32 result as np.sqrt (a correctly rounded
        # double sqrt rounds to the correctly rounded float one) without a numpy scalar ufunc call
        norm = math.sqrt(float(np.dot(h, h)))
        h /= max(norm, 1e-12)
        return h


def model_weights(model: TwoTowerModel) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays (CPU copies)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


class UserTower:
    """Validation and embedding of request users for one loaded version (numpy only).

    Built from the user encoder, the model config and the weights (state-dict names → arrays);
    raises TowerError if the numpy tower cannot run that architecture or its output on probe
    records is not finite unit vectors of the configured dimension.
    """

    def __init__(
        self, encoder: TowerEncoder, cfg: ModelConfig, weights: Mapping[str, np.ndarray], items: Vocabulary | None = None,
    ) -> None:
        """`items`: the item tower's id vocabulary, which maps request history ids to history rows;
        needed when the model has a history input (`cfg.history`), else histories are ignored."""
        self.encoder = encoder
        self.dim = int(cfg.embedding_dim)
        self.items = items
        self.history: NumpyHistory | None = None
        self.fold_in = HistoryFoldIn.from_config(cfg)
        try:
            self.fast = NumpyTower(encoder, cfg, weights, "user_tower.")
            if cfg.history is not None:
                if items is None:
                    raise NotImplementedError("a history input needs the item id vocabulary (pass items=)")
                self.history = NumpyHistory(cfg, weights, items.size, encoder.ids.size)
        except (NotImplementedError, AttributeError, KeyError, TypeError, IndexError) as e:
            raise TowerError(f"the numpy user tower cannot run this architecture: {e}") from None
        if self.fast.dim != self.dim:
            raise TowerError(f"user tower output dimension {self.fast.dim} != model config embedding_dim {self.dim}")
        self._check()

    @classmethod
    def from_model(cls, model: TwoTowerModel) -> UserTower:
        """The numpy tower of a torch model (its current weights, copied)."""
        return cls(model.user_encoder, model.cfg, model_weights(model), model.item_encoder.ids)

    @property
    def history_len(self) -> int | None:
        """The most recent history ids the tower pools (None: all; 0: no history input)."""
        return 0 if self.history is None else self.history.max_len

    def encode_history(self, item_ids: Sequence[str] | None) -> tuple[tuple[int, ...] | None, int]:
        """(the history rows this tower pools, how many ids it ignored as unknown) of a request
        history; (None, 0) without one. A tower without a history input ignores every id."""
        if item_ids is None:
            return None, 0
        if self.history is None or self.items is None:
            return None, len(item_ids)
        return encode_history(self.items, item_ids, self.history.max_len)

    # ---- validation -------------------------------------------------------------------------
    def validate(self, features: dict[str, object]) -> dict[str, object]:
        """Normalized features (str / float / list[str]; nulls dropped) or FeatureError.

        FeatureError.field is the dotted request path, e.g. `features.age`.
        """
        out: dict[str, object] = {}
        for name, value in features.items():
            norm = self.encoder.validate_value(name, value)
            if isinstance(norm, float) and not math.isfinite(norm):  # defence in depth
                raise FeatureError(f"features.{name}", "must be a finite number")
            if norm is not None:
                out[name] = norm
        return out

    # ---- embedding ----------------------------------------------------------------------------
    def embed(self, records: Sequence[UserRecord]) -> np.ndarray:
        """(n, dim) float32 unit rows, one row computed per record (see module docstring)."""
        rows = [self.fast.embed_one(rec, self.history) for rec in records]
        if len(rows) == 1 and rows[0].dtype == np.float32 and rows[0].shape == (self.dim,):
            return rows[0].reshape(1, self.dim)  # the request path's case: the row as a (1, dim) view, no copy
        out = np.empty((len(records), self.dim), dtype=np.float32)
        for i, row in enumerate(rows):
            out[i] = row
        return out

    # ---- checks -------------------------------------------------------------------------------
    def _check(self) -> None:
        """Refuse a tower with non-finite or non-unit output on the probe records."""
        got = self.embed(probe_records(self.encoder, self.items if self.history is not None else None))
        if not np.isfinite(got).all():
            raise TowerError("user tower produces non-finite vectors")
        norms = np.linalg.norm(got, axis=1)
        if np.abs(norms - 1.0).max() > 1e-3:
            raise TowerError(f"user tower output is not L2-normalized (norms {norms.tolist()})")

    def check_against(self, model: TwoTowerModel, tolerance: float = FAST_PATH_TOLERANCE) -> float:
        """Max abs difference to the torch reference on the probe records; TowerError above
        `tolerance` (the service would serve other vectors than the model the index was built with)."""
        probes = probe_records(self.encoder, self.items if self.history is not None else None)
        ref = model.embed_users([
            {"user_id": r.user_id, "features": dict(r.features),
             **({} if r.history is None else {"history": [self.items.tokens[c - 1] for c in r.history]})}
            for r in probes
        ])
        if ref.shape != (len(probes), self.dim):
            raise TowerError(f"torch user tower returns shape {ref.shape}, expected ({len(probes)}, {self.dim})")
        diff = float(np.abs(self.embed(probes) - ref).max())
        if not diff <= tolerance:
            raise TowerError(f"the numpy user tower differs from the torch tower by {diff:.2e} (> {tolerance:.0e}) on probe users")
        return diff


def probe_records(enc: TowerEncoder, items: Vocabulary | None = None) -> list[UserRecord]:
    """Records that exercise every input of the tower: the OOV user, a known id with typical
    values, unseen tokens and extreme continuous values (both signs); with `items` (a tower with
    a history input) also histories: empty, short, and longer than any max_len, for a known and
    an unknown user."""
    known_id = enc.ids.tokens[0] if enc.ids.tokens else None
    typical: dict[str, Any] = {}
    extreme: dict[str, Any] = {}
    for name, spec in enc.specs.items():
        if spec.type == "categorical":
            tokens = enc.vocabs[name].tokens
            typical[name] = tokens[0] if tokens else "x"
            extreme[name] = "\x00never-seen"
        elif spec.type == "multi_categorical":
            tokens = enc.vocabs[name].tokens
            typical[name] = list(tokens[:3]) or ["x"]
            extreme[name] = ["\x00never-seen", *tokens[:1]]
        else:
            st = enc.stats[name]
            typical[name] = float(st.mean)
            extreme[name] = 1e300
    records = [
        UserRecord(None, {}),
        UserRecord(known_id, typical),
        UserRecord("\x00unknown-user", extreme),
        UserRecord(known_id, {k: (-v if isinstance(v, float) else v) for k, v in extreme.items()}),
    ]
    if items is not None and items.tokens:
        codes = range(1, items.size)
        short = tuple(codes[:3])
        long = tuple(codes[i % len(codes)] for i in range(0, 7 * 61, 7))  # 61 ids, repeats on tiny vocabularies
        records += [
            UserRecord(None, {}, ()),
            UserRecord(None, typical, short),
            UserRecord(known_id, typical, short),
            UserRecord(known_id, {}, long),
            UserRecord("\x00unknown-user", {}, long),
        ]
    return records
