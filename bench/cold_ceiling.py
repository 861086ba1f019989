"""How far can a user's features alone go? Feature-conditioned popularity on cold users.

A cold user (EVAL.md rule 1) is known only by their features, so whatever a model serves them
is a function of those features. The simplest such function is *segment popularity*: rank the
items the training users who share the cold user's feature values clicked, each user counting
once, shrunk toward the whole population's ranking when the segment is small:

    score_s(i) = (C_s(i) + beta * p(i)) / (m_s + beta)

with C_s(i) = sum over the m_s training users u in segment s of clicks_u(i) / n_u, and p the
same over every training user divided by their number (`user_popularity`). beta -> infinity is
popularity in which each user counts once; beta = 0 is the segment's own taste. If no such
ranker beats popularity on cold users, the features carry little that a cold-start model could
use, and a cold-start target above that level is a target on noise.

The tool evaluates a grid of segments (each user feature alone and each pair; continuous ones
cut into quintiles of the training users) and betas on the *pseudo-cold* users of the nested
validation split (`bench.common.nested_frames`, the one bench/cold_validation.py trains on:
built from EVAL.md train rows only), picks the best
by pseudo-cold recall@20, and only then evaluates that one ranker, beside the two popularity
references, on the real cold test users. Nothing is chosen on test.

    python -m bench.cold_ceiling --data ML_DIR --out docs/results --buckets 1 3 5 7 9

`--buckets` picks the pseudo-cold folds (default: fold 7 alone, ~70 users on ML-100K); their
users are pooled (five folds: ~420 users), and the chosen ranker's gain over popularity with each
user counted once is also given user by user, with its standard error. Writes `cold_ceiling.md` and `cold_ceiling.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import (
    PSEUDO_COLD_BUCKET,
    cold_ranking_metrics,
    command_line,
    mean_se,
    nested_frames,
    pool,
    user_popularity,
)
from training.artifacts import atomic_write_json, atomic_write_text
from training.dataset import read_dataset
from training.evaluate import group_items
from training.split import Split, split_interactions

BETAS = (5.0, 20.0, 50.0, 200.0)
QUANTILES = 5


def segment_popularity(
    user_codes: np.ndarray, item_codes: np.ndarray, user_segment: np.ndarray, n_items: int, n_segments: int, beta: float
) -> np.ndarray:
    """(n_segments + 1, n_items) scores: row s is segment s's shrunk popularity (module docstring);
    the last row, for users of an unseen or missing segment, is the population's p.

    `user_segment[j]` is the segment (0..n_segments-1, or -1 for none) of click j's user.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if user_segment.shape != user_codes.shape:
        raise ValueError(f"user_segment {user_segment.shape} must match user_codes {user_codes.shape}")
    if len(user_segment) and user_segment.max() >= n_segments:
        raise ValueError(f"segment codes must be < n_segments={n_segments}, got {user_segment.max()}")
    p = user_popularity(user_codes, item_codes, n_items)
    p = p / max(p.sum(), 1e-12)
    # C_s(i) for every segment in one pass: each user's clicks weigh 1/n_u, so a segment's row
    # sums to its number of users m_s
    seen = user_segment >= 0
    _, inverse, counts = np.unique(user_codes, return_inverse=True, return_counts=True)
    c = np.bincount(user_segment[seen] * n_items + item_codes[seen], weights=1.0 / counts[inverse][seen],
                    minlength=n_segments * n_items).reshape(n_segments, n_items)
    m = c.sum(axis=1, keepdims=True)
    out = np.tile(p, (n_segments + 1, 1))
    filled = (m[:, 0] > 0) & (m[:, 0] + beta > 0)
    out[:n_segments][filled] = ((c + beta * p) / (m + beta))[filled]
    return out


def segment_keys(features: pd.DataFrame, columns: Sequence[str], continuous: Sequence[str], edges: dict[str, np.ndarray]) -> pd.Series:
    """One string key per user: the values of `columns`, continuous ones as their quantile bin.
    A user missing any of the columns gets no key (NaN)."""
    parts = []
    for c in columns:
        v = features[c]
        if c in continuous:
            x = pd.to_numeric(v, errors="coerce")
            v = pd.Series(np.digitize(x, edges[c]), index=v.index).astype(str).where(x.notna())
        parts.append(v.astype("string").where(v.notna() & (v.astype(str) != "")))
    key = parts[0]
    for p in parts[1:]:
        key = key + "|" + p
    return key


@dataclass(frozen=True)
class Ranker:
    """A feature-conditioned popularity ranker: `columns` define the segment (empty: popularity)."""

    name: str
    columns: tuple[str, ...] = ()
    beta: float = float("inf")
    per_click: bool = False


def evaluate_ranker(ranker: Ranker, split: Split, items: pd.Index, users: pd.DataFrame | None,
                    continuous: Sequence[str]) -> dict:
    """`bench.common.cold_ranking_metrics` of `ranker` fitted on `split.train`: EVAL.md cold-user
    metrics, `users`, `se_recall@20` and `per_user` (user id -> recall@20)."""
    n_items = len(items)
    train = split.train
    u_codes, u_index = pd.factorize(train["user_id"])
    i_codes = items.get_indexer(train["item_id"])
    rows = None  # one ranking for every cold user
    if ranker.per_click:
        scores = np.bincount(i_codes, minlength=n_items)[None, :].astype(float)
    elif not ranker.columns or users is None:
        scores = user_popularity(u_codes, i_codes, n_items)[None, :]
    else:
        feats = users.set_index("user_id")
        train_feats = feats.reindex(u_index)
        edges = {c: np.unique(np.nanquantile(pd.to_numeric(train_feats[c], errors="coerce"), np.linspace(0, 1, QUANTILES + 1)[1:-1]))
                 for c in ranker.columns if c in continuous}
        train_key = segment_keys(train_feats, ranker.columns, continuous, edges)
        codes, names = pd.factorize(train_key)  # NaN keys get -1
        scores = segment_popularity(u_codes, i_codes, codes[u_codes], n_items, len(names), ranker.beta)
        cold_users = list(group_items(split.cold, items))
        cold_key = segment_keys(feats.reindex(cold_users), ranker.columns, continuous, edges)
        rows = names.get_indexer(cold_key.fillna("\0missing"))
        rows = np.where(rows < 0, len(names), rows)
    return cold_ranking_metrics(scores, rows, split, items)


def grid(user_columns: Sequence[str]) -> list[Ranker]:
    """The references, then every single feature and every pair, at every beta."""
    out = [Ranker("popularity, per click", per_click=True), Ranker("popularity, each user once")]
    sets = [(c,) for c in user_columns] + list(itertools.combinations(user_columns, 2))
    for cols, beta in itertools.product(sets, BETAS):
        out.append(Ranker(f"segment {'+'.join(cols)}, beta {beta:g}", tuple(cols), beta))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared dataset directory with users.csv (e.g. ML-100K)")
    ap.add_argument("--out", default="docs/results", help="report directory")
    ap.add_argument("--buckets", nargs="+", type=int, default=[PSEUDO_COLD_BUCKET],
                    help="pseudo-cold folds (0..9) of the nested validation split; their users are pooled")
    args = ap.parse_args(argv)
    if len(set(args.buckets)) != len(args.buckets) or not all(0 <= b <= 9 for b in args.buckets):
        ap.error(f"--buckets must be distinct integers in 0..9, got {args.buckets}")
    t0 = time.time()
    ds = read_dataset(args.data)
    if ds.users is None:
        raise SystemExit(f"{args.data}: no users.csv, so cold users have no features and there is nothing to measure")
    user_schema = ds.schema.to_json().get("user", {}).get("features", {})
    columns = [c for c, spec in user_schema.items() if spec.get("type") in ("categorical", "continuous")]
    continuous = [c for c in columns if user_schema[c]["type"] == "continuous"]
    items = pd.Index(ds.items["item_id"])
    clicked = ds.interactions[ds.interactions["clicked"]]

    rankers = grid(columns)
    per_fold: list[list[dict]] = [[] for _ in rankers]
    splits = {}
    for b in args.buckets:
        nested_inter, nested_users = nested_frames(clicked, ds.users, b)
        val_split = split_interactions(nested_inter.assign(clicked=True))
        splits[b] = val_split.summary()
        for i, r in enumerate(rankers):
            per_fold[i].append(evaluate_ranker(r, val_split, items, nested_users, continuous))
    val_rows = []
    for r, results in zip(rankers, per_fold, strict=True):
        val_rows.append({"ranker": r.name, "columns": list(r.columns), "beta": None if np.isinf(r.beta) else r.beta} | pool(results))
        print(json.dumps(val_rows[-1]), flush=True)
    best_i = max(range(2, len(rankers)), key=lambda i: val_rows[i]["recall@20"])
    chosen = [rankers[0], rankers[1], rankers[best_i]]
    # the chosen segment ranker against popularity with each user once, user by user
    ref = np.concatenate([list(f["per_user"].values()) for f in per_fold[1]])
    diff = np.concatenate([list(f["per_user"].values()) for f in per_fold[best_i]]) - ref
    val_gain = dict(zip(("mean", "se"), (round(v, 4) for v in mean_se(diff)), strict=True))
    test_split = split_interactions(clicked)
    test_rows = [{"ranker": r.name} | pool([evaluate_ranker(r, test_split, items, ds.users, continuous)]) for r in chosen]
    for row in test_rows:
        print("test", json.dumps(row), flush=True)

    cmd = command_line("bench.cold_ceiling", argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "cold_ceiling.json", {
        "command": cmd, "seconds": round(time.time() - t0, 1), "user_features": columns,
        "validation": {"buckets": args.buckets, "splits": splits, "rows": val_rows,
                       "chosen_minus_popularity_each_user_once": val_gain},
        "chosen_on_validation": rankers[best_i].name, "test": {"split": test_split.summary(), "rows": test_rows},
    })
    ref_r20 = val_rows[1]["recall@20"]
    lines = [
        "# Cold users: how far features alone go",
        "",
        "Feature-conditioned popularity (`bench/cold_ceiling.py`): the items that training users",
        "sharing a cold user's feature values clicked, each user counting once, shrunk toward",
        "everyone's popularity by `beta`. Chosen on the pseudo-cold users of the nested validation",
        "split (EVAL.md train rows only); only the chosen ranker and the two popularity references",
        "are then evaluated on the real cold test users.",
        "",
        f"Reproduce: `{cmd}` ({time.time() - t0:.0f} s, no training).",
        "",
        "## Test: cold users (EVAL.md), after the choice",
        "",
        "| ranker | recall@20 | ± SE | recall@100 | ndcg@20 | users |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['ranker']} | {r['recall@20']:.4f} | {r['se_recall@20']:.4f} | {r['recall@100']:.4f} | {r['ndcg@20']:.4f} | {r['users']} |"
              for r in test_rows]
    lines += [
        "",
        "## Validation: pseudo-cold users, the whole grid",
        "",
        f"{val_rows[0]['users']} pseudo-cold users (folds {args.buckets}, pooled). Δ is recall@20 minus popularity with",
        f"each user counted once ({ref_r20:.4f}). The chosen ranker minus that popularity, user by user:",
        f"{val_gain['mean']:+.4f} ± {val_gain['se']:.4f} (standard error of the paired difference).",
        "",
        "| ranker | recall@20 | Δ | recall@100 | ndcg@20 |",
        "|---|---:|---:|---:|---:|",
    ]
    for i, r in sorted(enumerate(val_rows), key=lambda t: -t[1]["recall@20"]):
        mark = " (chosen)" if i == best_i else ""
        lines.append(f"| {r['ranker']}{mark} | {r['recall@20']:.4f} | {r['recall@20'] - ref_r20:+.4f} | {r['recall@100']:.4f} | {r['ndcg@20']:.4f} |")
    atomic_write_text(out / "cold_ceiling.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
