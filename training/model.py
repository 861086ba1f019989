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

from training.config import RECENCY_POSITIONS, ModelConfig
from training.features import TowerEncoder
from training.schema import FeatureSpec

__all__ = ["HistoryPooling", "Tower", "TwoTowerModel", "UserHistory", "bake_history", "build_history", "history_bags"]


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
        self, batch: dict[str, torch.Tensor], id_offset: torch.Tensor | None = None, drop: torch.Tensor | None = None,
        id_vec: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The concatenated input of the MLP (before it), shape (n, width).

        `id_offset` (n, id_dim) is added to the id embedding of each row as given (the pooled
        history, see `HistoryPooling`: for a row whose id is dropped the caller passes the
        history that row may see, not the id's). `drop` (n,) bool: the rows to drop, when the
        caller needs to know them; else drawn here. `id_vec` (n, id_dim) replaces the id slot
        altogether (request-time histories, `TwoTowerModel.user_id_vectors`).
        """
        if id_vec is None:
            ids = batch["id"]
            if drop is None:
                drop = self.id_drop_mask(len(ids), ids.device)
            if drop is not None:
                ids = torch.where(drop, torch.zeros_like(ids), ids)
            id_vec = self.id_emb(ids)
            if id_offset is not None:
                id_vec = id_vec + id_offset
        parts = [id_vec]
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
        self, batch: dict[str, torch.Tensor], id_offset: torch.Tensor | None = None, drop: torch.Tensor | None = None,
        id_vec: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return F.normalize(self.mlp(self.features(batch, id_offset, drop, id_vec)), dim=-1)

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
        h = cfg.history
        self.user_history = None if h is None else HistoryPooling(
            item_encoder.ids.size, cfg.id_dim, h.alpha, h.encoder, h.max_len, user_encoder.ids.size if h.free_id else None,
        )

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
    def _embed(
        self, tower: Tower, arrays: dict[str, np.ndarray], batch_size: int, histories: Sequence[Sequence[int] | None] | None = None,
    ) -> np.ndarray:
        was_training = tower.training
        tower.eval()
        n = len(arrays["id"])
        out = np.empty((n, self.cfg.embedding_dim), dtype=np.float32)
        for s in range(0, n, batch_size):
            chunk = _to_tensors({k: v[s : s + batch_size] for k, v in arrays.items()}, self.device)
            id_vec = None
            if histories is not None and any(h is not None for h in histories[s : s + batch_size]):
                id_vec = self.user_id_vectors(chunk["id"], histories[s : s + batch_size])
            out[s : s + batch_size] = tower(chunk, id_vec=id_vec).float().cpu().numpy()
        tower.train(was_training)
        return out

    def user_id_vectors(self, codes: torch.Tensor, histories: Sequence[Sequence[int] | None]) -> torch.Tensor:
        """(n, id_dim): the user tower's id slot for users `codes` (id vocabulary rows, 0 = OOV)
        with request-time `histories` (history-table rows, oldest first, unknown items already
        dropped, see `training.numpy_tower.encode_history`; None: no history sent).

        No history: the id row as saved (a known user's training history is baked into it). A
        history: the pooled history replaces the training one, next to what training put beside
        it: for an unknown user the OOV row as training left it (`HistoryPooling.cold_id`), for a
        known user their free row (zero unless `history_free_id`). `NumpyTower` is its twin.
        """
        pool = self.user_history
        out = self.user_tower.id_emb(codes)
        rows = [i for i, h in enumerate(histories) if h is not None]
        if pool is None or not rows:
            return out
        sel = torch.tensor(rows, device=codes.device)
        bags = [list(histories[i])[-pool.max_len:] if pool.max_len else list(histories[i]) for i in rows]
        items = torch.tensor([c for b in bags for c in b], dtype=torch.long, device=codes.device)
        lengths = torch.tensor([len(b) for b in bags], dtype=torch.long, device=codes.device)
        c = codes[sel]
        free = pool.free_id[c] if pool.free_id is not None else torch.zeros_like(out[sel])
        base = torch.where((c == 0).unsqueeze(-1), pool.cold_id.expand_as(free), free)
        out = out.clone()
        out[sel] = base + pool(items, lengths)
        return out

    def embed_items(self, items: pd.DataFrame, batch_size: int = 8192) -> np.ndarray:
        """Unit vectors (float32, (n, d)) for catalog rows: item_id + declared feature columns."""
        if "item_id" not in items.columns:
            raise ValueError(f"items frame needs an 'item_id' column; got {list(items.columns)}")
        arrays = self.item_encoder.encode_table(items["item_id"].astype(str).to_numpy(), items)
        return self._embed(self.item_tower, arrays, batch_size)

    def embed_users(self, records: Sequence[dict], batch_size: int = 8192) -> np.ndarray:
        """Unit vectors for request-shaped records {"user_id": str|None, "features": {...},
        "history": [item_id, ...] (optional, oldest first)}.

        Raises FeatureError(field, message) for an unknown feature name or a wrong value type.
        Unknown history items are ignored; a model without a history input ignores the history.
        """
        arrays = self.user_encoder.encode_records(records)
        histories = [self.history_codes(r.get("history")) for r in records]
        return self._embed(self.user_tower, arrays, batch_size, histories)

    def history_codes(self, item_ids: Sequence[str] | None) -> list[int] | None:
        """History-table rows of a request history (unknown items dropped, the most recent
        `max_len` kept); None for no history, or when the model has no history input."""
        from training.numpy_tower import encode_history

        if item_ids is None or self.user_history is None:
            return None
        return list(encode_history(self.item_encoder.ids, item_ids, self.user_history.max_len)[0])

    def embed_user_table(
        self, user_ids: Sequence[str | None], users: pd.DataFrame | None, batch_size: int = 8192,
        histories: Sequence[Sequence[str] | None] | None = None,
    ) -> np.ndarray:
        """Unit vectors for users given as aligned ids + feature rows (evaluation, batch jobs),
        optionally with request-time histories (item ids, oldest first; None: none sent)."""
        arrays = self.user_encoder.encode_table(np.asarray(user_ids, dtype=object), users)
        codes = None if histories is None else [self.history_codes(h) for h in histories]
        return self._embed(self.user_tower, arrays, batch_size, codes)


# ---- user history: the request-time history input of the user tower -------------------------


@dataclass
class UserHistory:
    """Each user's clicks in EVAL.md order (timestamp, then item id) as CSR arrays, oldest first:
    items[indptr[u]:indptr[u + 1]] for user-table row u.

    `items` are history-table rows: the item tower's id codes (0 = an item unseen in training,
    never in a training history). `position[r]` is where input click r sits in its user's
    sequence, so the clicks strictly before it are the user's first `position[r]` items: the
    causal history of a training row. A repeated click stays in the sequence twice, as it would
    in a client's record of the user's clicks.
    """

    indptr: torch.Tensor    # (n_users + 1,) int64
    items: torch.Tensor     # (nnz,) int64
    position: torch.Tensor  # (n_clicks,) int64, aligned with the clicks given to build_history

    @property
    def lengths(self) -> torch.Tensor:
        return self.indptr[1:] - self.indptr[:-1]

    def to(self, device: torch.device | str) -> UserHistory:
        return UserHistory(self.indptr.to(device), self.items.to(device), self.position.to(device))


def build_history(
    user_rows: np.ndarray, item_codes: np.ndarray, timestamps: np.ndarray, n_users: int, item_keys: np.ndarray | None = None
) -> UserHistory:
    """Per-user click sequences from aligned (user row, item code, timestamp) arrays.

    Ties in time are broken by `item_keys` (the item ids' EVAL.md sort key, `training.split`;
    default: the codes), so a row's causal history is exactly what precedes it in the split's order.
    """
    if not (len(user_rows) == len(item_codes) == len(timestamps)) or (item_keys is not None and len(item_keys) != len(user_rows)):
        raise ValueError(f"history arrays differ in length: {len(user_rows)}, {len(item_codes)}, {len(timestamps)}"
                         + ("" if item_keys is None else f", {len(item_keys)}"))
    df = pd.DataFrame({
        "u": np.asarray(user_rows, np.int64), "t": np.asarray(timestamps),
        "k": np.asarray(item_codes if item_keys is None else item_keys), "i": np.asarray(item_codes, np.int64),
    })
    order = df.sort_values(["u", "t", "k"], kind="stable").index.to_numpy()
    users_sorted = df["u"].to_numpy()[order]
    counts = np.bincount(users_sorted, minlength=n_users)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    position = np.empty(len(df), dtype=np.int64)
    position[order] = np.arange(len(df)) - indptr[users_sorted]
    items = df["i"].to_numpy()[order].astype(np.int64)
    return UserHistory(torch.from_numpy(indptr), torch.from_numpy(items), torch.from_numpy(position))


def history_bags(history: UserHistory, users: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(items, lengths) of the bags items[indptr[u] + start : indptr[u] + end] per row, flattened
    (the input of `HistoryPooling.forward`); `starts`/`ends` are positions in each user's sequence."""
    lengths = (ends - starts).clamp(min=0)
    base = history.indptr[users] + starts
    offsets = torch.cumsum(lengths, 0) - lengths
    flat = torch.arange(int(lengths.sum()), device=users.device) + torch.repeat_interleave(base - offsets, lengths)
    return history.items[flat], lengths


class HistoryPooling(nn.Module):
    """The user's click history as one id-width vector (FISM, Kabbur et al. 2013; the "watch
    history" input of Covington et al. 2016), added to the user tower's id slot.

    A free per-user embedding learns from that user's clicks alone and exists only for users seen
    in training; pooled item embeddings share strength across users who clicked the same items and
    exist for anyone who sends clicks, which is what makes the history a request-time input.

    Pooled vector of a bag h_1..h_n (oldest first, at most `max_len`, the most recent):
    `sum_j w_j h_j / sum_j w_j * n^(1 - alpha)`, i.e. `sum / n^alpha` for the mean (w = 1). The
    `recency` encoder learns w_j = exp(a_d), one logit per distance d from the newest click
    (initialised at 0: the mean), so recent clicks can count more; `max_len` logits, or without
    a max_len `RECENCY_POSITIONS`, the last one shared by every older click. Row 0 of `emb` (an item
    unseen in training) is never pooled: callers drop such ids.

    Buffers the bundle carries for request-time histories (`TwoTowerModel.user_id_vectors`):
    `cold_id`, the out-of-vocabulary id row as training left it (an unknown user's id slot next
    to a history; the cold-start calibration refits the features-only OOV row afterwards), and
    with `free_id` the known users' free id rows before the training history is baked in.
    """

    def __init__(self, n_items: int, dim: int, alpha: float = 1.0, encoder: str = "mean", max_len: int | None = None,
                 n_users: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"history alpha must be in [0, 1], got {alpha}")
        if encoder not in ("mean", "recency"):
            raise ValueError(f"history encoder must be 'mean' or 'recency', got {encoder!r}")
        if max_len is not None and max_len < 1:
            raise ValueError(f"history max_len must be >= 1, got {max_len}")
        self.alpha, self.encoder, self.max_len = alpha, encoder, max_len
        self.emb = nn.Embedding(n_items, dim)
        nn.init.normal_(self.emb.weight, std=0.05)
        positions = max_len or RECENCY_POSITIONS
        self.position_logits = nn.Parameter(torch.zeros(positions)) if encoder == "recency" else None
        self.register_buffer("cold_id", torch.zeros(dim))
        self.register_buffer("free_id", torch.zeros(n_users, dim) if n_users is not None else None)

    def forward(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(n, dim) pooled vectors of n bags: `items` the bags' history rows concatenated (each
        bag oldest first, at most `max_len` long), `lengths` (n,) their sizes (0: a zero vector)."""
        n = len(lengths)
        offsets = torch.cumsum(lengths, 0) - lengths
        counts = lengths.to(self.emb.weight.dtype)
        weights = None
        if self.position_logits is not None and len(items):
            bag = torch.repeat_interleave(torch.arange(n, device=items.device), lengths)
            dist = (offsets + lengths - 1)[bag] - torch.arange(len(items), device=items.device)  # 0 = newest
            weights = self.position_logits[dist.clamp(max=len(self.position_logits) - 1)].exp()
            counts_w = torch.zeros(n, dtype=weights.dtype, device=items.device).index_add(0, bag, weights)
        sums = F.embedding_bag(items, self.emb.weight, offsets, mode="sum", per_sample_weights=weights, sparse=self.emb.sparse)
        denom = counts if weights is None else counts_w
        scale = counts.clamp(min=1.0).pow(1.0 - self.alpha) / denom.clamp(min=1e-12)
        scale = torch.where(lengths > 0, scale, torch.zeros_like(scale))
        return sums * scale.unsqueeze(-1)

    def latest(self, history: UserHistory, users: torch.Tensor, ends: torch.Tensor | None = None) -> torch.Tensor:
        """(n, dim): each user's pooled most recent clicks before position `ends` (default: all)."""
        ends = history.lengths[users] if ends is None else ends
        starts = ends - self.max_len if self.max_len is not None else torch.zeros_like(ends)
        return self(*history_bags(history, users, starts.clamp(min=0), ends))

    @torch.no_grad()
    def pooled_all(self, history: UserHistory, chunk: int = 65536) -> torch.Tensor:
        """(n_users, dim) pooled vectors over each user's most recent clicks (the baked history)."""
        n_users = len(history.indptr) - 1
        device = history.indptr.device
        out = [self.latest(history, torch.arange(s, min(s + chunk, n_users), device=device)) for s in range(0, n_users, chunk)]
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
