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
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from training.dataset import FeatureSpec
from training.features import FeatureError, TowerEncoder

__all__ = ["FeatureError", "ModelConfig", "Tower", "TwoTowerModel"]


@dataclass
class ModelConfig:
    """Architecture hyper-parameters (stored in the bundle's config.json)."""

    embedding_dim: int = 64          # output (cosine) space
    id_dim: int = 64                 # id embedding width
    feature_dim: int = 16            # width of each categorical / multi / bucket embedding
    hidden: list[int] = field(default_factory=lambda: [256])
    dropout: float = 0.0
    user_id_dropout: float = 0.3
    item_id_dropout: float = 0.1
    temperature: float = 0.05        # training only: logits = cos / temperature

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


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

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The concatenated input of the MLP (before it), shape (n, width)."""
        ids = batch["id"]
        if self.training and self.id_dropout > 0:
            ids = torch.where(torch.rand(ids.shape, device=ids.device) < self.id_dropout, torch.zeros_like(ids), ids)
        parts = [self.id_emb(ids)]
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

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.mlp(self.features(batch)), dim=-1)


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
        return asdict(self.cfg)

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
