"""Benchmark of `indexer update` (a live catalog): time to the first response that reflects a
catalog change, serving latency with a delta, and tail latency under an update every 10 s.

    python -m bench.update --items 1000000

1. builds (once, cached under --root) a synthetic catalog of `--items` items with a bool
   attribute `stock`: prepare synthetic -> a short trainer fit -> indexer rebuild (`--index`,
   default auto: IVF at 1M);
2. **freshness**: writes items.csv with 1,000 new, 1,000 removed and 10,000 attribute changes,
   starts `indexer update --data` as a subprocess (as cron would) and polls an in-process
   service (the real app with its background reloader, every 0.2 s) with `POST /similar` for a
   new item (404 until served): seconds from the command's start to the first 200;
3. **delta cost**: `TopK.top_k` latency (k=20, one thread, in process) of user queries over the
   base (0 %) and over deltas of 1 % and 5 % of the catalog (feature changes: that many
   tombstones and delta rows);
4. **updates under load**: p99 of `/retrieve` (cache misses, in process, one client thread)
   for `--load-s` seconds without updates, then as long with an update every 10 s.

Writes docs/bench/update.md and docs/bench/update.json.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import command_line, cpu_model, loadavg

REPO = Path(__file__).resolve().parents[1]
K = 20
_USERS = itertools.count()  # every HTTP request a new user: a cache miss in every round


def build(root: Path, n_items: int, index: str, log) -> Path:  # noqa: ANN001
    from indexer.rebuild import RebuildConfig, rebuild
    from training.config import ModelConfig, TrainConfig
    from training.prepare import prepare_synthetic
    from training.train import fit

    data = root / "data"
    if (root / "index" / "current").exists():
        return data
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    # the model only has to be a real item tower: a short fit on few clicks keeps the build bounded
    prepare_synthetic(data, n_users=5_000, n_items=n_items, n_interactions=min(40_000, 30 * n_items), seed=0)
    items = pd.read_csv(data / "items.csv", dtype=str, keep_default_na=False)
    items["stock"] = np.where(np.arange(len(items)) % 2 == 0, "true", "false")
    items.to_csv(data / "items.csv", index=False)
    schema = json.loads((data / "schema.json").read_text())
    schema["item"]["attributes"] = {"stock": {"type": "bool"}}
    (data / "schema.json").write_text(json.dumps(schema))
    log(f"dataset {n_items} items in {time.perf_counter() - t0:.0f}s")
    cfg = TrainConfig(epochs=1, full_epochs=1, eval_max_users=200, cold_calibration_steps=20,
                      model=ModelConfig(embedding_dim=64))
    bundle = fit(data, root / "models", cfg, full=True, progress=False)
    log(f"model trained at {time.perf_counter() - t0:.0f}s")
    res = rebuild(RebuildConfig(model=bundle, data=data, out=root / "index", index=index, progress=False, keep=50))
    log(f"rebuild {res.manifest['index']['factory']} {res.manifest['index']['search_params']} at {time.perf_counter() - t0:.0f}s")
    shutil.copy(data / "items.csv", root / "items.base.csv")
    return data


def change(base: pd.DataFrame, new: int, removed: int, attr: int, feature: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    out = base.copy()
    idx = rng.permutation(len(out))
    a, b = removed, removed + attr
    out.loc[out.index[idx[a:b]], "stock"] = np.where(out["stock"].to_numpy()[idx[a:b]] == "true", "false", "true")
    c = b + feature
    out.loc[out.index[idx[b:c]], "category"] = "c_changed"
    fresh = out.iloc[idx[c : c + new]].copy()
    fresh["item_id"] = [f"new{seed}-{i}" for i in range(new)]
    return pd.concat([out.drop(out.index[idx[:a]]), fresh], ignore_index=True)


def reset(root: Path) -> None:
    """Back to the base version as current (drop every delta)."""
    from indexer import store

    versions = store.list_versions(root / "index")
    base = [v for v in versions if store.base_of(v) is None][0]
    store.switch_current(root / "index", base.name)
    for v in versions:
        if v != base:
            store.delete_version(root / "index", v)


def update_cmd(root: Path, *extra: str, quiet: bool = True) -> list[str]:
    return [sys.executable, "-m", "indexer.cli", "update", "--root", str(root / "index"), "--data", str(root / "data"),
            *(["-q"] if quiet else []), *extra]


class _Reloads(logging.Handler):
    """The service reloader's 'serving new version' records (their load_ms, gc_freeze_ms)."""

    def __init__(self) -> None:
        super().__init__()
        self.swaps: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and "load_ms" in fields:
            self.swaps.append(fields)


def freshness(root: Path, base: pd.DataFrame, log) -> dict:  # noqa: ANN001
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    reset(root)
    after = change(base, 1000, 1000, 10_000, 0, seed=1)
    after.to_csv(root / "data" / "items.csv", index=False)
    app = create_app(Settings(index_root=root / "index", access_log=False, reload_interval_s=0.2), start_reloader=True)
    reloads = _Reloads()
    logging.getLogger("service.state").addHandler(reloads)
    with TestClient(app) as c:
        while c.get("/readyz").status_code != 200:
            time.sleep(0.1)
        t0 = time.perf_counter()
        proc = subprocess.Popen(update_cmd(root, quiet=False), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = None
        while time.perf_counter() - t0 < 120:
            r = c.post("/similar", json={"item_id": "new1-0", "k": K})
            if r.status_code == 200:
                first = time.perf_counter() - t0
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=120)
        cmd_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"indexer update failed: {err}")
        ok = c.post("/retrieve", json={"k": 1000, "filter": {"stock": True}}).json()
    logging.getLogger("service.state").removeHandler(reloads)
    m = json.loads((Path(out.strip().splitlines()[-1]) / "manifest.json").read_text())
    done = re.search(r"update done in [0-9.]+s: (\{.*\})", out)  # every stage, write and switch included
    stock = set(after.loc[after["stock"] == "true", "item_id"])
    wrong = [it["item_id"] for it in ok["items"] if it["item_id"] not in stock]
    res = {"first_response_s": None if first is None else round(first, 2), "command_s": round(cmd_s, 2),
           "update_timings_s": ast.literal_eval(done.group(1)) if done else m["timings_s"],
           "service_reload_ms": [r["load_ms"] for r in reloads.swaps[1:]],
           "stats": m["update"], "filter_answers_not_in_stock": len(wrong)}
    log(f"freshness: {res}")
    return res


def topk_latency(topk, queries: np.ndarray) -> dict:  # noqa: ANN001
    from indexer.topk import Query

    times = []
    for i in range(len(queries)):
        t = time.perf_counter()
        topk.top_k(queries[i : i + 1], [Query(K)])
        times.append(time.perf_counter() - t)
    t = np.array(times) * 1e3
    return {"p50_ms": round(float(np.percentile(t, 50)), 3), "p99_ms": round(float(np.percentile(t, 99)), 3),
            "mean_ms": round(float(t.mean()), 3)}


def delta_cost(root: Path, base: pd.DataFrame, n_queries: int, http_queries: int, log) -> list[dict]:  # noqa: ANN001
    from indexer import faiss_index as fi
    from indexer.topk import DeltaTopK, recall_against_exact
    from indexer.version import load_version
    from training.numpy_tower import UserRecord

    fi.set_num_threads(1)
    rows = []
    reset(root)
    versions = {0.0: load_version(root / "index" / "current")}
    for share in (0.01, 0.05):  # the 5 % change contains the 1 % one: both deltas stay on disk
        n = int(share * len(base))
        change(base, 0, 0, 0, n, seed=2).to_csv(root / "data" / "items.csv", index=False)
        subprocess.run(update_cmd(root, "--max-delta", str(share + 0.001)), check=True)
        versions[share] = load_version(root / "index" / "current")
    rng = np.random.default_rng(0)
    q = versions[0.0].tower.embed([UserRecord(f"u{int(i)}", {}) for i in rng.choice(5_000, n_queries, replace=False)])
    # the served search (`default`: the delta IVF above DELTA_EXACT_MAX_ROWS, tombstones by
    # over-fetch) next to the other three combinations over the same delta, the first of which
    # (`exact+selector`) is the search before the delta index (2026-12-02)
    topks: dict[tuple[float, str], object] = {}
    builds: dict[float, float] = {}
    for share, v in versions.items():
        topks[(share, "default")] = v.topk
        if not isinstance(v.topk, DeltaTopK):
            continue
        t = v.topk
        args = (t.base, t.delta_embeddings, t.item_ids.delta, ~t.live.mask[: t.base_count])
        t0 = time.perf_counter()
        ivf = DeltaTopK(*args, delta_exact_max_rows=0)
        builds[share] = round(time.perf_counter() - t0, 3)
        exact = DeltaTopK(*args, delta_exact_max_rows=1 << 62)
        for name, topk, over in (("exact+selector", exact, False), ("exact+overfetch", exact, True),
                                 ("ivf+selector", ivf, False), ("ivf+overfetch", ivf, True)):
            clone = copy.copy(topk)
            clone.tombstone_overfetch = over
            topks[(share, name)] = clone
    for rnd in range(2):  # interleaved rounds: the machine is shared
        for (share, name), topk in topks.items():
            r = {"delta": share, "variant": name, "round": rnd, **topk_latency(topk, q)}
            rows.append(r)
            log(f"delta {share:.0%} {name}: {r}")
    for (share, name), topk in topks.items():
        rec = recall_against_exact(topk, q[:200], K)
        v = versions[share]
        rows.append({"delta": share, "variant": name, "recall@20_vs_exact": round(rec, 4), "live": v.count,
                     "delta_rows": (v.manifest.get("delta") or {}).get("delta_rows", 0)})
    for share, s in builds.items():
        rows.append({"delta": share, "delta_index_build_s": s})
    del topks
    names = {share: v.index_version for share, v in versions.items()}
    del versions
    try:
        for rnd in range(2):
            for share, name in names.items():
                for variant in ("default", "exact+selector") if share else ("default",):
                    r = {"delta": share, "variant": variant, "round": rnd, **http_latency(root, name, http_queries, variant)}
                    rows.append(r)
                    log(f"delta {share:.0%} {variant} over HTTP: {r}")
    except Exception as e:  # noqa: BLE001 - keep the in-process figures
        rows.append({"http_error": f"{type(e).__name__}: {e}"})
    return rows


@contextlib.contextmanager
def delta_search(variant: str) -> Iterator[None]:
    """The service's `DeltaTopK` searching as `variant` while the block runs: `default` (what is
    served), `exact+selector` (the search before the delta index: every delta row scanned
    exactly, tombstones left out by the bitmap selector). The loaded version reads both knobs
    at load (`DELTA_EXACT_MAX_ROWS`) or per query (`tombstone_overfetch`)."""
    from indexer import topk as tk

    if variant == "default":
        yield
        return
    if variant != "exact+selector":
        raise ValueError(f"unknown delta search variant {variant!r}")
    old = tk.DELTA_EXACT_MAX_ROWS, tk.DeltaTopK.tombstone_overfetch
    tk.DELTA_EXACT_MAX_ROWS, tk.DeltaTopK.tombstone_overfetch = 1 << 62, False
    try:
        yield
    finally:
        tk.DELTA_EXACT_MAX_ROWS, tk.DeltaTopK.tombstone_overfetch = old


def http_latency(root: Path, name: str, n: int, variant: str = "default") -> dict:
    """p50/p99 of `/retrieve` (k=20, cache misses: a new user id each) through the in-process
    app serving version `name`, its delta searched as `variant` (`delta_search`)."""
    from fastapi.testclient import TestClient

    from indexer import store
    from service.app import create_app
    from service.settings import Settings

    store.switch_current(root / "index", name)
    app = create_app(Settings(index_root=root / "index", access_log=False), start_reloader=True)
    with delta_search(variant), TestClient(app) as c:
        while c.get("/readyz").json().get("index_version") != name:
            time.sleep(0.1)
        for i in range(50):
            c.post("/retrieve", json={"user_id": f"w{i}", "k": K})
        times = []
        for i in range(n):
            t = time.perf_counter()
            r = c.post("/retrieve", json={"user_id": f"h{next(_USERS)}", "features": {"age": 20 + i % 50}, "k": K})
            times.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(f"/retrieve answered {r.status_code}: {r.text[:200]}")
    t_ms = np.array(times) * 1e3
    return {"http": True, "requests": n, "p50_ms": round(float(np.percentile(t_ms, 50)), 3),
            "p99_ms": round(float(np.percentile(t_ms, 99)), 3), "mean_ms": round(float(t_ms.mean()), 3)}


def under_updates(root: Path, base: pd.DataFrame, load_s: float, log) -> dict:  # noqa: ANN001
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    reset(root)
    base.to_csv(root / "data" / "items.csv", index=False)
    app = create_app(Settings(index_root=root / "index", access_log=False, reload_interval_s=0.5), start_reloader=True)
    out = {}
    with TestClient(app) as c:
        while c.get("/readyz").status_code != 200:
            time.sleep(0.1)
        for phase in ("none", "every_10s"):
            stop = threading.Event()
            lat, codes = [], []
            updates: list[float] = []

            def updater(stop=stop, updates=updates) -> None:  # noqa: ANN001
                i = 0
                while not stop.wait(10.0):
                    i += 1
                    change(base, 100, 100, 1000, 0, seed=100 + i).to_csv(root / "data" / "items.csv", index=False)
                    t = time.perf_counter()
                    subprocess.run(update_cmd(root), check=False, capture_output=True)
                    updates.append(round(time.perf_counter() - t, 2))

            th = threading.Thread(target=updater) if phase != "none" else None
            if th:
                th.start()
            t_end = time.perf_counter() + load_s
            i = 0
            while time.perf_counter() < t_end:
                i += 1
                t = time.perf_counter()
                r = c.post("/retrieve", json={"user_id": f"u{i}", "features": {"age": 20 + i % 50}, "k": K})
                lat.append(time.perf_counter() - t)
                codes.append(r.status_code)
            stop.set()
            if th:
                th.join()
            t_ms = np.array(lat) * 1e3
            out[phase] = {"requests": len(lat), "errors": int(sum(1 for s in codes if s != 200)),
                          "p50_ms": round(float(np.percentile(t_ms, 50)), 3),
                          "p99_ms": round(float(np.percentile(t_ms, 99)), 3), "updates_s": updates}
            log(f"load, updates {phase}: {out[phase]}")
    out["p99_ratio"] = round(out["every_10s"]["p99_ms"] / out["none"]["p99_ms"], 2)
    return out


def render(report: dict) -> str:
    lines = [
        "# `indexer update`: freshness, delta cost, tail latency under updates",
        "",
        f"Command: `{report['command']}`. Machine: {report['machine']['cpu']}, "
        f"load average before {report['machine']['loadavg']}. Catalog: {report['catalog']['items']} items, "
        f"{report['catalog']['factory']} {report['catalog']['search_params']}, dim {report['catalog']['dim']}.",
        "",
    ]
    if "freshness" in report:
        lines += _render_freshness(report["freshness"])
    if "delta_cost" in report:
        lines += _render_delta(report["delta_cost"])
    if "under_updates" in report:
        lines += _render_updates(report["under_updates"])
    return "\n".join(lines)


def _render_freshness(f: dict) -> list[str]:
    return [
        "## Time to the first response reflecting a change",
        "",
        "1,000 new, 1,000 removed and 10,000 attribute-changed items written to items.csv; `indexer update --data` "
        "started as a subprocess; an in-process service (real app, background reloader every 0.2 s) polled with "
        "`POST /similar` for a new item.",
        "",
        f"- first 200 for the new item: **{f['first_response_s']} s** after the command started (target <= 10 s); "
        f"the command itself took {f['command_s']} s",
        f"- update stages (s; `total` is the job inside the process, the rest of the command is the interpreter "
        f"start, imports and exit): {f['update_timings_s']}",
        f"- the service's reload of the new version (load_ms, off the request path): {f.get('service_reload_ms')}",
        f"- diff: {f['stats']}",
        f"- a `stock: true` filter right after: {f['filter_answers_not_in_stock']} answers not in stock",
        "",
    ]


def p99_ratio(rows: list[dict], variant: str = "default") -> float | None:
    """mean p99 of the 5 % delta rows searched as `variant` over the mean p99 of the 0 % rows."""
    five = [r["p99_ms"] for r in rows if r["delta"] == 0.05 and r.get("variant", "default") == variant]
    zero = [r["p99_ms"] for r in rows if r["delta"] == 0.0]
    return round(float(np.mean(five) / np.mean(zero)), 2) if five and zero else None


def _render_delta(d: list[dict]) -> list[str]:
    every = [r for r in d if "p99_ms" in r and not r.get("http")]
    lat = [r for r in every if r.get("variant", "default") == "default"]
    http = [r for r in d if r.get("http")]
    rec = [r for r in d if "recall@20_vs_exact" in r]
    builds = {r["delta"]: r["delta_index_build_s"] for r in d if "delta_index_build_s" in r}
    no_delta = np.mean([r["p99_ms"] for r in lat if r["delta"] == 0.0]) if lat else float("nan")
    return [
        "## Serving latency with a delta (in process, `TopK.top_k`, k=20, one thread, 2 interleaved rounds)",
        "",
        "| delta | round | p50 ms | p99 ms | mean ms |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {r['delta']:.0%} | {r['round']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_ms']} |" for r in lat],
        "",
        f"- in process: 5 % delta p99 / no-delta p99 = **{p99_ratio(lat)}** (no-delta p99 {no_delta:.3f} ms; "
        f"target <= 1.20); the search before the delta index (`exact+selector`): {p99_ratio(every, 'exact+selector')}",
        "",
        "Every way of searching the same deltas (same process, same queries, interleaved with the table "
        "above; `exact+selector` is the search before the delta index; `default` is what is served):",
        "",
        "| delta | variant | round | p50 ms | p99 ms | mean ms |",
        "|---:|---|---:|---:|---:|---:|",
        *[f"| {r['delta']:.0%} | {r.get('variant', 'default')} | {r['round']} | {r['p50_ms']} | {r['p99_ms']} | "
          f"{r['mean_ms']} |" for r in sorted(every, key=lambda r: (r['delta'], r.get('variant', ''), r['round']))],
        "",
        *[f"- delta {r['delta']:.0%} {r.get('variant', 'default')}: recall@20 vs exact {r['recall@20_vs_exact']} "
          f"({r['live']} live items, {r['delta_rows']} delta rows)" for r in rec],
        *[f"- delta {share:.0%}: building the delta IVF (at load) took {s} s" for share, s in builds.items()],
        "",
        "Over HTTP (the in-process app, `/retrieve` k=20, cache misses, one client, 2 interleaved rounds; "
        "`exact+selector`: the same version served with the search before the delta index):",
        "",
        "| delta | variant | round | requests | p50 ms | p99 ms | mean ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *[f"| {r['delta']:.0%} | {r.get('variant', 'default')} | {r['round']} | {r.get('requests', '')} | {r['p50_ms']} | "
          f"{r['p99_ms']} | {r['mean_ms']} |" for r in http],
        *[f"- HTTP measurement failed: {r['http_error']}" for r in d if "http_error" in r],
        "",
        f"- over HTTP: 5 % delta p99 / no-delta p99 = **{p99_ratio(http)}** (target <= 1.20); the search before "
        f"the delta index: {p99_ratio(http, 'exact+selector')}",
        "",
    ]


def _render_updates(u: dict) -> list[str]:
    return [
        "## p99 under an update every 10 s (in-process `/retrieve`, cache misses, one client)",
        "",
        "| updates | requests | errors | p50 ms | p99 ms | update durations s |",
        "|---|---:|---:|---:|---:|---|",
        *[f"| {k} | {v['requests']} | {v['errors']} | {v['p50_ms']} | {v['p99_ms']} | {v['updates_s']} |"
          for k, v in u.items() if isinstance(v, dict)],
        "",
        f"p99 with updates / without = **{u['p99_ratio']}** (target <= 2).",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.update", description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--index", default="auto")
    p.add_argument("--root", type=Path, default=REPO / "artifacts" / "bench-update")
    p.add_argument("--queries", type=int, default=1000, help="user queries per in-process latency row")
    p.add_argument("--http-queries", type=int, default=2000, help="requests per HTTP latency row")
    p.add_argument("--parts", default="freshness,delta,updates",
                   help="comma-separated parts to run (freshness, delta, updates; default all)")
    p.add_argument("--load-s", type=float, default=30.0)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "update")
    p.add_argument("--build-only", action="store_true", help="build (or find) the cached catalog and stop")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    def log(msg: str) -> None:
        print(f"[bench.update] {msg}", flush=True)

    root = args.root / str(args.items)
    machine = {"cpu": cpu_model(), "loadavg": loadavg()}
    build(root, args.items, args.index, log)
    if args.build_only:
        return 0
    base = pd.read_csv(root / "items.base.csv", dtype=str, keep_default_na=False)
    from indexer.version import read_manifest

    reset(root)
    from indexer import store

    m = read_manifest(store.read_current(root / "index"))
    report = {
        "command": command_line("bench.update", argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "catalog": {"items": m["count"], "dim": m["dim"], "factory": m["index"]["factory"],
                    "search_params": m["index"]["search_params"]},
    }
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts - {"freshness", "delta", "updates"}:
        raise SystemExit(f"unknown --parts {sorted(parts - {'freshness', 'delta', 'updates'})}")
    if "freshness" in parts:
        report["freshness"] = freshness(root, base, log)
    if "delta" in parts:
        report["delta_cost"] = delta_cost(root, base, args.queries, args.http_queries, log)
    if "updates" in parts:
        report["under_updates"] = under_updates(root, base, args.load_s, log)
    base.to_csv(root / "data" / "items.csv", index=False)
    reset(root)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
