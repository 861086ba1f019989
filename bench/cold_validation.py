"""Cold-start validation without touching the test split: a nested EVAL.md split.

EVAL.md's validation rows are warm users' own recent clicks, so they say nothing about users the
model has never seen, and the cold test users may not be used for tuning. Serving warm
validation users "features only" is no substitute: their features (a rare zip code, say) were
trained on, so the model partly recognises them.

This tool builds a *validation dataset* from the training data alone:

* every cold user (EVAL.md rule 1) is dropped, and so is every warm user's test rows — only the
  official `train` split remains;
* one warm user in ten (`crc32(id) % 10 == 7`) becomes *pseudo-cold*: its id is rewritten to a
  number ending in 0, so the EVAL.md split of the derived dataset treats it as cold — never
  trained on, evaluated by its features over all of its (train-split) clicks.

`trainer fit` on that directory then reports `cold_*` metrics on pseudo-cold users and warm
metrics on the other users' last train rows: both are validation figures, computed from rows the
real protocol uses for training only. The command below trains one model per value of a config
field and writes a markdown + JSON report.

    python -m bench.cold_validation --data ML_DIR --out docs/results \\
        --field cold_logq_weight --values null 2 3 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from bench.experiments import merge_overrides
from training.artifacts import atomic_write_json, atomic_write_text
from training.bundle import load_bundle
from training.dataset import read_dataset
from training.split import split_interactions
from training.train import TrainConfig, fit

PSEUDO_COLD_BUCKET = 7
KEYS = ("recall@20", "recall@100", "tail_recall@100", "cold_recall@20", "cold_recall@100", "cold_ndcg@20")


def is_pseudo_cold(user_id: str) -> bool:
    """One warm user in ten, chosen by a hash that is independent of EVAL.md's `id % 10`."""
    return zlib.crc32(str(user_id).encode()) % 10 == PSEUDO_COLD_BUCKET


def pseudo_cold_id(user_id: str) -> str:
    """A fresh id that EVAL.md's rule 1 classifies as cold (an integer ending in 0)."""
    return str(10 * (zlib.crc32(f"pseudo-cold:{user_id}".encode()) + 1))


def nested_frames(interactions: pd.DataFrame, users: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The validation dataset's interactions and users: the EVAL.md train split only, with the
    pseudo-cold users renamed (pure function over frames)."""
    train = split_interactions(interactions).train
    mapping = {u: pseudo_cold_id(u) for u in pd.unique(train["user_id"]) if is_pseudo_cold(u)}
    if len(set(mapping.values())) != len(mapping) or set(mapping.values()) & set(train["user_id"]):
        raise ValueError("pseudo-cold ids collide with each other or with existing ids")
    out = train[["user_id", "item_id", "timestamp"] + (["weight"] if "weight" in train else [])].copy()
    out["user_id"] = out["user_id"].map(lambda u: mapping.get(u, u))
    if users is None:
        return out, None
    kept = users[users["user_id"].isin(set(train["user_id"]))].copy()
    kept["user_id"] = kept["user_id"].map(lambda u: mapping.get(u, u))
    return out, kept


def write_nested_dataset(data_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the validation dataset (csv + the original schema) into `out_dir`."""
    ds = read_dataset(data_dir)
    inter, users = nested_frames(ds.interactions[ds.interactions["clicked"]], ds.users)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared dataset directory (e.g. ML-100K)")
    ap.add_argument("--out", default="docs/results", help="report directory")
    ap.add_argument("--field", required=True, help="TrainConfig field to vary (dotted for model.*)")
    ap.add_argument("--values", nargs="+", required=True, help="JSON values, e.g. null 2 3.5 true")
    args = ap.parse_args(argv)
    values = [json.loads(v) for v in args.values]
    base = asdict(TrainConfig())
    rows = []
    with tempfile.TemporaryDirectory(prefix="coldval-") as tmp:
        nested = write_nested_dataset(args.data, Path(tmp) / "data")
        split = split_interactions(read_dataset(nested).interactions)
        print(f"validation dataset: {split.summary()}", flush=True)
        for value in values:
            cfg = TrainConfig.from_dict(_set(base, args.field, value))
            t0 = time.time()
            bundle = load_bundle(fit(nested, Path(tmp) / "models", cfg, progress=False))
            row = {"value": value, "seconds": round(time.time() - t0, 1)} | {k: bundle.manifest["metrics"].get(k) for k in KEYS}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m bench.cold_validation " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": cmd, "field": args.field, "split": split.summary(), "rows": rows, "base_config": base}
    atomic_write_json(out / f"cold_validation_{args.field}.json", report)
    lines = [
        f"# Cold-start validation: `{args.field}`",
        "",
        "Nested split of the EVAL.md *train* rows only (see `bench/cold_validation.py`): one warm",
        "user in ten is made pseudo-cold (never trained on, served by features); `cold_*` are",
        "their metrics, the others are warm users' last train rows. No test row is used.",
        "",
        f"Reproduce: `{cmd}` (load average {os.getloadavg()[0]:.1f} at the end).",
        f"Split: {split.summary()}.",
        "",
        "| " + args.field + " | " + " | ".join(KEYS) + " | fit s |",
        "|---" * (len(KEYS) + 2) + "|",
    ]
    for r in rows:
        lines.append(f"| {json.dumps(r['value'])} | " + " | ".join(f"{r[k]:.4f}" for k in KEYS) + f" | {r['seconds']} |")
    best = max(rows, key=lambda r: r["cold_recall@20"])
    lines += ["", f"Best pseudo-cold recall@20: `{args.field}` = {json.dumps(best['value'])} ({best['cold_recall@20']:.4f})."]
    atomic_write_text(out / f"cold_validation_{args.field}.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
