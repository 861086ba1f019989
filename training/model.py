"""The two-tower model: both towers in one small module.

Each tower embeds its id (row 0 = out-of-vocabulary), each categorical feature, each
multi-categorical feature (mean-pooled over its tokens) and each continuous feature (its z-score
as one input plus an embedding of its quantile bucket), concatenates them, runs an MLP and
L2-normalizes. The score of a (user, item) pair is therefore a cosine; training divides it by a
temperature, serving returns it as is.

`id_dropout` replaces a training row's id by the OOV id with some probability. Without it the OOV
row never trains, and cold users (known only by features) or fresh items would be embedded by an
untrained vector; with it the tower learns to fall back on features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from training.config import ModelConfig
from training.features import TowerEncoder
from training.schema import FeatureSpec

__all__ = ["HistoryPooling", "Tower", "TwoTowerModel", "UserHistory", "bake_history", "build_history"]


class Tower(nn.Module):
    """One side (user or item): embeddings → concat → MLP → L2 normalize."""

    def __init__(self, encoder: TowerEncoder, cfg: ModelConfig, id_dropout: float) -> None:
        super().__init__()
        self.id_dropout = id_dropout
        self.id_emb = nn.Embedding(encoder.ids.size, cfg.id_dim)
        self.cat = nn.ModuleDict()
        self.multi = nn.ModuleDict()
        self.bucket = nn.ModuleDict()
        self.cont_names: list[str] = []
        width = cfg.id_dim
        for name, spec in encoder.specs.items():
            if spec.type == "categorical":
                self.cat[name] = nn.Embedding(encoder.vocabs[name].size, cfg.feature_dim)
                width += cfg.feature_dim
            elif spec.type == "multi_categorical":
                self.multi[name] = nn.Embedding(encoder.vocabs[name].size, cfg.feature_dim, padding_idx=0)
                width += cfg.feature_dim
        for name in encoder.continuous_names:
            self.bucket[name] = nn.Embedding(encoder.stats[name].n_buckets, cfg.feature_dim)
            self.cont_names.append(name)
            width += cfg.feature_dim + 1
        layers: list[nn.Module] = []
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = h
        layers.append(nn.Linear(width, cfg.embedding_dim))
        self.mlp = nn.Sequential(*layers)
        for emb in [self.id_emb, *self.cat.values(), *self.multi.values(), *self.bucket.values()]:
            nn.init.normal_(emb.weight, std=0.05)
            if emb.padding_idx is not None:
                with torch.no_grad():
                    emb.weight[emb.padding_idx].zero_()

    def id_drop_mask(self, n: int, device: torch.device | str) -> torch.Tensor | None:
        """Rows whose id is dropped to OOV this step (None when id dropout is off)."""
        if not (self.training and self.id_dropout > 0):
            return None
        return torch.rand(n, device=device) < self.id_dropout

    def features(
        self, batch: dict[str, torch.Tensor], id_offset: torch.Tensor | None = None, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The concatenated input of the MLP (before it), shape (n, width).

        `id_offset` (n, id_dim) is added to the id embedding of each row (training-time history
        pooling, see `HistoryPooling`); id dropout drops it together with the id. `drop` (n,)
        bool: the rows to drop, when the caller needs to know them; else drawn here.
        """
        ids = batch["id"]
        if drop is None:
            drop = self.id_drop_mask(len(ids), ids.device)
        if drop is not None:
            ids = torch.where(drop, torch.zeros_like(ids), ids)
            if id_offset is not None:
                id_offset = id_offset.masked_fill(drop.unsqueeze(-1), 0.0)
        id_vec = self.id_emb(ids)
        parts = [id_vec if id_offset is None else id_vec + id_offset]
        for name, emb in self.cat.items():
            parts.append(emb(batch[f"cat.{name}"]))
        for name, emb in self.multi.items():
            tok = batch[f"multi.{name}"]
            mask = (tok != 0).unsqueeze(-1).to(emb.weight.dtype)
            parts.append((emb(tok) * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        for name in self.cont_names:
            parts.append(batch[f"cont.{name}"].unsqueeze(-1).to(self.id_emb.weight.dtype))
            parts.append(self.bucket[name](batch[f"bucket.{name}"]))
        return torch.cat(parts, dim=-1)

    def forward(
        self, batch: dict[str, torch.Tensor], id_offset: torch.Tensor | None = None, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.normalize(self.mlp(self.features(batch, id_offset, drop)), dim=-1)

    @torch.no_grad()
    def embed_encoded(self, table: dict[str, torch.Tensor], chunk: int = 65536) -> torch.Tensor:
        """Unit rows for a whole encoded table (tensors already on the tower's device), in
        chunks and without autograd: a snapshot of the current weights (the caller picks the
        train/eval mode)."""
        n = len(table["id"])
        return torch.cat([self({k: v[s : s + chunk] for k, v in table.items()}) for s in range(0, n, chunk)])


def _to_tensors(arrays: dict[str, np.ndarray], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


class TwoTowerModel(nn.Module):
    """User tower + item tower + their encoders; the unit the trainer saves and the service loads."""

    def __init__(self, cfg: ModelConfig, user_encoder: TowerEncoder, item_encoder: TowerEncoder) -> None:
        super().__init__()
        self.cfg = cfg
        self.user_encoder = user_encoder
        self.item_encoder = item_encoder
        self.user_tower = Tower(user_encoder, cfg, cfg.user_id_dropout)
        self.item_tower = Tower(item_encoder, cfg, cfg.item_id_dropout)

    @property
    def embedding_dim(self) -> int:
        return self.cfg.embedding_dim

    @property
    def user_schema(self) -> dict[str, FeatureSpec]:
        return self.user_encoder.specs

    @property
    def item_schema(self) -> dict[str, FeatureSpec]:
        return self.item_encoder.specs

    @property
    def device(self) -> torch.device:
        return self.user_tower.id_emb.weight.device

    def config_dict(self) -> dict:
        return self.cfg.to_dict()

    # ---- inference API (docs/design.md) ------------------------------------------------------
    @torch.inference_mode()
    def _embed(self, tower: Tower, arrays: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
        was_training = tower.training
        tower.eval()
        n = len(arrays["id"])
        out = np.empty((n, self.cfg.embedding_dim), dtype=np.float32)
        for s in range(0, n, batch_size):
            chunk = {k: v[s : s + batch_size] for k, v in arrays.items()}
            out[s : s + batch_size] = tower(_to_tensors(chunk, self.device)).float().cpu().numpy()
        tower.train(was_training)
        return out

    def embed_items(self, items: pd.DataFrame, batch_size: int = 8192) -> np.ndarray:
        """Unit vectors (float32, (n, d)) for catalog rows: item_id + declared feature columns."""
        if "item_id" not in items.columns:
            raise ValueError(f"items frame needs an 'item_id' column; got {list(items.columns)}")
        arrays = self.item_encoder.encode_table(items["item_id"].astype(str).to_numpy(), items)
        return self._embed(self.item_tower, arrays, batch_size)

    def embed_users(self, records: Sequence[dict], batch_size: int = 8192) -> np.ndarray:
        """Unit vectors for request-shaped records {"user_id": str|None, "features": {...}}.

        Raises FeatureError(field, message) for an unknown feature name or a wrong value type.
        """
        arrays = self.user_encoder.encode_records(records)
        return self._embed(self.user_tower, arrays, batch_size)

    def embed_user_table(self, user_ids: Sequence[str], users: pd.DataFrame | None, batch_size: int = 8192) -> np.ndarray:
        """Unit vectors for users given as aligned ids + feature rows (evaluation, batch jobs)."""
        arrays = self.user_encoder.encode_table(np.asarray(user_ids, dtype=object), users)
        return self._embed(self.user_tower, arrays, batch_size)


# ---- user history pooling (training-time parametrization of the user id embedding) ----------


@dataclass
class UserHistory:
    """Each user's clicked catalog items as CSR arrays: items[indptr[u]:indptr[u + 1]].

    `u` indexes the trainer's user table, items are catalog positions; every item appears at
    most once per user (its latest click), oldest first. `keys` is the sorted `u * n_items + i`
    of every entry, for membership tests by binary search.
    """

    indptr: torch.Tensor   # (n_users + 1,) int64
    items: torch.Tensor    # (nnz,) int64
    keys: torch.Tensor     # (nnz,) int64, sorted
    n_items: int

    @property
    def lengths(self) -> torch.Tensor:
        return self.indptr[1:] - self.indptr[:-1]

    def to(self, device: torch.device | str) -> UserHistory:
        return UserHistory(self.indptr.to(device), self.items.to(device), self.keys.to(device), self.n_items)


def build_history(
    user_rows: np.ndarray, item_rows: np.ndarray, timestamps: np.ndarray, n_users: int, n_items: int, max_len: int | None = None
) -> UserHistory:
    """Per-user click history from aligned (user row, item row, timestamp) arrays.

    Repeated clicks on an item count once. With `max_len`, only each user's `max_len` most
    recent items are kept: recent taste predicts the next clicks best, and it bounds the cost.
    """
    if not (len(user_rows) == len(item_rows) == len(timestamps)):
        raise ValueError(f"history arrays differ in length: {len(user_rows)}, {len(item_rows)}, {len(timestamps)}")
    df = pd.DataFrame({"u": np.asarray(user_rows, np.int64), "i": np.asarray(item_rows, np.int64), "t": np.asarray(timestamps)})
    df = df.sort_values(["u", "t", "i"], kind="stable").drop_duplicates(["u", "i"], keep="last")
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"history max_len must be >= 1, got {max_len}")
        df = df.groupby("u", sort=False).tail(max_len)
    counts = np.bincount(df["u"].to_numpy(), minlength=n_users)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    items = df["i"].to_numpy(np.int64)
    keys = np.sort(df["u"].to_numpy(np.int64) * n_items + items)
    return UserHistory(torch.from_numpy(indptr), torch.from_numpy(items.copy()), torch.from_numpy(keys), n_items)


class HistoryPooling(nn.Module):
    """A user's id vector as the pooled embeddings of the items they clicked (FISM, Kabbur et al.
    2013; the "watch history" input of Covington et al. 2016).

    A free per-user embedding learns from that user's clicks alone; pooling shares strength
    across users who clicked the same items, which is what item-based models (EASE, SLIM) exploit
    on sparse logs. Pooled vector of user u: sum of h_i over u's history divided by n^alpha.

    Training excludes the row's own positive from its user's history (leave-one-out): with it,
    the tower could just recognise the item in its own input. At export the pooled vector over
    the full history is computed once per user and *added into the user tower's id embedding
    table* (`bake`), so the saved bundle has the ordinary tower format: the service and indexer
    need no history lookup, and users unseen in training keep the out-of-vocabulary row.
    """

    def __init__(self, n_items: int, dim: int, alpha: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"history alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.emb = nn.Embedding(n_items, dim)
        nn.init.normal_(self.emb.weight, std=0.05)

    def forward(self, history: UserHistory, users: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """(n, dim) pooled vectors of `users` (user-table rows), each minus its `exclude` item."""
        uniq, inv = torch.unique(users, return_inverse=True)
        starts, lens = history.indptr[uniq], history.lengths[uniq]
        offsets = torch.cumsum(lens, 0) - lens
        pos = torch.arange(int(lens.sum()), device=users.device) - torch.repeat_interleave(offsets - starts, lens)
        sums = F.embedding_bag(history.items[pos], self.emb.weight, offsets, mode="sum", sparse=self.emb.sparse)[inv]
        n = lens[inv].to(sums.dtype)
        if exclude is not None:
            keys = users.long() * history.n_items + exclude.long()
            if len(history.keys):
                at = torch.searchsorted(history.keys, keys).clamp(max=len(history.keys) - 1)
                member = (history.keys[at] == keys).to(sums.dtype)
            else:
                member = torch.zeros_like(n)
            sums = sums - member.unsqueeze(-1) * self.emb(exclude)
            n = n - member
        scale = torch.where(n > 0, n.clamp(min=1.0).pow(-self.alpha), torch.zeros_like(n))
        return sums * scale.unsqueeze(-1)

    @torch.no_grad()
    def pooled_all(self, history: UserHistory, chunk: int = 65536) -> torch.Tensor:
        """(n_users, dim) pooled vectors over each user's whole history (no exclusion)."""
        n_users = len(history.indptr) - 1
        out = [self(history, torch.arange(s, min(s + chunk, n_users), device=history.indptr.device)) for s in range(0, n_users, chunk)]
        return torch.cat(out) if out else self.emb.weight.new_zeros((0, self.emb.embedding_dim))


@torch.no_grad()
def bake_history(tower: Tower, id_codes: torch.Tensor, pooled: torch.Tensor) -> None:
    """Add each user's pooled history vector into its row of the tower's id embedding.

    `id_codes[u]` is the vocabulary row of user-table row u (0 = OOV). OOV rows are skipped:
    the OOV embedding stays what id dropout trained it to be, the fallback of unknown users.
    Several table rows never share a non-zero code, so the additions do not collide.
    """
    if len(id_codes) != len(pooled):
        raise ValueError(f"{len(id_codes)} id codes but {len(pooled)} pooled vectors")
    known = id_codes > 0
    tower.id_emb.weight[id_codes[known]] += pooled[known].to(tower.id_emb.weight.dtype)
