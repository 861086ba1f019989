"""EVAL.md metrics: full ranking over the whole catalog, implemented once.

Pure functions over arrays (`topk_excluding`, `ranking_metrics`) do the math; `evaluate_model`
wires them to a dataset split. Warm users: rank every catalog item except the user's train
items. Cold users: rank everything, known only by their features (their id is OOV).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from training.dataset import Dataset
from training.split import Split

KS = (20, 100)
METRICS = tuple(f"{m}@{k}" for m in ("recall", "ndcg") for k in KS) + ("tail_recall@100", "coverage@20")


def topk_excluding(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    k: int,
    exclude: Sequence[np.ndarray] | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Indices (n_users, k) of the highest inner products, best first, `exclude[u]` removed.

    k is capped at the catalog size. Where a user has fewer than k items left once their
    exclusions are removed, the list ends in -1 (no item): an excluded item never fills a slot,
    so it can never count as a hit (a re-clicked train item in the test rows is a miss, as
    EVAL.md's ranking without the user's train items makes it)."""
    if user_vecs.ndim != 2 or item_vecs.ndim != 2 or user_vecs.shape[1] != item_vecs.shape[1]:
        raise ValueError(f"user {user_vecs.shape} and item {item_vecs.shape} vectors must be 2-D with equal width")
    k = min(k, item_vecs.shape[0])
    items = torch.from_numpy(np.ascontiguousarray(item_vecs, dtype=np.float32))
    out = np.empty((len(user_vecs), k), dtype=np.int64)
    # at most ~2^26 scores (256 MiB) at a time: 1,024 users x 1M items would be 4 GiB
    chunk = max(1, min(chunk, (1 << 26) // max(1, items.shape[0])))
    for s in range(0, len(user_vecs), chunk):
        scores = torch.from_numpy(np.ascontiguousarray(user_vecs[s : s + chunk], dtype=np.float32)) @ items.T
        if exclude is not None:
            for r, ex in enumerate(exclude[s : s + chunk]):
                if len(ex):
                    scores[r, torch.as_tensor(np.array(ex, dtype=np.int64))] = -torch.inf
        best = torch.topk(scores, k, dim=1, sorted=True)
        out[s : s + chunk] = torch.where(torch.isneginf(best.values), -1, best.indices).numpy()
    return out


def ranking_metrics(
    top: np.ndarray,
    truth: Sequence[np.ndarray],
    is_tail: np.ndarray,
    n_items: int,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Recall@K, NDCG@K (binary relevance, ideal DCG over min(K, |truth|)), tail_recall@100,
    coverage@20 for ranked lists `top` (n, >=max K) against per-user relevant item indices.
    Negative entries in `top` are empty slots (see `topk_excluding`): never a hit, never covered."""
    if len(top) != len(truth):
        raise ValueError(f"{len(top)} ranked lists but {len(truth)} truth sets")
    res: dict[str, list[float]] = {f"recall@{k}": [] for k in ks} | {f"ndcg@{k}": [] for k in ks}
    tail_rec: list[float] = []
    discounts = 1.0 / np.log2(np.arange(2, max(ks) + 2))
    for row, rel in zip(top, truth, strict=True):
        rel = np.unique(np.asarray(rel, dtype=np.int64))
        if len(rel) == 0:
            continue
        hits = np.isin(row[: max(ks)], rel).astype(np.float64)
        for k in ks:  # a catalog smaller than k gives a shorter list: it is all there is
            res[f"recall@{k}"].append(hits[:k].sum() / len(rel))
            idcg = discounts[: min(k, len(rel))].sum()
            res[f"ndcg@{k}"].append((hits[:k] * discounts[: len(hits[:k])]).sum() / idcg)
        tail = rel[is_tail[rel]]
        if len(tail):
            tail_rec.append(np.isin(tail, row[:100]).sum() / len(tail))
    out = {m: float(np.mean(v)) if v else 0.0 for m, v in res.items()}
    out["tail_recall@100"] = float(np.mean(tail_rec)) if tail_rec else 0.0
    shown = np.unique(top[:, :20])
    out["coverage@20"] = float((shown >= 0).sum() / n_items) if len(top) else 0.0
    return out


def group_items(df: pd.DataFrame, item_index: pd.Index) -> dict[str, np.ndarray]:
    """Catalog rows of each user's items in `df`: {user_id: int array}."""
    rows = item_index.get_indexer(df["item_id"])
    s = pd.Series(rows, index=df["user_id"].to_numpy())
    return {u: g.to_numpy() for u, g in s.groupby(level=0, sort=False)}


def user_features(dataset: Dataset, user_ids: Sequence[str]) -> pd.DataFrame | None:
    """users.csv rows aligned with `user_ids` (blank where a user has none), or None."""
    if dataset.users is None:
        return None
    feats = dataset.users.set_index("user_id")
    return feats.reindex(pd.Index(user_ids)).fillna("").reset_index(drop=True)


def evaluate_model(
    model,
    dataset: Dataset,
    split: Split,
    *,
    truth_part: str = "test",
    item_vecs: np.ndarray | None = None,
    max_users: int | None = None,
    include_cold: bool = True,
    features_only: bool = False,
    seed: int = 0,
) -> dict[str, float | None]:
    """EVAL.md metrics of `model` on `split.<truth_part>` (warm) and, optionally, cold users.

    `truth_part="val"` evaluates on validation with the fit rows excluded (early stopping and
    tuning); "test" excludes all train rows. `max_users` samples users for speed on big data.
    `features_only` embeds warm users with their id forced to out-of-vocabulary: on the
    validation split it is the cold-start proxy used for tuning, so cold test users stay unseen.

    On the test part every metric key is present (the CLI's contract): a group with no users,
    e.g. a dataset without cold users, reports None (JSON null) for its metrics, not 0.
    """
    items = dataset.items
    item_index = pd.Index(items["item_id"])
    n_items = len(item_index)
    if item_vecs is None:
        item_vecs = model.embed_items(items)
    head = item_index.isin(list(split.head_items))
    is_tail = ~head
    known = split.fit if truth_part == "val" else split.train
    exclude_map = group_items(known, item_index)
    truth_map = group_items(getattr(split, truth_part), item_index)
    rng = np.random.default_rng(seed)

    def run(truth: dict[str, np.ndarray], excl: dict[str, np.ndarray] | None) -> dict[str, float]:
        users = list(truth)
        if max_users is not None and len(users) > max_users:
            users = [users[i] for i in sorted(rng.choice(len(users), max_users, replace=False))]
        if not users:
            return {}
        ids = [None] * len(users) if features_only else users
        vecs = model.embed_user_table(ids, user_features(dataset, users))
        empty = np.empty(0, dtype=np.int64)
        exclude = [excl.get(u, empty) for u in users] if excl is not None else None
        top = topk_excluding(vecs, item_vecs, max(KS), exclude)
        return ranking_metrics(top, [truth[u] for u in users], is_tail, n_items)

    metrics: dict[str, float | None] = dict(run(truth_map, exclude_map))
    if include_cold and truth_part == "test" and len(split.cold):
        metrics |= {f"cold_{k}": v for k, v in run(group_items(split.cold, item_index), None).items()}
    if truth_part == "test":
        names = METRICS + (tuple(f"cold_{m}" for m in METRICS) if include_cold else ())
        metrics = {m: metrics.get(m) for m in names}
    return {k: None if v is None else round(v, 4) for k, v in metrics.items()}


def history_item_vectors(model, histories, catalog: pd.Index, item_vecs: np.ndarray) -> list[np.ndarray | None]:
    """Per request history (None: none sent) the catalog vectors (m, d) of the items the user tower
    pools (`model.history_codes`: known items, the most recent `max_len`, oldest first; an item
    missing from the catalog has no vector and is skipped): what `HistoryFoldIn` folds in, the
    rows the service reads from its index for the same request."""
    tokens = model.item_encoder.ids.tokens
    out: list[np.ndarray | None] = []
    for h in histories:
        codes = model.history_codes(h)
        if codes is None:
            out.append(None)
            continue
        rows = catalog.get_indexer([tokens[c - 1] for c in codes]) if codes else np.empty(0, np.int64)
        out.append(item_vecs[rows[rows >= 0]])
    return out


def history_metrics(model, dataset: Dataset, split: Split, *, item_vecs: np.ndarray | None = None,
                    anchors: bool = False) -> dict:
    """EVAL.md §"Request-time history" figures of `model` (`training.history_eval`'s protocols):
    flat keys `<protocol>_<metric>` (`cold_m5_recall@20`, `warm_fresh_recall@20`, ...; None for
    a protocol without users) and, with `anchors`, `history_anchors`: {protocol: {anchor:
    metrics}} for the popularity / EASE / item-kNN fold-ins. The model embeds each user with the
    protocol's request history through `embed_user_table(..., histories=)`, the torch twin of
    what the service computes for a request with `history`, then folds the history's catalog
    vectors in with the bundle's `HistoryFoldIn` rule, as the service does."""
    from training.history_eval import (
        PROTOCOLS,
        evaluate_history,
        history_anchors,
        history_protocols,
    )
    from training.numpy_tower import HistoryFoldIn

    items = dataset.items
    item_ids = items["item_id"].astype(str).tolist()
    if item_vecs is None:
        item_vecs = model.embed_items(items)
    protocols = history_protocols(split, item_ids)
    is_tail = ~pd.Index(item_ids).isin(list(split.head_items))

    fold_in = HistoryFoldIn.from_config(model.cfg)
    catalog = pd.Index(item_ids)

    def user_vectors(user_ids, histories):
        vecs = model.embed_user_table(list(user_ids), user_features(dataset, list(user_ids)), histories=histories)
        if fold_in is None:
            return vecs
        return fold_in.apply(vecs, history_item_vectors(model, histories, catalog, item_vecs))

    res = evaluate_history(user_vectors, item_vecs, protocols, is_tail)
    out: dict = {}
    for name in PROTOCOLS:
        got = res.get(name, {})
        for m in METRICS:
            out[f"{name}_{m}"] = got.get(m)
        out[f"{name}_users"] = got.get("users", 0)
    if anchors:
        out["history_anchors"] = history_anchors(split, item_ids, protocols)
    return out
