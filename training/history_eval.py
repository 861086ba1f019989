"""EVAL.md §"Request-time history": the cold_mM and warm_fresh protocols and their anchors.

A user tower that takes the user's recent clicks as a request input is judged on what a client
could send: the clicks it has seen so far. Two protocols, both on the EVAL.md split (models are
fitted on the train split only; order = (timestamp, item id) as in the split):

* `cold_mM` (M in 1, 3, 5, 10): a cold user (never trained on) with more than M clicks reveals
  the first M as the request history; relevant = the rest; the revealed items are excluded from
  the ranking. The id is unseen, the features count.
* `warm_fresh`: a warm user with at least 2 test clicks reveals the first floor(n_test / 2) of
  them as fresh history (clicked after training); relevant = the remaining test clicks; train and
  revealed items are excluded. The request history is the user's last 50 clicks (train, then
  revealed), oldest first.

The protocols are data (`history_protocols`), the scoring is one function
(`evaluate_history`) over a callable that turns (user ids, request histories) into user vectors,
so `trainer evaluate`, the experiment report and a test through the HTTP service all measure the
same thing. The anchors (`history_anchors`) score the revealed history as a 0/1 row with models
fitted on the train split, no refit ("fold-in"): popularity, EASE (λ grid-searched on the
protocol itself, as EVAL.md does, so optimistic) and item-kNN with cosine similarity.

This module holds no model code: it depends on the split and the metric functions only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from training.evaluate import KS, ranking_metrics, topk_excluding
from training.split import Split, id_sort_key

COLD_REVEALED = (1, 3, 5, 10)
FRESH_HISTORY = 50  # warm_fresh: the request history is the user's last 50 clicks
PROTOCOLS = tuple(f"cold_m{m}" for m in COLD_REVEALED) + ("warm_fresh",)
EASE_LAMBDAS = (50.0, 100.0, 200.0, 500.0, 1000.0)
EASE_MAX_ITEMS = 5_000  # EASE keeps one items x items float64 matrix per λ: 5k items is 200 MB each

# (user ids, request histories as item ids oldest first) -> (n, dim) user vectors
UserVectors = Callable[[Sequence[str], Sequence[Sequence[str]]], np.ndarray]


@dataclass(frozen=True)
class HistoryProtocol:
    """One protocol's users: what each request sends and how its answer is judged.

    Row j describes one user: `history[j]` is the request history (item ids, oldest first; what
    a client sends), `fold_in_rows[j]` the catalog rows of every click known for the user at
    request time, the 0/1 row the fold-in anchors score (cold_mM: the revealed clicks;
    warm_fresh: train + revealed, which reproduces EVAL.md's anchors), `relevant[j]` the catalog rows that count as hits and
    `exclude[j]` the rows removed from the ranking.
    """

    name: str
    user_ids: list[str]
    history: list[list[str]]
    fold_in_rows: list[np.ndarray]
    relevant: list[np.ndarray]
    exclude: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.user_ids)


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by user, then (timestamp, item id) with EVAL.md's id ordering."""
    return (
        df.assign(_u=id_sort_key(df["user_id"]), _i=id_sort_key(df["item_id"]))
        .sort_values(["_u", "timestamp", "_i"], kind="stable")
        .drop(columns=["_u", "_i"])
        .reset_index(drop=True)
    )


def _per_user(df: pd.DataFrame) -> dict[str, list[str]]:
    """{user id: item ids in row order} of an ordered frame."""
    users = df["user_id"].astype(str).to_numpy()
    items = df["item_id"].astype(str).to_numpy()
    out: dict[str, list[str]] = {}
    for u, i in zip(users, items, strict=True):
        out.setdefault(u, []).append(i)
    return out


def _rows(item_index: pd.Index, ids: Sequence[str]) -> np.ndarray:
    """Catalog rows of `ids`, unique, in order of first appearance; ids not in the catalog
    (retired items) are dropped: they can be neither ranked nor excluded."""
    rows = item_index.get_indexer(list(ids))
    rows = rows[rows >= 0]
    _, first = np.unique(rows, return_index=True)
    return rows[np.sort(first)].astype(np.int64)


def history_protocols(
    split: Split,
    item_ids: Sequence[str],
    revealed: Sequence[int] = COLD_REVEALED,
    fresh_history: int = FRESH_HISTORY,
) -> dict[str, HistoryProtocol]:
    """The EVAL.md request-time history protocols on `split`, over the catalog `item_ids`.

    On ML-100K: 94 users in each cold_mM (every cold user has more than 10 clicks) and 849 in
    warm_fresh."""
    if fresh_history < 1:
        raise ValueError(f"fresh_history must be >= 1, got {fresh_history}")
    item_index = pd.Index([str(i) for i in item_ids])
    cold = _per_user(_ordered(split.cold))
    protocols: dict[str, HistoryProtocol] = {}
    for m in revealed:
        if m < 1:
            raise ValueError(f"revealed history lengths must be >= 1, got {m}")
        users = [u for u, items in cold.items() if len(items) > m]
        hist = [cold[u][:m] for u in users]
        rev = [_rows(item_index, h) for h in hist]
        protocols[f"cold_m{m}"] = HistoryProtocol(
            name=f"cold_m{m}",
            user_ids=users,
            history=hist,
            fold_in_rows=rev,
            relevant=[_rows(item_index, cold[u][m:]) for u in users],
            exclude=rev,
        )
    train, test = _per_user(_ordered(split.train)), _per_user(_ordered(split.test))
    users = [u for u, items in test.items() if len(items) >= 2]
    hist, seen_rows, rel = [], [], []
    for u in users:
        n_rev = len(test[u]) // 2
        seen = train.get(u, []) + test[u][:n_rev]
        hist.append(seen[-fresh_history:])
        seen_rows.append(_rows(item_index, seen))
        rel.append(_rows(item_index, test[u][n_rev:]))
    # a re-click of a seen item among the relevant ones is excluded, so it counts as a miss (EVAL.md)
    protocols["warm_fresh"] = HistoryProtocol("warm_fresh", users, hist, seen_rows, rel, seen_rows)
    return protocols


def _judge(top: np.ndarray, p: HistoryProtocol, is_tail: np.ndarray, n_items: int) -> dict[str, float]:
    m = ranking_metrics(top, p.relevant, is_tail, n_items)
    return {k: round(v, 4) for k, v in m.items()} | {"users": len(p)}


def evaluate_history(
    user_vectors: UserVectors,
    item_vecs: np.ndarray,
    protocols: dict[str, HistoryProtocol],
    is_tail: np.ndarray,
) -> dict[str, dict[str, float]]:
    """EVAL.md metrics of a model on each protocol: `user_vectors(user ids, histories)` embeds
    the users with their request histories, ranked against `item_vecs` (the catalog in
    `item_ids` order) with the protocol's exclusions. A protocol without users reports {}."""
    out: dict[str, dict[str, float]] = {}
    for name, p in protocols.items():
        if not len(p):
            out[name] = {}
            continue
        vecs = np.asarray(user_vectors(p.user_ids, p.history), dtype=np.float32)
        if vecs.shape[0] != len(p):
            raise ValueError(f"{name}: user_vectors returned {vecs.shape[0]} vectors for {len(p)} users")
        top = topk_excluding(vecs, item_vecs, max(KS), p.exclude)
        out[name] = _judge(top, p, is_tail, len(item_vecs))
    return out


def _train_matrix(split: Split, item_index: pd.Index) -> torch.Tensor:
    """The binary (train users x items) click matrix of the train split, sparse."""
    torch.sparse.check_sparse_tensor_invariants.disable()  # built from np.unique: valid by construction
    rows = item_index.get_indexer(split.train["item_id"].astype(str))
    users = pd.factorize(split.train["user_id"].astype(str))[0]
    keep = rows >= 0
    idx = torch.from_numpy(np.unique(np.stack([users[keep], rows[keep]]), axis=1))
    n_users = int(users.max()) + 1 if len(users) else 0
    return torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), (n_users, len(item_index))).coalesce()


def _folded_in(p: HistoryProtocol, n_items: int) -> torch.Tensor:
    """The users' fold-in rows as a dense 0/1 (users x items) matrix."""
    h = torch.zeros((len(p), n_items))
    for j, r in enumerate(p.fold_in_rows):
        h[j, torch.from_numpy(r)] = 1.0
    return h


def _top_from_scores(scores: torch.Tensor, exclude: Sequence[np.ndarray]) -> np.ndarray:
    """Top max(KS) rows of dense scores with exclusions; ties broken by catalog row (stable)."""
    scores = scores.double().clone()
    for j, ex in enumerate(exclude):
        if len(ex):
            scores[j, torch.from_numpy(ex)] = -torch.inf
    k = min(max(KS), scores.shape[1])
    order = np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(scores.numpy(), order, 1) == -np.inf, -1, order)


def history_anchors(
    split: Split,
    item_ids: Sequence[str],
    protocols: dict[str, HistoryProtocol],
    ease_lambdas: Sequence[float] = EASE_LAMBDAS,
) -> dict[str, dict[str, dict[str, float]]]:
    """{protocol: {anchor: metrics}} for the fold-in anchors of EVAL.md: popularity (train
    clicks), EASE (best λ of `ease_lambdas` on the protocol, reported as `lambda`; skipped above
    EASE_MAX_ITEMS items) and item-kNN (cosine between the train matrix's item columns; a user's
    score of item j is the sum of its similarities to the revealed items)."""
    item_index = pd.Index([str(i) for i in item_ids])
    n_items = len(item_index)
    x = _train_matrix(split, item_index)
    is_tail = ~item_index.isin(list(split.head_items))
    pop = torch.sparse.sum(x, 0).to_dense() if x._nnz() else torch.zeros(n_items)
    # item-kNN: y = x with unit-norm item columns, so y.T @ y is the cosine matrix; a user's
    # scores h @ y.T @ y are computed right to left, never forming the items x items matrix
    idx = x.indices()
    y = torch.sparse_coo_tensor(idx, x.values() / pop[idx[1]].clamp(min=1.0).sqrt(), x.shape).coalesce()
    ease: list[tuple[float, torch.Tensor]] = []  # (λ, B) per λ, shared by every protocol
    if n_items <= EASE_MAX_ITEMS:
        gram = (x.t() @ x.to_dense()).double()
        for lam in ease_lambdas:
            inv = torch.linalg.inv(gram + lam * torch.eye(n_items, dtype=torch.float64))
            b = -inv / torch.diagonal(inv)
            b.fill_diagonal_(0.0)
            ease.append((lam, b))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, p in protocols.items():
        if not len(p):
            out[name] = {}
            continue
        h = _folded_in(p, n_items)
        res = {"popularity": _judge(_top_from_scores(pop.expand(len(p), -1), p.exclude), p, is_tail, n_items)}
        knn = torch.sparse.mm(y.t(), torch.sparse.mm(y, h.T)).T
        res["item_knn"] = _judge(_top_from_scores(knn, p.exclude), p, is_tail, n_items)
        best: dict[str, float] | None = None
        for lam, b in ease:
            m = _judge(_top_from_scores(h.double() @ b, p.exclude), p, is_tail, n_items) | {"lambda": lam}
            if best is None or m["recall@20"] > best["recall@20"]:
                best = m
        if best is not None:
            res["ease"] = best
        out[name] = res
    return out
