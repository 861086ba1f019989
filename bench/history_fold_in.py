"""Choose the request-history fold-in (`training.numpy_tower.HistoryFoldIn`) on validation.

The fold-in needs no training: u' = normalize(u + b * m / (m + c) * normalize(sum_j r^d_j v_j))
is applied after the tower, so one trained bundle is scored under every (b, c, r) of a grid.
Run it on a bundle fitted on the nested validation dataset of `bench.cold_validation` (train
rows only; `write_nested_dataset`), whose EVAL.md split turns pseudo-cold users into the
cold_mM users and warm users' last train rows into warm_fresh's — no test row is seen:

    python -c "from bench.cold_validation import write_nested_dataset; write_nested_dataset('ML', 'NESTED')"
    trainer fit --data NESTED --out MODELS
    python -m bench.history_fold_in --data NESTED --model MODELS --out docs/bench

It writes `history_fold_in.md` / `.json`: recall@20 of every protocol per grid point, the
baseline (no fold-in) and the item-kNN fold-in anchor, and the point with the best mean recall@20
over cold_m1, cold_m3, cold_m5, cold_m10 and warm_fresh (each protocol counted once).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import command_line
from training.artifacts import atomic_write_json, atomic_write_text
from training.bundle import load_bundle
from training.dataset import read_dataset
from training.evaluate import (
    KS,
    history_item_vectors,
    ranking_metrics,
    topk_excluding,
    user_features,
)
from training.history_eval import PROTOCOLS, history_anchors, history_protocols
from training.numpy_tower import HistoryFoldIn
from training.split import split_interactions

WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
HALVES = (0.0, 1.0, 3.0, 10.0)
RECENCIES = (1.0, 0.9, 0.8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the nested validation dataset (bench.cold_validation)")
    ap.add_argument("--model", required=True, help="bundle (or models directory) fitted on it")
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--weights", nargs="+", type=float, default=list(WEIGHTS))
    ap.add_argument("--halves", nargs="+", type=float, default=list(HALVES))
    ap.add_argument("--recencies", nargs="+", type=float, default=list(RECENCIES))
    args = ap.parse_args(argv)
    ds = read_dataset(args.data)
    split = split_interactions(ds.interactions)
    bundle = load_bundle(args.model)
    model = bundle.model
    item_ids = ds.items["item_id"].astype(str).tolist()
    catalog = pd.Index(item_ids)
    item_vecs = model.embed_items(ds.items)
    is_tail = ~catalog.isin(list(split.head_items))
    protocols = history_protocols(split, item_ids)
    base = {}
    for name, p in protocols.items():
        vecs = model.embed_user_table(list(p.user_ids), user_features(ds, list(p.user_ids)), histories=p.history)
        base[name] = (vecs, history_item_vectors(model, p.history, catalog, item_vecs))

    def score(rule: HistoryFoldIn | None) -> dict[str, float]:
        out = {}
        for name, p in protocols.items():
            vecs, hist = base[name]
            u = vecs if rule is None else rule.apply(vecs, hist)
            top = topk_excluding(u, item_vecs, max(KS), p.exclude)
            out[name] = round(ranking_metrics(top, p.relevant, is_tail, len(item_ids))["recall@20"], 4)
        out["mean"] = round(float(np.mean([out[n] for n in PROTOCOLS])), 4)
        return out

    rows = [{"weight": 0.0, "half": None, "recency": None} | score(None)]
    for b, c, r in itertools.product(args.weights, args.halves, args.recencies):
        if b == 0:
            continue
        rows.append({"weight": b, "half": c, "recency": r} | score(HistoryFoldIn(b, c, r)))
        print(json.dumps(rows[-1]), flush=True)
    anchors = history_anchors(split, item_ids, protocols)
    knn = {n: anchors[n]["item_knn"]["recall@20"] for n in PROTOCOLS}
    best = max(rows, key=lambda r: r["mean"])
    cmd = command_line("bench.history_fold_in", argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": cmd, "bundle": bundle.path.name, "users": {n: len(p) for n, p in protocols.items()},
              "rows": rows, "item_knn": knn, "best": best}
    atomic_write_json(out / "history_fold_in.json", report)
    head = "| b | c | r | " + " | ".join(PROTOCOLS) + " | mean |"
    lines = [
        "# Request-history fold-in: choice on the nested validation",
        "",
        "recall@20 of the request-history protocols on the nested validation dataset (train rows only, "
        "`bench/cold_validation.py`) with u' = normalize(u + b·m/(m+c)·normalize(Σ r^d v_j)); "
        "b = 0 is the tower alone. Users: " + ", ".join(f"{n} {len(p)}" for n, p in protocols.items()) + ".",
        "",
        f"Reproduce: `{cmd}` (bundle {bundle.path.name}).",
        "",
        head,
        "|---" * (len(PROTOCOLS) + 4) + "|",
    ]
    for r in rows:
        lines.append(f"| {r['weight']} | {r['half']} | {r['recency']} | " + " | ".join(f"{r[n]:.4f}" for n in PROTOCOLS)
                     + f" | {r['mean']:.4f} |")
    lines.append("| item-kNN fold-in | | | " + " | ".join(f"{knn[n]:.4f}" for n in PROTOCOLS)
                 + f" | {np.mean(list(knn.values())):.4f} |")
    lines += ["", f"Best mean: b = {best['weight']}, c = {best['half']}, r = {best['recency']} ({best['mean']:.4f})."]
    atomic_write_text(out / "history_fold_in.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
