"""ML-100K experiment matrix: train every variant under EVAL.md, write the report.

    trainer prepare movielens-100k --src ../shared/data/ml-100k --out ml
    python -m bench.experiments --data ml                       # whole matrix (~40 min on 2 cores)
    python -m bench.experiments --data ml --only default,ssl_correlated --force   # re-run two
    python -m bench.experiments --data ml --report-only          # rewrite the report from the JSON

What it does (docs/results/ml100k.md has the results and their reading):

1. **Variants are data** (`VARIANTS`): each is a nested dict of overrides merged onto the
   default `TrainConfig` (the `model` sub-dict key-wise), so the matrix never hard-codes the
   trainer's field list and follows the default as it gets tuned. `--variants-file` adds or
   replaces variants, `--only` runs a subset, `--base-config` changes the base for all of them.
2. **Each variant** is trained in-process with `training.train.fit` (early stopping on the EVAL.md
   validation split) into a temporary models dir; its bundle manifest gives the test metrics
   (warm and `cold_*`), the wall time and the per-epoch validation history. On top of that the
   driver computes recall@100 by item-popularity decile on the warm test users and the
   validation recall@20 of warm users served features-only (a cold-start proxy that, unlike
   the cold test users, may be tuned on).
3. **Results are cached** in `OUT/ml100k.json` (written atomically after every variant) under
   the sha256 of the fully resolved config and the data fingerprint: a rerun trains only what
   is new or changed (`--force` re-trains), so the matrix can be resumed, and two variants that
   resolve to the same config (e.g. one equal to a newly tuned default) train once.
4. **Tuning uses validation only**: within each family the variant with the best validation
   recall@20 (the default included as the reference) is the family's choice, and the overall
   best on validation is what the default config should become. Test numbers are reported,
   never used to choose.
5. **Report** `OUT/ml100k.md` (only the block between the results markers is rewritten, so hand
   prose around it survives), `OUT/ml100k_deciles.png`: the table next to the EVAL.md
   baselines, the targets judged on the `default` variant (by how much a missed one is missed,
   and the best any variant reached), and whether logQ and SSL help tail items, with numbers.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench.common import (
    BEGIN,
    END,
    command_line,
    cpu_model,
    loadavg,
    merge_overrides,
    per_user_recall,
    splice_results,
)
from training.artifacts import atomic_write_json, atomic_write_text, read_json
from training.bundle import load_bundle
from training.dataset import Dataset, read_dataset
from training.evaluate import evaluate_model, group_items, topk_excluding, user_features
from training.split import Split, split_interactions
from training.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]

FORMAT = "twotower-experiments/1"
STEM = "ml100k"
K_DECILE = 100
N_DECILES = 10
REPRODUCE = (
    "trainer prepare movielens-100k --src ../shared/data/ml-100k --out ml\n"
    "python -m bench.experiments --data ml --out docs/results"
)


# ---- the matrix ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One cell of the matrix: overrides merged onto the base config (`model` merged key-wise)."""

    name: str
    family: str
    overrides: dict = field(default_factory=dict)
    note: str = ""


# Sampled objectives run the item tower on N x (1 + K) rows per step, so K sets their cost;
# 20 keeps a listwise variant at a few minutes on 2 cores while giving the sampled softmax
# enough negatives (the in-batch softmax sees ~1000).
NEG = 20
SSL_WEIGHT = 0.3
LISTWISE = {"objective": "listwise", "negative_sampler": "popularity", "num_negatives": NEG}
SSL_CORR = {"ssl_weight": SSL_WEIGHT, "ssl_augmentation": "correlated"}

VARIANTS: list[Variant] = [
    # Ordered cheap-first (in-batch softmax), so a cut-short run still covers most families.
    Variant("default", "default", {}, "TrainConfig() as it is now"),
    # the user-id parametrization and the logQ weight of id-dropped (features-only) rows
    Variant("no_history", "history", {"user_history": False, "cold_logq_weight": None},
            "free user id embedding only, one logQ weight (the previous default)"),
    Variant("history_free_id", "history", {"history_free_id": True}, "pooled history + a free per-user embedding"),
    # the request-time history input (issue 18): encoder, length, the new-user path
    Variant("history_mean", "history", {"history_encoder": "mean"}, "mean pooling of the recent clicks (default: recency weights)"),
    Variant("history_len_20", "history", {"history_max_len": 20}, "pool the 20 most recent clicks"),
    Variant("history_no_cold_prefix", "history", {"history_cold_max_len": 0}, "id-dropped rows pool no history (features only)"),
    Variant("no_cold_logq", "cold", {"cold_logq_weight": None}, "id-dropped rows use the same logQ weight (1.0)"),
    Variant("cold_logq_2", "cold", {"cold_logq_weight": 2.0}, "id-dropped rows: logQ weight 2"),
    Variant("cold_logq_5", "cold", {"cold_logq_weight": 5.0}, "id-dropped rows: logQ weight 5"),
    Variant("no_ema", "ema", {"ema_decay": 0.0}, "live weights instead of their moving average (the previous default)"),
    Variant("no_cold_calibration", "cold", {"cold_calibration_steps": 0}, "OOV id row as training left it (no per-user refit)"),
    # recency weighting of each user's clicks, and the refit on fit + val after early stopping
    Variant("no_recency", "recency", {"recency_boost": 0.0}, "all of a user's clicks weigh the same"),
    Variant("recency_3", "recency", {"recency_boost": 3.0}, "newest click weighs 4x the oldest (before mean-1 scaling)"),
    Variant("recency_30", "recency", {"recency_boost": 30.0}, "newest click weighs 31x the oldest"),
    Variant("no_refit", "recency", {"refit": False}, "keep the early-stopped model trained on the fit split only"),
    Variant("no_recency_no_refit", "recency", {"recency_boost": 0.0, "refit": False}, "both off (the previous default)"),
    # logQ on/off
    Variant("no_logq", "logq", {"logq": False}, "in-batch softmax without the logQ correction"),
    # self-supervised item tower
    Variant("ssl_random", "ssl", {"ssl_weight": SSL_WEIGHT, "ssl_augmentation": "random"}, f"alpha {SSL_WEIGHT}, random feature masking"),
    Variant("ssl_multi_dropout", "ssl", {"ssl_weight": SSL_WEIGHT, "ssl_augmentation": "multi_dropout"},
            f"alpha {SSL_WEIGHT}, multi-value token dropout"),
    Variant("ssl_complementary", "ssl", {"ssl_weight": SSL_WEIGHT, "ssl_augmentation": "complementary"},
            f"alpha {SSL_WEIGHT}, complementary masking"),
    Variant("ssl_correlated", "ssl", SSL_CORR, f"alpha {SSL_WEIGHT}, correlated feature masking"),
    Variant("no_logq_ssl_correlated", "ssl", SSL_CORR | {"logq": False}, "no logQ + SSL (the 2x2 with default / no_logq)"),
    # temperature (ModelConfig.temperature, 0.05 by default)
    Variant("temperature_0.05", "temperature", {"model": {"temperature": 0.05}}, "softer softmax (the default before 0.03)"),
    Variant("temperature_0.1", "temperature", {"model": {"temperature": 0.1}}, "softer softmax"),
    # objectives (sampled ones with popularity negatives, so the loss is what differs)
    Variant("pointwise", "objective", {"objective": "pointwise", "negative_sampler": "popularity", "num_negatives": 3},
            "BCE, 1:3 positives to popularity negatives"),
    Variant("triplet_hinge", "objective", {"objective": "triplet_hinge", "negative_sampler": "popularity", "num_negatives": NEG},
            f"margin hinge, {NEG} popularity negatives"),
    Variant("triplet_logistic", "objective", {"objective": "triplet_logistic", "negative_sampler": "popularity", "num_negatives": NEG},
            f"smooth hinge, {NEG} popularity negatives"),
    Variant("listwise", "objective", LISTWISE, f"sampled softmax, {NEG} popularity negatives, logQ"),
    # negative samplers, with the listwise objective
    Variant("listwise_popularity", "sampler", LISTWISE, "clicks^0.75 (same config as `listwise`)"),
    Variant("listwise_uniform", "sampler", LISTWISE | {"negative_sampler": "uniform"}, "uniform over the catalog"),
    Variant("listwise_in_batch", "sampler", LISTWISE | {"negative_sampler": "in_batch"}, "other rows' positives"),
    Variant("listwise_hard", "sampler", LISTWISE | {"negative_sampler": "hard"}, "model ranks 20-100, mined per epoch"),
    Variant("listwise_mixture", "sampler", LISTWISE | {"negative_sampler": "mixture", "mixture_hard_fraction": 0.5},
            "50% hard / 50% popularity"),
    Variant("no_mixed_negatives", "sampler", {"mixed_negatives": 0},
            "in-batch negatives only, no uniform catalog negatives (MNS off; the previous default)"),
    Variant("listwise_no_logq", "logq", LISTWISE | {"logq": False}, "listwise (popularity) without logQ"),
]

# The 2x2 of the tail-items section: (label, variant). Cells are labelled from the configs.
TAIL_PANEL = ("default", "no_logq", "ssl_correlated", "no_logq_ssl_correlated")

# EVAL.md's reference baselines (grid-searched on test, so optimistic). None: cannot serve.
BASELINES: list[dict[str, Any]] = [
    {"model": "popularity", "recall@20": 0.0986, "recall@100": 0.3217, "ndcg@20": 0.1206,
     "tail_recall@100": 0.0051, "coverage@20": 0.070, "cold_recall@20": 0.1375},
    {"model": "BPR (implicit, 32 factors)", "recall@20": 0.1462, "recall@100": 0.4090, "ndcg@20": 0.1523,
     "tail_recall@100": 0.3817, "coverage@20": 0.716, "cold_recall@20": None},
    {"model": "ALS (implicit, 64 factors)", "recall@20": 0.1922, "recall@100": 0.5030, "ndcg@20": 0.1986,
     "tail_recall@100": 0.3676, "coverage@20": 0.429, "cold_recall@20": None},
    {"model": "EASE (λ=200)", "recall@20": 0.1949, "recall@100": 0.5186, "ndcg@20": 0.2103,
     "tail_recall@100": 0.3487, "coverage@20": 0.333, "cold_recall@20": None},
    {"model": "LibRecommender TwoTower (softmax + logQ, best of 9)", "recall@20": 0.1271, "recall@100": 0.3831,
     "ndcg@20": 0.1426, "tail_recall@100": 0.1389, "coverage@20": 0.195, "cold_recall@20": 0.0945},
]
# EVAL.md's "cold users: popularity" row: every metric over the cold users.
COLD_POPULARITY = {"recall@20": 0.1375, "recall@100": 0.3780, "ndcg@20": 0.4918, "tail_recall@100": 0.0, "coverage@20": 0.012}


@dataclass(frozen=True)
class Target:
    key: str      # a test metric, or "train_seconds"
    value: float
    op: str       # ">=" or "<"

    def met(self, x: float) -> bool:
        return x >= self.value if self.op == ">=" else x < self.value


TARGETS = (
    Target("recall@20", 0.200, ">="),
    Target("tail_recall@100", 0.40, ">="),
    Target("cold_recall@20", 0.15, ">="),
    Target("train_seconds", 120.0, "<"),
    # issue 18: EVAL.md "Request-time history" (training/history_eval.py)
    Target("cold_m1_recall@20", 0.15, ">="),
    Target("cold_m5_recall@20", 0.19, ">="),
    Target("cold_m10_recall@20", 0.20, ">="),
    Target("warm_fresh_recall@20", 0.22, ">="),
)


# ---- configs ------------------------------------------------------------------------------------


def resolve_config(variant: Variant, base: dict | None = None, epochs: int | None = None) -> TrainConfig:
    """The full TrainConfig of a variant: base (default: TrainConfig()) + overrides [+ epochs]."""
    try:
        merged = TrainConfig().to_dict() if base is None else merge_overrides(TrainConfig().to_dict(), base, "base config: ")
        merged = merge_overrides(merged, variant.overrides)
        if epochs is not None:
            merged["epochs"] = epochs
        return TrainConfig.from_dict(merged)
    except (ValueError, TypeError) as e:
        raise ValueError(f"variant {variant.name!r}: {e}") from None


def config_hash(cfg: TrainConfig) -> str:
    """sha256 of the resolved config: the cache key (with the data fingerprint)."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def load_variants_file(path: str | Path) -> list[Variant]:
    """Variants from JSON: a list of {name, family, overrides, note} (or {name: {...}})."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"variants file {path}: {e}") from None
    if isinstance(obj, dict):
        obj = [{"name": k, **v} for k, v in obj.items()]
    if not isinstance(obj, list):
        raise ValueError(f"variants file {path}: expected a list of variants")
    out = []
    for i, d in enumerate(obj):
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("overrides", {}), dict):
            raise ValueError(f"variants file {path}: entry {i} needs a string 'name' and an object 'overrides'")
        extra = set(d) - {"name", "family", "overrides", "note"}
        if extra:
            raise ValueError(f"variants file {path}: entry {d['name']!r} has unknown key(s) {sorted(extra)}")
        out.append(Variant(d["name"], d.get("family", "custom"), d.get("overrides", {}), d.get("note", "")))
    return out


def combine_variants(base: Sequence[Variant], extra: Sequence[Variant]) -> list[Variant]:
    """`base` with same-named variants replaced in place by `extra`, new ones appended."""
    by_name = {v.name: v for v in extra}
    out = [by_name.pop(v.name, v) for v in base]
    return out + [v for v in extra if v.name in by_name]


def select_variants(variants: Sequence[Variant], only: str | None) -> list[Variant]:
    if not only:
        return list(variants)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {v.name for v in variants}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--only: unknown variant(s) {unknown}; known: {sorted(known)}")
    return [v for v in variants if v.name in names]


# ---- popularity deciles (pure) ------------------------------------------------------------------


def popularity_deciles(train_item_rows: np.ndarray, n_items: int, n_bins: int = N_DECILES) -> np.ndarray:
    """Bin (0 = most popular) of every catalog row: rows ranked by training clicks, ties by row
    order (stable), cut into `n_bins` bins whose sizes differ by at most one item.

    Equal-size bins by item count (not by clicks) keep the tail visible: bin 0 holds the
    blockbusters, the last bins the items the main loss barely sees.
    """
    rows = np.asarray(train_item_rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= n_items):
        raise ValueError(f"item rows must lie in [0, {n_items}); got [{rows.min()}, {rows.max()}]")
    counts = np.bincount(rows, minlength=n_items)
    order = np.argsort(-counts, kind="stable")
    bins = np.empty(n_items, dtype=np.int64)
    bins[order] = np.arange(n_items) * n_bins // max(n_items, 1)
    return bins


def recall_by_decile(
    top: np.ndarray, truth: Sequence[np.ndarray], bins: np.ndarray, k: int = K_DECILE, n_bins: int = N_DECILES
) -> dict[str, list]:
    """Micro-averaged recall@k per popularity bin: hits / test pairs of items in that bin.

    Micro (pairs pooled over users) rather than per-user means, because most users have no test
    item in a given tail bin. Empty bins (no test pair) have recall None, not 0.
    """
    if len(top) != len(truth):
        raise ValueError(f"{len(top)} ranked lists but {len(truth)} truth sets")
    hits = np.zeros(n_bins, dtype=np.int64)
    pairs = np.zeros(n_bins, dtype=np.int64)
    for row, rel in zip(top, truth, strict=True):
        rel = np.unique(np.asarray(rel, dtype=np.int64))
        if not len(rel):
            continue
        b = bins[rel]
        pairs += np.bincount(b, minlength=n_bins)
        hits += np.bincount(b[np.isin(rel, row[:k])], minlength=n_bins)
    return {
        "recall": [round(float(h / p), 4) if p else None for h, p in zip(hits, pairs, strict=True)],
        "hits": hits.tolist(),
        "pairs": pairs.tolist(),
        "items": np.bincount(bins, minlength=n_bins).tolist(),
    }


# ---- per-variant analysis (model + split) -------------------------------------------------------


def analyse_model(model, dataset: Dataset, split: Split, *, seed: int = 0) -> dict[str, Any]:  # noqa: ANN001
    """What the manifest does not hold: recall@100 by popularity decile (warm test users, train
    items excluded as in EVAL.md), the validation recall@20 spread (its standard error says
    which differences between variants are noise) and the features-only validation recall@20."""
    item_index = pd.Index(dataset.items["item_id"])
    item_vecs = model.embed_items(dataset.items)
    empty = np.empty(0, dtype=np.int64)
    out: dict[str, Any] = {}

    bins = popularity_deciles(item_index.get_indexer(split.train["item_id"]), len(item_index))
    truth = group_items(split.test, item_index)
    train_rows = group_items(split.train, item_index)
    users = list(truth)
    if users:
        vecs = model.embed_user_table(users, user_features(dataset, users))
        top = topk_excluding(vecs, item_vecs, K_DECILE, [train_rows.get(u, empty) for u in users])
        dec = recall_by_decile(top, [truth[u] for u in users], bins)
        dec["micro_recall@100"] = round(sum(dec["hits"]) / max(sum(dec["pairs"]), 1), 4)
        out["deciles"] = dec

    val_truth = group_items(split.val, item_index)
    fit_rows = group_items(split.fit, item_index)
    users = list(val_truth)
    if users:
        vecs = model.embed_user_table(users, user_features(dataset, users))
        top = topk_excluding(vecs, item_vecs, 20, [fit_rows.get(u, empty) for u in users])
        r = per_user_recall(top, [val_truth[u] for u in users], 20)
        out["val_recall@20_all_users"] = round(float(r.mean()), 4)
        out["val_recall@20_se"] = round(float(r.std(ddof=1) / math.sqrt(len(r))), 4) if len(r) > 1 else None
        cold = evaluate_model(model, dataset, split, truth_part="val", item_vecs=item_vecs,
                              include_cold=False, features_only=True, seed=seed)
        out["val_features_only_recall@20"] = cold.get("recall@20")
    return out


# ---- machine facts ------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def git_state() -> str | None:
    """Commit (+ "-dirty") of the working tree: training code changes do not change the cache key."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _publish(path: Path) -> None:
    """Reports are meant to be read and committed: 0644, not the 0600 of the atomic temp file."""
    os.chmod(path, 0o644)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---- running the matrix -------------------------------------------------------------------------


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        obj = read_json(path)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} results file")
        obj.setdefault("variants", {})
        return obj
    return {"format": FORMAT, "variants": {}}


def _reusable(entry: dict | None, h: str, fingerprint: str) -> bool:
    return bool(entry) and "error" not in entry and entry.get("config_hash") == h and entry.get("data_fingerprint") == fingerprint


def train_variant(
    variant: Variant, cfg: TrainConfig, data_dir: Path, dataset: Dataset, split: Split, fingerprint: str
) -> dict[str, Any]:
    """Fit one variant into a temporary models dir and collect everything the report needs."""
    load_before = loadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="experiments-") as tmp:
        bundle = load_bundle(fit(data_dir, Path(tmp) / "models", cfg, progress=False))
        wall = time.perf_counter() - t0
        m = bundle.manifest
        history = m.get("history", [])
        best_epoch = m.get("best_epoch")
        best_row = next((r for r in history if r.get("epoch") == best_epoch), {})
        extra = analyse_model(bundle.model, dataset, split, seed=cfg.seed)
    return {
        "name": variant.name,
        "family": variant.family,
        "note": variant.note,
        "overrides": variant.overrides,
        "config": cfg.to_dict(),
        "config_hash": config_hash(cfg),
        "data_fingerprint": fingerprint,
        "metrics": m.get("metrics", {}),
        "train_seconds": m.get("train_seconds"),
        "fit_wall_seconds": round(wall, 2),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "val_recall@20": best_row.get("val_recall@20"),
        "history": history,
        **extra,
        "finished_at": _now(),
        "git": git_state(),
        "machine": {"usable_cpus": machine_facts()["usable_cpus"], "torch_threads": torch.get_num_threads(),
                    "loadavg_before": load_before, "loadavg_after": loadavg()},
    }


def summary_line(e: dict[str, Any]) -> str:
    if "error" in e:
        return f"{e['name']} ({e['family']}): FAILED: {e['error']}"
    m = e.get("metrics", {})

    def f(x: Any) -> str:
        return "—" if x is None else f"{x:.4f}"

    return (f"{e['name']} ({e['family']}): val r@20 {f(e.get('val_recall@20'))} | test r@20 {f(m.get('recall@20'))} "
            f"r@100 {f(m.get('recall@100'))} ndcg@20 {f(m.get('ndcg@20'))} tail r@100 {f(m.get('tail_recall@100'))} "
            f"cov@20 {f(m.get('coverage@20'))} cold r@20 {f(m.get('cold_recall@20'))} | "
            f"{e.get('train_seconds')} s, best epoch {e.get('best_epoch')}/{e.get('epochs_run')}"
            + (f" (same config as {e['same_as']})" if e.get("same_as") else ""))


def run_matrix(
    data_dir: str | Path,
    out_dir: str | Path,
    variants: Sequence[Variant],
    *,
    base: dict | None = None,
    epochs: int | None = None,
    force: bool = False,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every variant not already cached, saving the JSON after each; return the results."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    json_path = out_dir / f"{STEM}.json"
    results = load_results(json_path)  # before any work: a corrupt file fails fast
    resolved = {v.name: resolve_config(v, base, epochs) for v in variants}  # every config checked first
    dataset = read_dataset(data_dir)
    split = split_interactions(dataset.interactions)
    fingerprint = dataset.fingerprint()
    out_dir.mkdir(parents=True, exist_ok=True)
    results["dataset"] = {"path": str(data_dir), "fingerprint": fingerprint, "split": split.summary()}
    if results.get("history_anchors_fingerprint") != fingerprint:  # fold-in anchors: once per dataset
        from training.history_eval import history_anchors, history_protocols

        item_ids = dataset.items["item_id"].astype(str).tolist()
        results["history_anchors"] = history_anchors(split, item_ids, history_protocols(split, item_ids))
        results["history_anchors_fingerprint"] = fingerprint
    run = {"command": command, "started_at": _now(), "base_config": base, "epochs_override": epochs,
           "machine": machine_facts(), "loadavg_before": loadavg(), "variants": [v.name for v in variants],
           "trained": [], "cached": []}
    results["last_run"] = run
    entries: dict[str, dict] = results["variants"]
    fresh: dict[str, str] = {}  # config hash -> variant trained in this run
    for i, v in enumerate(variants, 1):
        cfg = resolved[v.name]
        h = config_hash(cfg)
        src = None
        if h in fresh:
            src = fresh[h]
        elif not force:
            if _reusable(entries.get(v.name), h, fingerprint):
                src = v.name
            else:
                src = next((n for n, e in entries.items() if _reusable(e, h, fingerprint)), None)
        if src is not None:
            e = copy.deepcopy(entries[src])
            if src != v.name:  # an identical config under another name: its numbers are ours
                e["same_as"] = e.get("same_as") or src
            e |= {"name": v.name, "family": v.family, "note": v.note, "overrides": v.overrides,
                  "epochs_override": epochs, "base_config": base}
            entries[v.name] = e
            run["cached"].append(v.name)
            log(f"[{i}/{len(variants)}] cached: {summary_line(e)}")
        else:
            log(f"[{i}/{len(variants)}] {v.name} ({v.family}): training {json.dumps(v.overrides) or '{}'}")
            try:
                e = train_variant(v, cfg, data_dir, dataset, split, fingerprint)
            except Exception as ex:  # one broken variant must not cost the rest of a 40-minute matrix
                e = {"name": v.name, "family": v.family, "note": v.note, "overrides": v.overrides, "config": cfg.to_dict(),
                     "config_hash": h, "data_fingerprint": fingerprint, "error": f"{type(ex).__name__}: {ex}",
                     "finished_at": _now()}
            e |= {"epochs_override": epochs, "base_config": base}
            entries[v.name] = e
            if "error" not in e:
                fresh[h] = v.name
            run["trained"].append(v.name)
            log(f"[{i}/{len(variants)}] {summary_line(e)}")
        atomic_write_json(json_path, results)
        _publish(json_path)
    run["finished_at"] = _now()
    run["loadavg_after"] = loadavg()
    atomic_write_json(json_path, results)
    _publish(json_path)
    return results


# ---- analysis of the results --------------------------------------------------------------------


def ordered_entries(results: dict, variants: Sequence[Variant]) -> list[dict]:
    """Entries in matrix order, then any others the JSON holds (removed or custom variants)."""
    entries = results.get("variants", {})
    names = [v.name for v in variants if v.name in entries]
    return [entries[n] for n in names] + [e for n, e in entries.items() if n not in names]


def _val(e: dict) -> float:
    x = e.get("val_recall@20")
    return -math.inf if x is None or "error" in e else float(x)


def family_choices(entries: Sequence[dict]) -> dict[str, str]:
    """Per family, the variant with the best validation recall@20; `default` competes in every
    family as the reference, and wins ties (no change without evidence). Test is never read."""
    default = next((e for e in entries if e["name"] == "default"), None)
    out = {}
    for fam in dict.fromkeys(e["family"] for e in entries if e["family"] != "default"):
        cands = ([default] if default else []) + [e for e in entries if e["family"] == fam]
        best = max(cands, key=_val)  # max keeps the first of equal values
        if _val(best) > -math.inf:
            out[fam] = best["name"]
    return out


def best_on_validation(entries: Sequence[dict]) -> dict | None:
    ok = [e for e in entries if _val(e) > -math.inf]
    ok.sort(key=lambda e: e["name"] != "default")  # default first: it wins ties
    return max(ok, key=_val) if ok else None


def figure_of(e: dict, key: str) -> float | None:
    if key == "train_seconds":
        return e.get("train_seconds")
    return e.get("metrics", {}).get(key)


def judge_targets(e: dict) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        x = figure_of(e, t.key)
        row = {"metric": t.key, "target": t.value, "op": t.op, "value": x}
        if x is not None:
            row |= {"met": t.met(x), "gap": round(x - t.value, 4), "gap_rel": round((x - t.value) / t.value, 4)}
        out.append(row)
    return out


def best_reached(entries: Sequence[dict], t: Target) -> dict | None:
    """The variant with the best test value of a target's metric: for the record, never a choice."""
    ok = [e for e in entries if "error" not in e and figure_of(e, t.key) is not None]
    if not ok:
        return None
    sign = 1 if t.op == ">=" else -1
    return max(ok, key=lambda e: sign * figure_of(e, t.key))


def panel_cells(entries_by_name: dict[str, dict]) -> list[dict]:
    """The logQ x SSL panel: the TAIL_PANEL variants present, labelled from their configs."""
    out = []
    for name in TAIL_PANEL:
        e = entries_by_name.get(name)
        if e is None or "error" in e or "deciles" not in e:
            continue
        cfg = e.get("config", {})
        logq = bool(cfg.get("logq", True))
        ssl = float(cfg.get("ssl_weight", 0.0) or 0.0)
        label = f"logQ {'on' if logq else 'off'}, " + (f"SSL {cfg.get('ssl_augmentation')} α={ssl:g}" if ssl > 0 else "no SSL")
        out.append({"name": name, "logq": logq, "ssl": ssl > 0, "label": label, "entry": e})
    return out


NEGLIGIBLE = 0.005  # a tail_recall@100 difference smaller than this is reported as no change


def tail_half_recall(dec: dict) -> float | None:
    """Micro recall@100 over the less popular half of the deciles (6-10)."""
    h = sum(dec["hits"][N_DECILES // 2 :])
    p = sum(dec["pairs"][N_DECILES // 2 :])
    return h / p if p else None


def effects(cells: Sequence[dict]) -> list[str]:
    """Plain sentences: what switching logQ / SSL does to tail items, for each pair of cells
    that differs in exactly that factor."""
    by = {(c["logq"], c["ssl"]): c for c in cells}
    lines = []

    def pair(a: dict, b: dict, what: str) -> str:
        ea, eb = a["entry"], b["entry"]
        ta, tb = ea["metrics"].get("tail_recall@100"), eb["metrics"].get("tail_recall@100")
        ha, hb = tail_half_recall(ea["deciles"]), tail_half_recall(eb["deciles"])
        ra, rb = ea["metrics"].get("recall@20"), eb["metrics"].get("recall@20")
        d = (ta or 0.0) - (tb or 0.0)
        verdict = "barely changes" if abs(d) < NEGLIGIBLE else "helps" if d > 0 else "hurts"
        return (f"- {what} {verdict} tail items: tail_recall@100 {_f(ta)} (`{a['name']}`) vs {_f(tb)} (`{b['name']}`), "
                f"{_signed(ta, tb)}; recall@100 on deciles 6-10 {_f(ha)} vs {_f(hb)} ({_signed(ha, hb)}); "
                f"overall recall@20 {_f(ra)} vs {_f(rb)} ({_signed(ra, rb)}).")

    for ssl in (False, True):
        if (True, ssl) in by and (False, ssl) in by:
            lines.append(pair(by[(True, ssl)], by[(False, ssl)], f"logQ ({'with' if ssl else 'without'} SSL)"))
    for logq in (True, False):
        if (logq, True) in by and (logq, False) in by:
            lines.append(pair(by[(logq, True)], by[(logq, False)], f"SSL (logQ {'on' if logq else 'off'})"))
    return lines


# ---- report -------------------------------------------------------------------------------------


def _f(x: Any, nd: int = 4) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _signed(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a - b:+.4f}"


def config_diff(cfg: dict, ref: dict) -> dict:
    """The keys of `cfg` whose values differ from `ref` (nested dicts compared key-wise)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and isinstance(ref.get(k), dict):
            sub = config_diff(v, ref[k])
            if sub:
                out[k] = sub
        elif k not in ref or ref[k] != v:
            out[k] = v
    return out


def stale_names(entries: Sequence[dict], variants: Sequence[Variant]) -> set[str]:
    """Entries whose stored config no longer matches what their variant resolves to now, with
    the base config and epoch cap they ran with (the default or the variant changed since):
    their numbers describe an old config."""
    by = {v.name: v for v in variants}
    out = set()
    for e in entries:
        v = by.get(e["name"])
        if v is None:
            continue
        try:
            if config_hash(resolve_config(v, e.get("base_config"), e.get("epochs_override"))) != e.get("config_hash"):
                out.add(e["name"])
        except ValueError:
            out.add(e["name"])
    return out


def render_markdown(results: dict, variants: Sequence[Variant], png_name: str | None) -> str:
    """The generated block of OUT/ml100k.md (between the results markers)."""
    entries = ordered_entries(results, variants)
    by_name = {e["name"]: e for e in entries}
    known = {v.name for v in variants}
    stale = stale_names(entries, variants)
    run = results.get("last_run", {})
    mach = run.get("machine", {})
    ds = results.get("dataset", {})
    choices = family_choices(entries)
    chosen = set(choices.values())
    best = best_on_validation(entries)
    L: list[str] = ["<!-- generated by bench/experiments.py from ml100k.json: do not edit between the results markers -->", ""]

    L += ["Reproduce (a rerun trains only variants whose resolved config or data changed; `--force` redoes them):",
          "", "```", REPRODUCE, "```", ""]
    if run.get("command"):
        L += [f"Last run: `{run['command']}` ({run.get('started_at')} → {run.get('finished_at', 'unfinished')}; "
              f"trained {len(run.get('trained', []))}, reused {len(run.get('cached', []))} cached)."]
    if run.get("epochs_override"):
        L += [f"**Quick run: every variant capped at {run['epochs_override']} epoch(s)**; not comparable with full runs."]
    if run.get("base_config"):
        diff = config_diff(merge_overrides(TrainConfig().to_dict(), run["base_config"]), TrainConfig().to_dict())
        L += [f"Base config under every variant (`--base-config`, as changes to `TrainConfig()`): "
              f"`{json.dumps(diff, sort_keys=True)}`."]
    if mach:
        L += ["", f"Machine: {mach.get('cpu_model')}, {mach.get('usable_cpus')} usable CPUs, torch threads "
              f"{mach.get('torch_threads')}, CUDA {'yes' if mach.get('cuda') else 'no'}; Python {mach.get('python')}, "
              f"torch {mach.get('torch')}. Load average (1/5/15 min) {run.get('loadavg_before')} before, "
              f"{run.get('loadavg_after')} after; per-variant 1-min load at its start is in the table. "
              "Wall times on a shared machine move with its load."]
    if ds:
        L += ["", f"Data: `{ds.get('path')}` (fingerprint `{str(ds.get('fingerprint'))[:12]}`), EVAL.md split "
              f"{json.dumps(ds.get('split', {}))}."]

    L += ["", "### Variants (choices made on validation only)", "",
          "Each variant is the default config plus the overrides shown (`TrainConfig` fields; `model.*` is "
          "`ModelConfig`). Test metrics follow EVAL.md (warm test users; cold = held-out cold users, "
          "features only). **val r@20** (best epoch, early stopping) is the only number used to choose: "
          "**bold** = its family's choice (the default competes in every family), ★ = best on validation "
          "overall. val fo r@20 = validation recall@20 of warm users served features-only (cold-start "
          "proxy; not used for the choice). train s = `fit` wall time (data, training with per-epoch "
          "validation; not the final test evaluation).", ""]
    ses = [e.get("val_recall@20_se") for e in entries if e.get("val_recall@20_se")]
    if ses:
        L += [f"Validation noise: the standard error of val recall@20 over users is ≈ {np.median(ses):.4f}, so "
              f"differences below ≈ {2 * np.median(ses):.3f} between variants are not evidence.", ""]
    L += ["| variant | family | overrides | val r@20 | val fo r@20 | recall@20 | recall@100 | ndcg@20 | tail_recall@100 "
          "| coverage@20 | cold recall@20 | train s | best epoch | load |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    footnotes = set()
    for e in entries:
        name = f"`{e['name']}`"
        if e["name"] in chosen:
            name = f"**{name}**"
        if best is not None and e["name"] == best["name"]:
            name += " ★"
        if e["name"] in stale:
            name += " †"
            footnotes.add("† config changed since this result was computed (e.g. the default moved): rerun it.")
        if e["name"] not in known:
            name += " ‡"
            footnotes.add("‡ not in the current variant list (kept from an earlier run).")
        if e.get("same_as"):
            name += f" (= `{e['same_as']}`)"
        ov = f"`{json.dumps(e.get('overrides', {}), sort_keys=True)}`" if e.get("overrides") else "—"
        if "error" in e:
            L.append(f"| {name} | {e['family']} | {ov} | failed: {e['error']} |" + " |" * 10)
            continue
        m = e.get("metrics", {})
        load = (e.get("machine") or {}).get("loadavg_before")
        L.append(f"| {name} | {e['family']} | {ov} | {_f(e.get('val_recall@20'))} | {_f(e.get('val_features_only_recall@20'))} "
                 f"| {_f(m.get('recall@20'))} | {_f(m.get('recall@100'))} | {_f(m.get('ndcg@20'))} "
                 f"| {_f(m.get('tail_recall@100'))} | {_f(m.get('coverage@20'), 3)} | {_f(m.get('cold_recall@20'))} "
                 f"| {_f(e.get('train_seconds'), 1)} | {e.get('best_epoch')}/{e.get('epochs_run')} "
                 f"| {load[0] if load else '—'} |")
    L += [""] + sorted(footnotes) + ([""] if footnotes else [])

    L += ["Family choices (validation recall@20): " + (", ".join(f"{f} → `{n}`" for f, n in choices.items()) or "—") + "."]
    if best is not None:
        if best["name"] == "default":
            L += ["", "Best on validation overall: `default` itself, so the default config stays as it is."]
        else:
            L += ["", f"Best on validation overall: `{best['name']}` (val recall@20 {_f(best.get('val_recall@20'))} vs "
                  f"{_f(by_name.get('default', {}).get('val_recall@20'))} for `default`). To make it the default, set "
                  f"these `TrainConfig` fields: `{json.dumps(best.get('overrides', {}), sort_keys=True)}`."]

    L += ["", "### EVAL.md baselines (grid-searched on test, so optimistic)", "",
          "| model | recall@20 | recall@100 | ndcg@20 | tail_recall@100 | coverage@20 | cold recall@20 |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for b in BASELINES:
        L.append(f"| {b['model']} | {_f(b['recall@20'])} | {_f(b['recall@100'])} | {_f(b['ndcg@20'])} "
                 f"| {_f(b['tail_recall@100'])} | {_f(b['coverage@20'], 3)} | {_f(b['cold_recall@20'])} |")
    c = COLD_POPULARITY
    L += [f"| cold users: popularity (every column over cold users) | {_f(c['recall@20'])} | {_f(c['recall@100'])} "
          f"| {_f(c['ndcg@20'])} | {_f(c['tail_recall@100'])} | {_f(c['coverage@20'], 3)} | {_f(c['recall@20'])} |"]
    d = by_name.get("default")
    if d and "error" not in d:
        m = d["metrics"]
        L += [f"| **twotower `default`** | **{_f(m.get('recall@20'))}** | **{_f(m.get('recall@100'))}** | "
              f"**{_f(m.get('ndcg@20'))}** | **{_f(m.get('tail_recall@100'))}** | **{_f(m.get('coverage@20'), 3)}** | "
              f"**{_f(m.get('cold_recall@20'))}** |"]

    L += history_section(d, results.get("history_anchors") or {})
    L += ["", "### Targets (the `default` variant on test)", ""]
    if not d or "error" in d:
        L += ["The `default` variant has no result yet."]
    else:
        cpus = (d.get("machine") or {}).get("usable_cpus")
        L += ["| metric | value | target | met | by how much | best any variant reached (test; not a choice) |",
              "|---|---:|---:|---|---:|---|"]
        for t, row in zip(TARGETS, judge_targets(d), strict=True):
            br = best_reached(entries, t)
            bv = f"{_f(figure_of(br, t.key), 1 if t.key == 'train_seconds' else 4)} (`{br['name']}`)" if br else "—"
            if row["value"] is None:
                L.append(f"| {t.key} | — | {t.op} {t.value:g} | — | — | {bv} |")
                continue
            status = "met" if row["met"] else "**missed**"
            nd = 1 if t.key == "train_seconds" else 4
            L.append(f"| {t.key} | {_f(row['value'], nd)} | {t.op} {t.value:g} | {status} | {row['gap']:+.{nd}f} "
                     f"({row['gap_rel']:+.1%}) | {bv} |")
        if cpus is not None and cpus != 2:
            L += ["", f"The time target is for 2 cores; this was measured with {cpus} usable CPUs."]
        missed = [r for r in judge_targets(d) if r.get("met") is False]
        if missed:
            fams = sorted({e["family"] for e in entries if e["family"] != "default"})
            L += ["", f"Missed: {', '.join(r['metric'] for r in missed)}. Tried: {len(entries) - 1} variants beyond "
                  f"`default` ({', '.join(fams)}; the table above), every choice on validation. The last column shows "
                  "whether any variant reaches a target on test at all; picking it there would be tuning on test."]

    L += ["", "### logQ and SSL on tail items", ""]
    cells = panel_cells(by_name)
    if not cells:
        L += [f"None of {', '.join(f'`{n}`' for n in TAIL_PANEL)} has decile results yet."]
    else:
        ref = cells[0]["entry"]["deciles"]
        L += [f"Recall@{K_DECILE} of warm test users by item-popularity decile (catalog items ranked by training "
              "clicks, 10 equal-size deciles, 1 = most popular; micro-averaged: hits / test pairs in the decile; "
              "train items excluded as in EVAL.md).", ""]
        L += ["| decile | items | test pairs | " + " | ".join(f"`{c['name']}` ({c['label']})" for c in cells) + " |",
              "|---|---:|---:|" + "---:|" * len(cells)]
        for i in range(N_DECILES):
            L.append(f"| {i + 1} | {ref['items'][i]} | {ref['pairs'][i]} | "
                     + " | ".join(_f(c["entry"]["deciles"]["recall"][i]) for c in cells) + " |")
        L.append("| deciles 6-10 | | | " + " | ".join(_f(tail_half_recall(c["entry"]["deciles"])) for c in cells) + " |")
        L.append("| all (micro) | | | " + " | ".join(_f(c["entry"]["deciles"].get("micro_recall@100")) for c in cells) + " |")
        L.append("| **tail_recall@100** (EVAL.md) | | | " + " | ".join(f"**{_f(c['entry']['metrics'].get('tail_recall@100'))}**" for c in cells) + " |")
        L.append("| recall@20 | | | " + " | ".join(_f(c["entry"]["metrics"].get("recall@20")) for c in cells) + " |")
        L.append("| cold recall@20 | | | " + " | ".join(_f(c["entry"]["metrics"].get("cold_recall@20")) for c in cells) + " |")
        L += [""] + (effects(cells) or ["No pair of these variants differs in exactly one of logQ / SSL."])
        missing = [n for n in TAIL_PANEL if n not in {c["name"] for c in cells}]
        if missing:
            L += ["", f"Not available: {', '.join(f'`{n}`' for n in missing)}."]
        if png_name:
            L += ["", f"![recall@100 by item-popularity decile]({png_name})"]
    return "\n".join(L) + "\n"


def history_section(d: dict | None, anchors: dict) -> list[str]:
    """EVAL.md "Request-time history": the `default` variant's figures per protocol next to the
    fold-in anchors (training/history_eval.py; EASE's λ grid-searched on the protocol itself)."""
    from training.history_eval import PROTOCOLS

    L = ["", "### Request-time history (EVAL.md; the `default` variant on test)", "",
         "| protocol | users | recall@20 | ndcg@20 | recall@100 | tail_recall@100 | popularity r@20 | EASE fold-in r@20 "
         "| item-kNN fold-in r@20 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    m = (d or {}).get("metrics", {}) if d and "error" not in d else {}
    for name in PROTOCOLS:
        a = anchors.get(name, {})
        L.append(f"| {name} | {m.get(f'{name}_users', a.get('popularity', {}).get('users', '—'))} "
                 f"| {_f(m.get(f'{name}_recall@20'))} | {_f(m.get(f'{name}_ndcg@20'))} | {_f(m.get(f'{name}_recall@100'))} "
                 f"| {_f(m.get(f'{name}_tail_recall@100'))} | {_f(a.get('popularity', {}).get('recall@20'))} "
                 f"| {_f(a.get('ease', {}).get('recall@20'))} | {_f(a.get('item_knn', {}).get('recall@20'))} |")
    return L


def write_markdown(path: Path, block: str) -> None:
    """Replace the generated block of an existing page, keeping its prose; a page without the
    markers keeps its text and gets the block appended; a new page gets a title and the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = f"{BEGIN}\n{block}{END}"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        out = splice_results(text, block) or text.rstrip("\n") + "\n\n## Results\n\n" + new + "\n"
    else:
        out = ("# Experiment matrix on MovieLens-100K\n\nGenerated by `bench/experiments.py`; prose outside the "
               "results markers is kept across runs.\n\n## Results\n\n" + new + "\n")
    atomic_write_text(path, out)
    _publish(path)


def plot_deciles(results: dict, path: Path) -> bool:
    """recall@100 by popularity decile, one line per TAIL_PANEL variant present; False if none."""
    cells = panel_cells(results.get("variants", {}))
    if not cells:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {(True, False): ("C0", "-"), (False, False): ("C1", "--"), (True, True): ("C2", "-"), (False, True): ("C3", "--")}
    values = []
    for c in cells:
        rec = c["entry"]["deciles"]["recall"]
        xs = [i + 1 for i, r in enumerate(rec) if r is not None]
        ys = [r for r in rec if r is not None]
        values += ys
        color, ls = styles[(c["logq"], c["ssl"])]
        tail = c["entry"]["metrics"].get("tail_recall@100")
        ax.plot(xs, ys, marker="o", color=color, linestyle=ls,
                label=f"{c['name']} ({c['label']}); tail_recall@100 {_f(tail, 3)}")
    pos = [v for v in values if v > 0]
    if pos and len(pos) == len(values) and max(pos) / min(pos) > 8:  # the tail spans decades: log shows it
        ax.set_yscale("log")
    ax.set_xticks(range(1, N_DECILES + 1))
    ax.set_xlabel("item-popularity decile (1 = most clicked in training, 10 = least)")
    ax.set_ylabel(f"recall@{K_DECILE} (micro, warm test users)")
    ax.set_title("ML-100K: recall@100 by item popularity, with and without logQ and SSL")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_report(out_dir: Path, variants: Sequence[Variant], log: Callable[[str], None] = print) -> str:
    """Regenerate OUT/ml100k.md (+ the plot) from OUT/ml100k.json; return the markdown block."""
    results = load_results(out_dir / f"{STEM}.json")
    png = out_dir / f"{STEM}_deciles.png"
    try:
        has_png = plot_deciles(results, png)
    except ImportError:
        log("matplotlib is not installed: no decile plot")
        has_png = False
    block = render_markdown(results, variants, png.name if has_png else None)
    write_markdown(out_dir / f"{STEM}.md", block)
    return block


# ---- CLI ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="prepared dataset dir (trainer prepare movielens-100k ...)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results", help="report dir (ml100k.json/.md/_deciles.png)")
    p.add_argument("--only", help="comma-separated variant names to run (the report still shows every cached one)")
    p.add_argument("--variants-file", type=Path, help="JSON list of {name, family, overrides, note}: adds or replaces variants")
    p.add_argument("--base-config", type=Path, help="JSON overrides applied under every variant (a train.json)")
    p.add_argument("--force", action="store_true", help="re-train selected variants even if cached")
    p.add_argument("--epochs", type=int, help="cap epochs of every variant (quick runs; use another --out)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the JSON, train nothing")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="trainer logs (per-epoch) on stderr")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        variants = combine_variants(VARIANTS, load_variants_file(args.variants_file) if args.variants_file else [])
        base = None
        if args.base_config:
            base = json.loads(args.base_config.read_text(encoding="utf-8"))
            if not isinstance(base, dict):
                raise ValueError(f"--base-config {args.base_config}: top level must be a JSON object")
            try:
                TrainConfig.from_dict(merge_overrides(TrainConfig().to_dict(), base))
            except (ValueError, TypeError) as e:
                raise ValueError(f"--base-config {args.base_config}: {e}") from None
        for v in variants:  # every variant must resolve, whatever --only selects
            resolve_config(v, base, args.epochs)
        if args.list:
            for v in variants:
                log(f"{v.name:28} {v.family:12} {json.dumps(v.overrides, sort_keys=True)}  {v.note}")
            return 0
        selected = select_variants(variants, args.only)
        if args.threads:
            torch.set_num_threads(args.threads)
        if not args.report_only:
            if args.data is None:
                p.error("--data is required unless --report-only")
            command = command_line("bench.experiments", argv if argv is not None else sys.argv[1:])
            t0 = time.perf_counter()
            results = run_matrix(args.data, args.out, selected, base=base, epochs=args.epochs, force=args.force,
                                 command=command, log=log)
            log(f"matrix done in {time.perf_counter() - t0:.0f} s; results in {args.out / (STEM + '.json')}")
            failed = [n for n in (results["last_run"]["trained"]) if "error" in results["variants"][n]]
        else:
            if not (args.out / f"{STEM}.json").is_file():
                raise ValueError(f"{args.out / (STEM + '.json')}: no results to report (run without --report-only first)")
            failed = []
        block = write_report(args.out, variants, log)
    except (ValueError, OSError) as e:
        print(f"bench.experiments: error: {e}", file=sys.stderr)
        return 2
    log(block)
    log(f"wrote {args.out / (STEM + '.md')}")
    if failed:
        print(f"bench.experiments: {len(failed)} variant(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
