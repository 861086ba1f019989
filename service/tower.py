"""The user tower on the request path.

`TwoTowerModel.embed_users` is the reference: it validates a record, encodes it and runs the
torch tower. Per request that costs ~0.2-0.5 ms, almost all of it torch's per-operator overhead
on tensors of one row. `UserTower` therefore extracts the user tower's weights once per loaded
version into plain numpy arrays and runs the same arithmetic (embedding rows → concatenation →
Linear/ReLU stack → L2 normalization) with a handful of numpy calls.

The fast path is an optimization, never a second source of truth: when a version is loaded it is
checked against `embed_users` on probe records (OOV user, known ids and tokens, extreme
continuous values). If the architecture is one it does not understand, or any probe differs by
more than 1e-5, the tower falls back to `embed_users` under `torch.inference_mode` and logs why.

Each record is embedded on its own (a batch is a loop over rows, not one matrix product) so that
a user's vector is bit-identical whether it was computed by /retrieve, /embed or
/retrieve/batch: a cached vector written by one endpoint is exactly what the others would compute.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.model import FeatureError, TwoTowerModel

log = logging.getLogger("service.tower")

FAST_PATH_TOLERANCE = 1e-5


class TowerError(RuntimeError):
    """The user tower of a version is unusable (e.g. it produces non-finite vectors)."""


@dataclass(frozen=True)
class UserRecord:
    """A validated user: id (None = absent) and normalized feature values (no nulls)."""

    user_id: str | None
    features: dict[str, object]


@dataclass(frozen=True)
class _Layer:
    weight_t: np.ndarray  # (in, out) float32, C-contiguous
    bias: np.ndarray      # (out,) float32
    relu: bool


class _NumpyUserTower:
    """The user `Tower` of training.model re-expressed with numpy arrays (inference only)."""

    def __init__(self, model: TwoTowerModel) -> None:
        tower = model.user_tower
        enc = model.user_encoder
        self._enc = enc

        def table(emb: nn.Embedding) -> np.ndarray:
            return np.ascontiguousarray(emb.weight.detach().cpu().numpy(), dtype=np.float32)

        self._id = table(tower.id_emb)
        self._cat = [(name, enc.vocabs[name], table(emb)) for name, emb in tower.cat.items()]
        self._multi = [
            (name, enc.vocabs[name], table(emb), enc.max_len[name]) for name, emb in tower.multi.items()
        ]
        # boundaries as a list of Python floats: bisect on it is np.searchsorted(side="right")
        # without the ~1 µs call overhead
        self._cont = [
            (name, enc.stats[name], [float(b) for b in enc.stats[name].boundaries], table(tower.bucket[name]))
            for name in tower.cont_names
        ]
        known = set(tower.cat) | set(tower.multi) | set(tower.cont_names)
        if known != set(enc.specs):
            raise NotImplementedError(f"tower features {sorted(known)} != encoder features {sorted(enc.specs)}")
        self.width = (
            self._id.shape[1]
            + sum(t.shape[1] for _, _, t in self._cat)
            + sum(t.shape[1] for _, _, t, _ in self._multi)
            + sum(1 + t.shape[1] for _, _, _, t in self._cont)
        )
        layers: list[_Layer] = []
        for module in tower.mlp:
            if isinstance(module, nn.Linear):
                layers.append(
                    _Layer(
                        np.ascontiguousarray(module.weight.detach().cpu().numpy().T, dtype=np.float32),
                        module.bias.detach().cpu().numpy().astype(np.float32)
                        if module.bias is not None
                        else np.zeros(module.out_features, np.float32),
                        relu=False,
                    )
                )
            elif isinstance(module, nn.ReLU):
                if not layers or layers[-1].relu:
                    raise NotImplementedError("ReLU not directly after a Linear layer")
                layers[-1] = _Layer(layers[-1].weight_t, layers[-1].bias, relu=True)
            elif isinstance(module, nn.Dropout):
                continue  # identity at inference
            else:
                raise NotImplementedError(f"unsupported MLP layer {type(module).__name__}")
        if not layers or layers[0].weight_t.shape[0] != self.width:
            raise NotImplementedError("MLP input width does not match the feature layout")
        self._layers = layers
        self.dim = layers[-1].weight_t.shape[1]

    def embed_one(self, record: UserRecord) -> np.ndarray:
        enc = self._enc
        feats = record.features
        x = np.empty(self.width, dtype=np.float32)
        uid = record.user_id
        row = 0 if uid is None else enc.ids.encode_one(uid)
        w = self._id.shape[1]
        x[:w] = self._id[row]
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
            value = feats.get(name)
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


class UserTower:
    """Validation and embedding of request users for one loaded model (fast path + reference)."""

    def __init__(self, model: TwoTowerModel) -> None:
        self.model = model
        self.encoder = model.user_encoder
        self.dim = int(model.embedding_dim)
        self.fast: _NumpyUserTower | None = None
        self.fast_path_reason = "not tried"
        try:
            self.fast = _NumpyUserTower(model)
            self.fast_path_reason = "ok"
        except (NotImplementedError, AttributeError, KeyError, TypeError) as e:
            self.fast_path_reason = f"unsupported architecture: {e}"
        self._check()

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
        rows = [self._embed_one(rec) for rec in records]
        if len(rows) == 1 and rows[0].dtype == np.float32 and rows[0].shape == (self.dim,):
            return rows[0].reshape(1, self.dim)  # the request path's case: the row as a (1, dim) view, no copy
        out = np.empty((len(records), self.dim), dtype=np.float32)
        for i, row in enumerate(rows):
            out[i] = row
        return out

    def _embed_one(self, record: UserRecord) -> np.ndarray:
        if self.fast is not None:
            return self.fast.embed_one(record)
        return self._reference([record])[0]

    def _reference(self, records: Sequence[UserRecord]) -> np.ndarray:
        with torch.inference_mode():
            return self.model.embed_users([{"user_id": r.user_id, "features": dict(r.features)} for r in records])

    # ---- load-time check ----------------------------------------------------------------------
    def _probe_records(self) -> list[UserRecord]:
        enc = self.encoder
        known_id = enc.ids.tokens[0] if enc.ids.tokens else None
        typical: dict[str, object] = {}
        extreme: dict[str, object] = {}
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
        return [
            UserRecord(None, {}),
            UserRecord(known_id, typical),
            UserRecord("\x00unknown-user", extreme),
            UserRecord(known_id, {k: (-v if isinstance(v, float) else v) for k, v in extreme.items()}),
        ]

    def _check(self) -> None:
        """Refuse a tower with non-finite output; keep the fast path only if it matches torch."""
        probes = self._probe_records()
        ref = self._reference(probes)
        if ref.shape != (len(probes), self.dim):
            raise TowerError(f"user tower returns shape {ref.shape}, expected (n, {self.dim})")
        if not np.isfinite(ref).all():
            raise TowerError("user tower produces non-finite vectors")
        norms = np.linalg.norm(ref, axis=1)
        if np.abs(norms - 1.0).max() > 1e-3:
            raise TowerError(f"user tower output is not L2-normalized (norms {norms.tolist()})")
        if self.fast is None:
            log.warning("numpy user tower disabled, using torch", extra={"fields": {"reason": self.fast_path_reason}})
            return
        fast = np.stack([self.fast.embed_one(r) for r in probes])
        diff = float(np.abs(fast - ref).max())
        if not diff <= FAST_PATH_TOLERANCE:
            self.fast = None
            self.fast_path_reason = f"differs from torch by {diff:.2e}"
            log.warning("numpy user tower disabled, using torch", extra={"fields": {"reason": self.fast_path_reason}})
