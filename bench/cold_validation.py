"""Cold-start validation without touching the test split: a nested EVAL.md split.

EVAL.md's validation rows are warm users' own recent clicks, so they say nothing about users the
model has never seen, and the cold test users may not be used for tuning. Serving warm
validation users "features only" is no substitute: their features (a rare zip code, say) were
trained on, so the model partly recognises them.

This tool builds a *validation dataset* from the training data alone:

* every cold user (EVAL.md rule 1) is dropped, and so is every warm user's test rows — only the
  official `train` split remains;
* one warm user in ten (`crc32(id) % 10 == 7`, `bench.common.is_pseudo_cold`) becomes *pseudo-cold*: its id is rewritten to a
  number ending in 0, so the EVAL.md split of the derived dataset treats it as cold — never
  trained on, evaluated by its features over all of its (train-split) clicks.

`trainer fit` on that directory then reports `cold_*` metrics on pseudo-cold users and warm
metrics on the other users' last train rows: both are validation figures, computed from rows the
real protocol uses for training only. The command below trains one model per value of a config
field and writes a markdown + JSON report.

    python -m bench.cold_validation --data ML_DIR --out docs/results \\
        --field cold_logq_weight --values null 2 3 5

One fold has ~70 pseudo-cold users on ML-100K, so its cold recall@20 has a standard error of
about 0.014. `--buckets 1 3 5 7 9` trains one model per fold (five disjoint sets of pseudo-cold
users, 424 in all on ML-100K) and pools their cold metrics; the report also gives popularity with each
training user counted once on the same users, the reference a cold-start path has to beat.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import (
    PSEUDO_COLD_BUCKET,
    command_line,
    mean_se,
    merge_overrides,
    nested_frames,
    per_user_recall,
    pool,
    popularity_each_user_once,
)
from training.artifacts import atomic_write_json, atomic_write_text
from training.bundle import load_bundle
from training.dataset import Dataset, read_dataset
from training.evaluate import group_items, topk_excluding, user_features
from training.model import TwoTowerModel
from training.split import Split, split_interactions
from training.train import TrainConfig, fit

KEYS = ("recall@20", "recall@100", "tail_recall@100", "cold_recall@20", "cold_recall@100", "cold_ndcg@20")


def write_nested_dataset(data_dir: str | Path, out_dir: str | Path, bucket: int = PSEUDO_COLD_BUCKET) -> Path:
    """Write the validation dataset (csv + the original schema) into `out_dir`."""
    ds = read_dataset(data_dir)
    inter, users = nested_frames(ds.interactions[ds.interactions["clicked"]], ds.users, bucket)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inter.to_csv(out / "interactions.csv", index=False)
    ds.items.to_csv(out / "items.csv", index=False)
    if users is not None:
        users.to_csv(out / "users.csv", index=False)
    (out / "schema.json").write_text(json.dumps(ds.schema.to_json(), indent=2), encoding="utf-8")
    return out


def _set(cfg: dict, field: str, value: object) -> dict:
    """`cfg` with dotted `field` (e.g. `model.temperature`) set to `value`."""
    *path, last = field.split(".")
    node = cfg
    for p in path:
        node = node.get(p, {})
    if last not in node:
        raise ValueError(f"unknown config field {field!r}")
    override: dict = {last: value}
    for p in reversed(path):
        override = {p: override}
    return merge_overrides(cfg, override)


def pooled(rows: list[dict], keys: Sequence[str]) -> dict[str, float]:
    """Means over folds: cold metrics weighted by each fold's pseudo-cold users (so the pool is a
    mean over users, as EVAL.md averages), the warm ones plainly."""
    n = [r["cold_users"] for r in rows]
    out = {}
    for k in keys:
        vals = [r[k] for r in rows]
        if any(v is None for v in vals):
            out[k] = None
        elif k.startswith("cold_"):
            out[k] = round(float(np.average(vals, weights=n)), 4)
        else:
            out[k] = round(float(np.mean(vals)), 4)
    return out


def model_cold_recall(model: TwoTowerModel, dataset: Dataset, split: Split, k: int = 20) -> dict[str, float]:
    """Each cold user's recall@k under `model` (their mean is the manifest's cold_recall@k)."""
    items = pd.Index(dataset.items["item_id"])
    truth = group_items(split.cold, items)
    users = list(truth)
    top = topk_excluding(model.embed_user_table(users, user_features(dataset, users)), model.embed_items(dataset.items), k)
    return dict(zip(users, per_user_recall(top, [truth[u] for u in users], k), strict=True))


@dataclass(frozen=True)
class Fold:
    """One pseudo-cold fold: its nested dataset (on disk and read), split and popularity reference."""

    bucket: int
    path: Path
    dataset: Dataset
    split: Split
    reference: dict

    @property
    def cold_users(self) -> int:
        return self.split.summary()["cold_users"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared dataset directory (e.g. ML-100K)")
    ap.add_argument("--out", default="docs/results", help="report directory")
    ap.add_argument("--field", required=True, help="TrainConfig field to vary (dotted for model.*)")
    ap.add_argument("--values", nargs="+", required=True, help="JSON values, e.g. null 2 3.5 true")
    ap.add_argument("--buckets", nargs="+", type=int, default=[PSEUDO_COLD_BUCKET],
                    help="pseudo-cold folds (0..9), one model per fold and value; cold metrics pool their users")
    ap.add_argument("--models", default=None, help="keep the bundles here (default: a temporary directory)")
    args = ap.parse_args(argv)
    values = [json.loads(v) for v in args.values]
    if len(set(args.buckets)) != len(args.buckets) or not all(0 <= b <= 9 for b in args.buckets):
        ap.error(f"--buckets must be distinct integers in 0..9, got {args.buckets}")
    base = TrainConfig().to_dict()
    rows = []
    with tempfile.TemporaryDirectory(prefix="coldval-") as tmp:
        models = Path(args.models) if args.models else Path(tmp) / "models"
        folds = []
        for b in args.buckets:
            nested = write_nested_dataset(args.data, Path(tmp) / f"data-{b}", bucket=b)
            ds = read_dataset(nested)
            split = split_interactions(ds.interactions)
            folds.append(Fold(b, nested, ds, split, popularity_each_user_once(split, pd.Index(ds.items["item_id"]))))
            print(f"fold {b}: {split.summary()}", flush=True)
        for value in values:
            cfg = TrainConfig.from_dict(_set(base, args.field, value))
            per_fold, diffs = [], []
            for f in folds:
                t0 = time.time()
                bundle = load_bundle(fit(f.path, models / f"bucket-{f.bucket}", cfg, progress=False))
                fold = {"bucket": f.bucket, "cold_users": f.cold_users, "seconds": round(time.time() - t0, 1),
                        "bundle": bundle.path.name} | {k: bundle.manifest["metrics"].get(k) for k in KEYS}
                mine = model_cold_recall(bundle.model, f.dataset, f.split)
                diffs += [mine[u] - f.reference["per_user"][u] for u in mine]
                per_fold.append(fold)
                print(json.dumps({"value": value} | fold), flush=True)
            gain = dict(zip(("mean", "se"), (round(v, 4) for v in mean_se(np.array(diffs))), strict=True))
            rows.append({"value": value, "seconds": round(sum(f["seconds"] for f in per_fold), 1)}
                        | pooled(per_fold, KEYS) | {"cold_recall@20_minus_popularity": gain, "folds": per_fold})
    reference = {f"cold_{k}": v for k, v in pool([f.reference for f in folds]).items() if k in ("recall@20", "recall@100", "ndcg@20")}
    n_cold = sum(f.cold_users for f in folds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = command_line("bench.cold_validation", argv if argv is not None else sys.argv[1:])
    stem = f"cold_validation_{args.field}" + ("" if args.buckets == [PSEUDO_COLD_BUCKET] else "_buckets" + "".join(map(str, args.buckets)))
    report = {"command": cmd, "field": args.field, "buckets": args.buckets, "pseudo_cold_users": n_cold,
              "splits": {f.bucket: f.split.summary() for f in folds}, "rows": rows,
              "popularity_each_user_once": reference, "base_config": base}
    atomic_write_json(out / f"{stem}.json", report)
    lines = [
        f"# Cold-start validation: `{args.field}`",
        "",
        "Nested split of the EVAL.md *train* rows only (see `bench/cold_validation.py`): one warm",
        "user in ten is made pseudo-cold (never trained on, served by features); `cold_*` are",
        "their metrics, the others are warm users' last train rows. No test row is used.",
        f"Folds (pseudo-cold buckets): {args.buckets}, one model per fold; cold metrics are means over",
        f"all {n_cold} pseudo-cold users, warm ones means over folds.",
        "",
        f"Reproduce: `{cmd}` (load average {os.getloadavg()[0]:.1f} at the end).",
        f"Split of fold {folds[0].bucket}: {folds[0].split.summary()}.",
        "",
        "Δ pop: cold recall@20 minus that of popularity with each training user counted once, user by",
        "user over the same pseudo-cold users (± its standard error).",
        "",
        "| " + args.field + " | " + " | ".join(KEYS) + " | Δ pop | fit s |",
        "|---" * (len(KEYS) + 3) + "|",
    ]
    for r in rows:
        g = r["cold_recall@20_minus_popularity"]
        lines.append(f"| {json.dumps(r['value'])} | " + " | ".join(f"{r[k]:.4f}" for k in KEYS)
                     + f" | {g['mean']:+.4f} ± {g['se']:.4f} | {r['seconds']} |")
    lines.append("| popularity, each user once | " + " | ".join(f"{reference[k]:.4f}" if k in reference else "" for k in KEYS) + " | | |")
    best = max(rows, key=lambda r: r["cold_recall@20"])
    lines += ["", f"Best pseudo-cold recall@20: `{args.field}` = {json.dumps(best['value'])} ({best['cold_recall@20']:.4f})."]
    atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
