"""Self-supervised item tower (Yao et al. 2021, "Self-supervised learning for large-scale item
recommendations").

Tail items get few clicks, so the supervised loss barely shapes their vectors. SSL adds a
contrastive task on item *features* alone: two augmented views b', b'' of each item of an SSL
batch go through the item tower and must recognise each other among the m items:

    L_self = −(1/m) Σ_i log [ exp(cos(b'_i, b''_i)/τ) / Σ_j exp(cos(b'_i, b''_j)/τ) ]

and training minimises L_main + α·L_self. SSL items are drawn *uniformly from the catalog*
(not by clicks), so the regulariser reaches exactly the items the main loss neglects.

A "feature" is a group of keys of the encoded batch dict: "id", "cat.<f>", "multi.<f>", or
the pair ("cont.<f>", "bucket.<f>") of a continuous feature. Masking a feature replaces its
inputs by the missing value: index 0 (OOV id/category, padding for multi-valued tokens, the
"missing" bucket) and z-score 0 — exactly what the tower sees for a missing value at serving.

Augmentations (each returns two views):

* random: each view independently masks each feature of each item with probability `rate`;
* multi_dropout: each view independently drops each token of multi-valued features with
  probability `rate` (the feature keeps its other tokens);
* complementary: a random half S of the features is masked in view 1, the complement in view 2,
  so the views share no input (the paper's default pairing);
* correlated (CFM): pick a seed feature uniformly, S = the seed + its most correlated features
  by mutual information (computed once on the catalog) up to half of the features; view 1 masks
  S, view 2 the complement. Masking correlated features together stops the tower from
  reconstructing a masked feature from its near-duplicates, making the task harder and useful.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]
AUGMENTATIONS = ("random", "multi_dropout", "complementary", "correlated")


def feature_groups(batch: dict) -> dict[str, list[str]]:
    """Feature name → its keys in the encoded batch, in key order ("id" first when present)."""
    groups: dict[str, list[str]] = {}
    for key in batch:
        if key == "id":
            groups["id"] = ["id"]
            continue
        kind, _, name = key.partition(".")
        if kind not in ("cat", "multi", "cont", "bucket") or not name:
            raise ValueError(f"unexpected encoded key {key!r}; expected id, cat.*, multi.*, cont.*, bucket.*")
        groups.setdefault(name if kind in ("cont", "bucket") else key, []).append(key)
    return groups


def mask_features(batch: Batch, groups: dict[str, list[str]], names: list[str], rows: torch.Tensor | None = None) -> Batch:
    """A copy of `batch` with features `names` replaced by missing (0) — in every row, or only in
    rows where the bool vector `rows` (n,) is true."""
    out = dict(batch)
    for name in names:
        for key in groups[name]:
            v = out[key]
            if rows is None:
                out[key] = torch.zeros_like(v)
            else:
                r = rows.view(-1, *([1] * (v.dim() - 1)))
                out[key] = torch.where(r, torch.zeros_like(v), v)
    return out


def random_feature_masking(batch: Batch, groups: dict[str, list[str]], rate: float, generator: torch.Generator) -> Batch:
    """One view: each (item, feature) is masked independently with probability `rate`."""
    n = len(next(iter(batch.values())))
    out = batch
    for name in groups:
        rows = (torch.rand(n, generator=generator) < rate).to(batch[groups[name][0]].device)
        out = mask_features(out, groups, [name], rows)
    return out


def multi_value_dropout(batch: Batch, rate: float, generator: torch.Generator) -> Batch:
    """One view: each token of each multi-valued feature is dropped (set to pad 0) with probability `rate`."""
    out = dict(batch)
    for key, v in batch.items():
        if key.startswith("multi."):
            drop = (torch.rand(v.shape, generator=generator) < rate).to(v.device)
            out[key] = v.masked_fill(drop, 0)
    return out


def complementary_split(names: list[str], generator: torch.Generator) -> tuple[list[str], list[str]]:
    """A random half S (⌊n/2⌋, at least 1) of the features and its complement."""
    if len(names) < 2:
        raise ValueError(f"complementary masking needs >= 2 features, got {names}")
    perm = torch.randperm(len(names), generator=generator).tolist()
    half = len(names) // 2
    s = sorted(perm[:half])
    return [names[i] for i in s], [names[i] for i in range(len(names)) if i not in s]


def _discrete_column(batch: dict, keys: list[str]) -> np.ndarray:
    """One integer value per item for MI: the id/category/bucket index; for multi-valued
    features the first token (a cheap stand-in for the token set)."""
    key = next((k for k in keys if not k.startswith("cont.")), keys[0])
    v = np.asarray(batch[key])
    return v[:, 0] if v.ndim == 2 else v


def mutual_information(x: np.ndarray, y: np.ndarray) -> float:
    """MI (nats) of two discrete columns from their empirical joint distribution."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"columns must be non-empty and aligned, got lengths {len(x)} and {len(y)}")
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    joint = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(joint, (xi, yi), 1.0)
    joint /= len(x)
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (px @ py)[nz])).sum())


def feature_mutual_information(catalog: dict, groups: dict[str, list[str]]) -> np.ndarray:
    """(F, F) pairwise MI between the features of the encoded catalog (arrays or tensors)."""
    names = list(groups)
    cols = [_discrete_column({k: np.asarray(v.cpu() if torch.is_tensor(v) else v) for k, v in catalog.items()}, groups[n]) for n in names]
    mi = np.zeros((len(names), len(names)))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            mi[i, j] = mi[j, i] = mutual_information(cols[i], cols[j])
    return mi


def correlated_split(names: list[str], mi: np.ndarray, generator: torch.Generator) -> tuple[list[str], list[str]]:
    """CFM: a uniform seed feature plus its ⌊n/2⌋ − 1 most MI-correlated features, and the rest."""
    n = len(names)
    if n < 2 or mi.shape != (n, n):
        raise ValueError(f"correlated masking needs >= 2 features and an (n, n) MI matrix; got {n} features, MI {mi.shape}")
    seed = int(torch.randint(0, n, (1,), generator=generator))
    order = [j for j in np.argsort(-mi[seed], kind="stable") if j != seed]
    s = {seed, *order[: n // 2 - 1]}
    return [names[i] for i in range(n) if i in s], [names[i] for i in range(n) if i not in s]


def ssl_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_self: mean −log softmax_j(cos(z1_i, z2_j)/τ)[i]; z1, z2 (m, d) unit vectors."""
    if z1.shape != z2.shape:
        raise ValueError(f"views must have equal shapes, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    logits = z1 @ z2.T / temperature
    return F.cross_entropy(logits, torch.arange(len(z1), device=z1.device))


class SSLTask:
    """Draws a uniform SSL batch from the encoded catalog, augments it twice, returns L_self."""

    def __init__(
        self,
        catalog: Batch,
        *,
        augmentation: str = "correlated",
        rate: float = 0.5,
        batch_size: int = 256,
        temperature: float = 0.1,
    ) -> None:
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"ssl_augmentation {augmentation!r} is not one of {AUGMENTATIONS}")
        self.catalog = catalog
        self.n_items = len(catalog["id"])
        self.groups = feature_groups(catalog)
        self.names = list(self.groups)
        if augmentation in ("complementary", "correlated") and len(self.names) < 2:
            # checked here, when the config is applied, not at the first training step
            raise ValueError(
                f"ssl_augmentation {augmentation!r} splits the item features into two views and needs >= 2 "
                f"feature groups; this catalog has {self.names} (use 'random', or add item features)"
            )
        if augmentation == "multi_dropout" and not any(k.startswith("multi.") for k in catalog):
            raise ValueError(
                "ssl_augmentation 'multi_dropout' drops tokens of multi_categorical item features, and this catalog "
                "has none: both views would be identical (use 'random' or 'correlated')"
            )
        self.augmentation, self.rate = augmentation, rate
        self.batch_size, self.temperature = batch_size, temperature
        self.mi = feature_mutual_information(catalog, self.groups) if augmentation == "correlated" else None

    def sample_items(self, generator: torch.Generator) -> torch.Tensor:
        """m catalog rows, uniformly without replacement (duplicates would be false negatives)."""
        m = min(self.batch_size, self.n_items)
        if 4 * m >= self.n_items:  # small catalog: a permutation is cheap
            return torch.randperm(self.n_items, generator=generator)[:m]
        # O(m), not O(catalog): the first m distinct values of a uniform stream are a uniform
        # sample without replacement (sequential drawing with rejection of repeats)
        got = torch.empty(0, dtype=torch.int64)
        while len(got) < m:
            draws = torch.cat([got, torch.randint(self.n_items, (2 * m,), generator=generator)])
            uniq, inv = torch.unique(draws, return_inverse=True)
            first = torch.full((len(uniq),), len(draws), dtype=torch.int64).scatter_reduce_(
                0, inv, torch.arange(len(draws)), "amin"
            )
            got = draws[first.sort().values]
        return got[:m]

    def views(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, Batch]:
        if self.augmentation == "random":
            return (random_feature_masking(batch, self.groups, self.rate, generator),
                    random_feature_masking(batch, self.groups, self.rate, generator))
        if self.augmentation == "multi_dropout":
            return multi_value_dropout(batch, self.rate, generator), multi_value_dropout(batch, self.rate, generator)
        if self.augmentation == "complementary":
            s, c = complementary_split(self.names, generator)
        else:
            assert self.mi is not None
            s, c = correlated_split(self.names, self.mi, generator)
        return mask_features(batch, self.groups, s), mask_features(batch, self.groups, c)

    def loss(self, item_tower: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
        rows = self.sample_items(generator).to(self.catalog["id"].device)
        batch = {k: v[rows] for k, v in self.catalog.items()}
        v1, v2 = self.views(batch, generator)
        return ssl_loss(item_tower(v1), item_tower(v2), self.temperature)
