"""Filtered retrieval, in process: which strategy is faster at which selectivity, and its recall.

    python -m bench.serve --build-only             # the 1M-item catalog with `brand` / `u` attributes
    python -m bench.filters                        # this measurement (docs/bench/filters.md)
    python -m bench.filters --queries 10 --out /tmp/f.json --md /tmp/f.md   # smoke

The catalog is `bench.serve`'s (its `--root`, built once by `python -m bench.serve --build-only`:
the production pipeline, an HNSW32 index over 1M items, plus two filterable attributes, `brand`
power-law categorical and `u` uniform continuous). For each selectivity s — a range of width s on
`u` at a random offset, so every query has its own filter — and each strategy of
`indexer.topk.TopK` forced in turn:

* `exact`: score the allowed rows (gather + matrix-vector product), keep the top k;
* `ann`: the HNSW search with a FAISS `IDSelectorBitmap` and efSearch raised by 1 / s
  (capped at `FILTER_MAX_EF_SEARCH`), exact fallback when it comes back short;
* `auto`: what the service does (`FILTER_EXACT_MAX_ROWS` / `FILTER_EXACT_FRACTION`),

it reports per query (one thread, the service's setting) the median and p99 latency of the
top-k call, the fallback rate and recall@k against the exact filtered top-k (numpy, float64),
plus the cost of evaluating the filter into a mask (uncached). The crossover of `exact` and
`ann` is where the thresholds in `indexer/topk.py` come from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import BEGIN, END, command_line, cpu_model, loadavg, splice_results

REPO = Path(__file__).resolve().parents[1]
K = 20
SELECTIVITIES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001, 0.0001)


def _exact_topk(emb: np.ndarray, mask: np.ndarray, vec: np.ndarray, k: int) -> set[int]:
    rows = np.flatnonzero(mask)
    scores = emb.take(rows, axis=0).astype(np.float64) @ vec.astype(np.float64)
    order = np.lexsort((rows, -scores))[:k]
    return set(rows[order].tolist())


def measure(args: argparse.Namespace, log) -> dict:  # noqa: ANN001
    from indexer import faiss_index as fi
    from indexer import topk as topk_module
    from indexer.attributes import parse_filter
    from indexer.topk import Allowed, Query
    from indexer.version import load_version
    from training.numpy_tower import UserRecord

    fi.set_num_threads(1)
    root = args.root / str(args.items)
    version = load_version(root / "index" / "current")
    if version.attributes is None or "u" not in version.attributes:
        raise SystemExit(f"{root}: the catalog has no 'u' attribute; rebuild it with python -m bench.serve --rebuild --build-only")
    topk, table = version.topk, version.attributes
    emb = topk.embeddings
    ef = getattr(topk, "hnsw_ef_search", None)
    if args.ef_search:
        topk.hnsw_ef_search = args.ef_search
    log(f"catalog {topk.count} items, {version.manifest['index']['factory']} efSearch {topk.hnsw_ef_search} (manifest {ef})")
    rng = np.random.default_rng(args.seed)
    users = [UserRecord(f"u{int(i)}", {}) for i in rng.choice(20_000, args.queries, replace=False)]
    vecs = version.tower.embed(users)
    default = (topk.filter_exact_max_rows, topk.filter_exact_fraction)
    forced = {"exact": (topk.count, 1.0), "ann": (0, 0.0), "auto": default}
    rows = []
    for s in args.selectivities:
        filters = []
        for _ in range(len(vecs)):
            lo = float(rng.uniform(0, 1 - s))
            filters.append(parse_filter({"u": {"gte": lo, "lte": lo + s}}))
        t0 = time.perf_counter()
        masks = [table.mask(f) for f in filters]
        mask_ms = (time.perf_counter() - t0) * 1e3 / len(masks)
        allowed = [Allowed(m) for m in masks]
        truth = [_exact_topk(emb, m, v, K) for m, v in zip(masks, vecs, strict=True)]
        row = {"selectivity": s, "allowed_mean": round(float(np.mean([a.count for a in allowed])), 1),
               "mask_ms": round(mask_ms, 3), "strategies": {}}
        for name, (max_rows, fraction) in forced.items():
            topk.filter_exact_max_rows, topk.filter_exact_fraction = max_rows, fraction
            n = len(vecs) if name != "exact" or s <= 0.05 else min(len(vecs), args.exact_queries)
            times, recalls, used = [], [], []
            for i in range(n):
                a = Allowed(masks[i])  # fresh: its rows / bitmap are computed inside the timing
                t = time.perf_counter()
                (res,), (strategy,) = topk.top_k_strategies(vecs[i : i + 1], [Query(K, frozenset(), a)])
                times.append(time.perf_counter() - t)
                got = {topk.rows[item] for item, _ in res}
                if len(res) != min(K, allowed[i].count):
                    raise AssertionError(f"s={s} {name}: {len(res)} items for {allowed[i].count} allowed")
                recalls.append(len(got & truth[i]) / max(1, len(truth[i])))
                used.append(strategy)
            row["strategies"][name] = {
                "queries": n,
                "p50_ms": round(float(np.percentile(times, 50)) * 1e3, 3),
                "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 3),
                "recall@20": round(float(np.mean(recalls)), 4),
                "used": {u: used.count(u) for u in sorted(set(used))},
            }
            log(f"s={s:g} {name}: {row['strategies'][name]}")
        topk.filter_exact_max_rows, topk.filter_exact_fraction = default
        rows.append(row)
    return {
        "catalog": {"items": topk.count, "dim": topk.dim, "factory": version.manifest["index"]["factory"],
                    "efSearch": topk.hnsw_ef_search, "index_version": version.index_version},
        "thresholds": {"FILTER_EXACT_MAX_ROWS": topk_module.FILTER_EXACT_MAX_ROWS,
                       "FILTER_EXACT_FRACTION": topk_module.FILTER_EXACT_FRACTION,
                       "FILTER_MAX_EF_SEARCH": topk_module.FILTER_MAX_EF_SEARCH},
        "rows": rows,
    }


def render(report: dict) -> str:
    c = report["catalog"]
    lines = [
        f"`{report['command']}` — {report['date_utc']}, {report['machine']['cpu']}, "
        f"load average {report['machine']['loadavg_before']} → {report['machine']['loadavg_after']}.",
        "",
        f"Catalog: {c['items']:,} items, {c['dim']}-d, `{c['factory']}` (efSearch {c['efSearch']}); "
        f"k = {K}; one thread; a `u` range of width s per query (its own filter). Thresholds in force: "
        f"{report['thresholds']}.",
        "",
        "| selectivity | allowed rows | mask ms | exact p50 / p99 ms | ann p50 / p99 ms | ann recall@20 | auto p50 / p99 ms | auto recall@20 | auto used |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        e, a, u = (r["strategies"][n] for n in ("exact", "ann", "auto"))
        used = ", ".join(f"{k} {v}" for k, v in u["used"].items())
        lines.append(
            f"| {r['selectivity'] * 100:g} % | {r['allowed_mean']:,.0f} | {r['mask_ms']:.2f} | {e['p50_ms']:.2f} / {e['p99_ms']:.2f} "
            f"| {a['p50_ms']:.2f} / {a['p99_ms']:.2f} (fallback {a['used'].get('fallback', 0)}/{a['queries']}) | {a['recall@20']:.3f} "
            f"| {u['p50_ms']:.2f} / {u['p99_ms']:.2f} | {u['recall@20']:.3f} | {used} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--root", type=Path, default=REPO / "artifacts" / "bench-serve", help="bench.serve's --root")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--exact-queries", type=int, default=20, help="queries of the (slow) exact scan above 5 %%")
    p.add_argument("--selectivities", type=lambda v: [float(x) for x in v.split(",")], default=list(SELECTIVITIES))
    p.add_argument("--ef-search", type=int, default=None, help="the unfiltered efSearch (default: the manifest's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "filters.json")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "bench" / "filters.md")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[bench.filters] {msg}", file=sys.stderr, flush=True)

    before = loadavg()
    result = measure(args, log)
    report = {
        "command": command_line("bench.filters", argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
                    "loadavg_before": before, "loadavg_after": loadavg()},
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    block = render(report)
    text = args.md.read_text() if args.md.is_file() else f"# Filtered retrieval: strategies by selectivity\n\n{BEGIN}\n{END}\n"
    args.md.write_text(splice_results(text, block) or f"{text}\n{BEGIN}\n{block}{END}\n")
    log(f"wrote {args.out} and {args.md}")
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
