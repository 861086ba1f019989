"""What two or more benchmarks share, in one place: every bench module imports only this one
from `bench/` (tests/bench/test_layout.py enforces it), so no benchmark depends on another.

* machine facts for the reports: `cpu_model`, `loadavg`, `machine_facts`;
* synthetic unit vectors calibrated on trained item embeddings (`make_data`: `bench.index`,
  `bench.bigindex`);
* the reproduce command a report prints: `command_line`;
* the generated block of a markdown report: `BEGIN`/`END` markers, `splice_results`;
* statistics: `mean_se`, `per_user_recall`;
* configs: `merge_overrides` (a variant's or a validation value's overrides onto TrainConfig);
* the nested cold-start validation split (`bench.cold_validation` trains on it,
  `bench.cold_ceiling` ranks on it): `PSEUDO_COLD_BUCKET`, `is_pseudo_cold`, `pseudo_cold_id`,
  `nested_frames`;
* popularity with each user counted once and the cold-user metrics of a ranking
  (`user_popularity`, `cold_ranking_metrics`, `popularity_each_user_once`, `pool`): the
  reference every cold-start figure is compared with.

Benchmarks are run as modules from the repository root, `python -m bench.NAME`, so that
`training`, `indexer`, `service` and `bench` import without editing `sys.path`.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import zlib
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from indexer import faiss_index as fi
from training.evaluate import KS, group_items, ranking_metrics
from training.split import Split, split_interactions

# ---- machine facts and report plumbing ---------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load average, rounded (None where the OS has none): the machine may be
    shared, and a report's timings are read against it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def command_line(module: str, argv: Sequence[str]) -> str:
    """The command that reproduces a run, as a report prints it: `python -m MODULE ARGS`
    (arguments shell-quoted, so it can be pasted back)."""
    return f"python -m {module} " + shlex.join(argv)


BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def splice_results(text: str, block: str) -> str | None:
    """`text` with the part between the results markers replaced by `block` (the prose around
    it is kept), or None when `text` has no BEGIN ... END pair."""
    if BEGIN not in text or END not in text.split(BEGIN, 1)[1]:
        return None
    head, rest = text.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{block}{END}{rest.split(END, 1)[1]}"


# ---- statistics ---------------------------------------------------------------------------------


def mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (per-user values: the spread a different set of users would give)."""
    return float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def per_user_recall(top: np.ndarray, truth: Sequence[np.ndarray], k: int = 20) -> np.ndarray:
    """Recall@k of each ranked list `top[r]` against the relevant items `truth[r]` (EVAL.md's
    per-user recall); a user with an empty truth set is skipped, as EVAL.md skips them."""
    out = []
    for row, rel in zip(top, truth, strict=True):
        rel = np.unique(np.asarray(rel, dtype=np.int64))
        if len(rel):
            out.append(np.isin(rel, row[:k]).sum() / len(rel))
    return np.asarray(out, dtype=np.float64)


# ---- configs ------------------------------------------------------------------------------------


def merge_overrides(base: dict, overrides: dict, where: str = "") -> dict:
    """`base` with `overrides` applied; nested dicts (the `model` sub-config) merge key-wise.

    Unknown keys are left in place for `TrainConfig.from_dict` to reject (it names them); a
    dict in `base` replaced by a non-dict is rejected here, as from_dict would fail obscurely.
    """
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if isinstance(out.get(k), dict):
            if not isinstance(v, dict):
                raise ValueError(f"{where}{k}: expected an object of overrides, got {v!r}")
            out[k] = merge_overrides(out[k], v, f"{where}{k}.")
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---- the nested cold-start validation split -----------------------------------------------------

PSEUDO_COLD_BUCKET = 7


def is_pseudo_cold(user_id: str, bucket: int = PSEUDO_COLD_BUCKET) -> bool:
    """One warm user in ten, chosen by a hash that is independent of EVAL.md's `id % 10`;
    buckets 0..9 are disjoint folds of the warm users."""
    return zlib.crc32(str(user_id).encode()) % 10 == bucket


def pseudo_cold_id(user_id: str) -> str:
    """A fresh id that EVAL.md's rule 1 classifies as cold (an integer ending in 0)."""
    return str(10 * (zlib.crc32(f"pseudo-cold:{user_id}".encode()) + 1))


def nested_frames(
    interactions: pd.DataFrame, users: pd.DataFrame | None, bucket: int = PSEUDO_COLD_BUCKET
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The validation dataset's interactions and users: the EVAL.md train split only, with the
    pseudo-cold users (those of `bucket`) renamed (pure function over frames)."""
    if not 0 <= bucket <= 9:
        raise ValueError(f"bucket must be in 0..9, got {bucket}")
    train = split_interactions(interactions).train
    mapping = {u: pseudo_cold_id(u) for u in pd.unique(train["user_id"]) if is_pseudo_cold(u, bucket)}
    if len(set(mapping.values())) != len(mapping) or set(mapping.values()) & set(train["user_id"]):
        raise ValueError("pseudo-cold ids collide with each other or with existing ids")
    out = train[["user_id", "item_id", "timestamp"] + (["weight"] if "weight" in train else [])].copy()
    out["user_id"] = out["user_id"].map(lambda u: mapping.get(u, u))
    if users is None:
        return out, None
    kept = users[users["user_id"].isin(set(train["user_id"]))].copy()
    kept["user_id"] = kept["user_id"].map(lambda u: mapping.get(u, u))
    return out, kept


# ---- popularity with each user counted once, and cold-user metrics of a ranking -----------------

COLD_KEYS = ("recall@20", "recall@100", "ndcg@20")


def user_popularity(user_codes: np.ndarray, item_codes: np.ndarray, n_items: int) -> np.ndarray:
    """Item scores where each user's clicks weigh 1/(their click count): every user counts once.

    `user_codes[j]`, `item_codes[j]`: user and item (0..n_items-1) of click j. Sums to the
    number of distinct users.
    """
    if user_codes.shape != item_codes.shape or user_codes.ndim != 1:
        raise ValueError(f"user_codes {user_codes.shape} and item_codes {item_codes.shape} must be equal 1-d arrays")
    if len(item_codes) and (item_codes.min() < 0 or item_codes.max() >= n_items):
        raise ValueError(f"item codes must lie in 0..{n_items - 1}, got {item_codes.min()}..{item_codes.max()}")
    _, inverse, counts = np.unique(user_codes, return_inverse=True, return_counts=True)
    return np.bincount(item_codes, weights=1.0 / counts[inverse], minlength=n_items)


def cold_ranking_metrics(scores: np.ndarray, rows: np.ndarray | None, split: Split, items: pd.Index) -> dict:
    """EVAL.md cold-user metrics (every cold click is relevant, nothing excluded) of a ranker
    that scores the catalog with `scores[rows[u]]` for the u-th cold user of `split` (`rows`
    None: row 0 for everyone, a ranker that ignores the user), plus `users`
    (cold users ranked), `se_recall@20` (standard error of the per-user recall@20) and
    `per_user` (user id -> recall@20, for paired comparisons)."""
    n_items = len(items)
    truth = group_items(split.cold, items)
    cold_users = list(truth)
    if rows is None:
        rows = np.zeros(len(cold_users), int)
    top = np.argsort(-scores, axis=1, kind="stable")[:, : max(KS)][rows]
    truths = [truth[u] for u in cold_users]
    metrics = ranking_metrics(top, truths, np.zeros(n_items, bool), n_items)
    recall = per_user_recall(top, truths)
    return {k: metrics[k] for k in COLD_KEYS} | {"se_recall@20": mean_se(recall)[1], "users": len(cold_users),
                                                "per_user": dict(zip(cold_users, recall, strict=True))}


def popularity_each_user_once(split: Split, items: pd.Index) -> dict:
    """`cold_ranking_metrics` of popularity with each training user counted once, fitted on
    `split.train`: the reference a cold-start path has to beat."""
    u_codes, _ = pd.factorize(split.train["user_id"])
    scores = user_popularity(u_codes, items.get_indexer(split.train["item_id"]), len(items))[None, :]
    return cold_ranking_metrics(scores, None, split, items)


def pool(results: list[dict]) -> dict:
    """One ranker's results over several folds (disjoint users) as one: means over all users."""
    n = np.array([r["users"] for r in results])
    recall = np.concatenate([list(r["per_user"].values()) for r in results])
    return {k: round(float(np.average([r[k] for r in results], weights=n)), 4) for k in COLD_KEYS} | {
        "se_recall@20": round(mean_se(recall)[1], 4), "users": int(n.sum())}


def make_data(n: int, n_queries: int, d: int, seed: int, n_clusters: int, spread: float, alpha: float,
              offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Items and held-out queries: a Gaussian mixture with power-law cluster sizes, a common
    offset (trained embeddings are not centred), a decaying spectrum (scale j^-alpha on latent
    dimension j, then a random rotation: trained embeddings have a low intrinsic dimension),
    L2-normalized. See `embedding_stats` and docs/bench/index.md for the calibration."""
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, d + 1, dtype=np.float32) ** -alpha).astype(np.float32)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    mean = np.zeros(d, np.float32)
    mean[0] = offset
    weights = np.arange(1, n_clusters + 1, dtype=np.float64) ** -0.5
    weights /= weights.sum()
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, d), dtype=np.float32)
        for s in range(0, m, 200_000):
            c = min(200_000, m - s)
            lab = rng.choice(n_clusters, size=c, p=weights)
            z = (mean + centers[lab] + spread * rng.standard_normal((c, d), dtype=np.float32)) * scale
            z = z @ rot.T
            out[s : s + c] = z / np.linalg.norm(z, axis=1, keepdims=True)
        return out

    return draw(n), draw(n_queries)


def machine_facts(args: argparse.Namespace) -> dict:
    return {
        "cpu": cpu_model(), "usable_cpus": fi.available_cpus(), "python": platform.python_version(),
        "faiss": faiss.__version__, "numpy": np.__version__, "platform": platform.platform(),
        "loadavg_at_end": loadavg(),
    }
