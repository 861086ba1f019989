"""Memory per serving worker at 1M and 10M items (issue 20: ids column + memory-mapped index).

    python -m bench.memory --sizes 1000000 10000000 [--baseline TREE] [--modes baseline read mmap]
                           [--rounds 2] [--work DIR] [--out docs/bench]

For each catalog size a real index version is written through `indexer.store.write_version`
(synthetic unit vectors with cluster structure, `bench.common.make_data`, as bench/bigindex.py;
the `auto` index of that size, its quantizer trained on a sample, search parameters tuned like
`indexer rebuild` does for recall@100 >= 0.96 on 500 queries; a small real bundle with
embedding_dim 64, whose user tower the version carries). Then each *mode* is one fresh Python
process that does what a serving worker does — `indexer.version.load_version` (every check,
sha256 included) and `--requests` warm requests through `topk.top_k` (k = 100, one query a call,
1 thread: the exact re-scoring and the id lookups of the request path) plus `--lookups` id -> row
lookups (`POST /similar`'s) — and reports its memory from /proc/self/status and
/proc/self/smaps_rollup: VmRSS split into private (RssAnon) and file-backed (RssFile: the page
cache pages this worker touched, shared with every other worker mapping the same files), and
PSS (a worker's fair share: private + file pages / the processes sharing them). Modes:

* `baseline`: the code in `--baseline TREE` (a checkout of the commit before this change:
  item ids a Python list + dict, index.faiss read into private memory);
* `read`: this tree, index.faiss read (`load_version(mmap_index=False)`), ids the mapped column;
* `mmap`: this tree as the service runs it (index memory-mapped, ids the mapped column).

Modes are interleaved for `--rounds` rounds. Also per mode: load time, latency p50/p99 of a
request's top-k and recall@100 of the served answers against the exact top-100. The version
directories are kept under `--work` (reused by a rerun with the same size and seed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import command_line, machine_facts, make_data

K = 100
TARGET = 0.96  # the rebuild's tuning target: gate 0.95 + margin 0.01

# Runs in a fresh interpreter (python -c) with the tree under test first on sys.path: it uses
# only `load_version`, `ServedVersion.topk` and `Query`, which the baseline has too.
PROBE = r'''
import gc, json, sys, time
import numpy as np

def mem():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":")[0]
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(line.split()[1]) / 1024
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            k = line.split(":")[0]
            if k in ("Pss", "Pss_Anon", "Pss_File"):
                out[k] = int(line.split()[1]) / 1024
    return out

path, qpath, tpath, mode, n_req, n_look = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
from indexer import faiss_index as fi
from indexer.topk import Query
from indexer.version import load_version
from training.numpy_tower import UserRecord
fi.set_num_threads(1)
queries = np.load(qpath)[:n_req]
truth = np.load(tpath)[:n_req]
gc.collect()
m0 = mem()
t0 = time.perf_counter()
v = load_version(path, **({"mmap_index": mode == "mmap"} if mode != "baseline" else {}))
load_s = time.perf_counter() - t0
gc.collect()
m1 = mem()
v.tower.embed([UserRecord(None, {})])
lat = np.empty(len(queries))
hits = 0
for i, q in enumerate(queries):
    t = time.perf_counter_ns()
    res = v.topk.top_k(q[None, :], [Query(100)])[0]
    lat[i] = (time.perf_counter_ns() - t) / 1e6
    want = {"item%09d" % r for r in truth[i].tolist()}
    hits += len(want & {item for item, _ in res})
rng = np.random.default_rng(1)
look = ["item%09d" % r for r in rng.integers(0, v.count, n_look).tolist()]
t = time.perf_counter_ns()
ok = sum(v.topk.rows.get(x) is not None for x in look)
look_us = (time.perf_counter_ns() - t) / 1e3 / max(1, n_look)
gc.collect()
m2 = mem()
m3 = None
if len(sys.argv) > 8 and int(sys.argv[8]) > 1:  # W workers at once: PSS once all of them have served
    import os, pathlib
    bar, w = pathlib.Path(sys.argv[7]), int(sys.argv[8])
    def wait(stage):
        (bar / f"{os.getpid()}.{stage}").touch()
        while len(list(bar.glob(f"*.{stage}"))) < w:
            time.sleep(0.05)
    wait("ready")
    m3 = mem()
    wait("done")
print(json.dumps({"mode": mode, "shared": m3, "load_s": round(load_s, 2), "idle": m0, "loaded": m1, "served": m2,
                  "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                  "recall@100": hits / (len(queries) * 100), "lookup_us": look_us, "lookups_found": ok}))
'''


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bundle(work: Path) -> Path:
    """A small real bundle with embedding_dim 64 (trained once, reused)."""
    done = work / "bundle.txt"
    if done.is_file():
        return Path(done.read_text().strip())
    from training.config import ModelConfig, TrainConfig
    from training.prepare import prepare_synthetic
    from training.train import fit

    data = prepare_synthetic(work / "data", n_users=2_000, n_items=1_000, n_interactions=20_000, seed=0)
    cfg = TrainConfig(epochs=1, full_epochs=1, eval_max_users=200, cold_calibration_steps=20, model=ModelConfig(embedding_dim=64))
    path = fit(data, work / "models", cfg, full=True, progress=False)
    done.write_text(str(path))
    return Path(path)


def build(n: int, args: argparse.Namespace, work: Path) -> tuple[Path, dict]:
    """The version directory of `n` items (written once per size and seed) and its build facts."""
    from indexer import faiss_index as fi
    from indexer import store
    from training.bundle import read_bundle_arrays

    vdir = work / f"n{n}-s{args.seed}"
    facts_path = vdir / "build.json"
    if facts_path.is_file():
        return vdir, json.loads(facts_path.read_text())
    shutil.rmtree(vdir, ignore_errors=True)
    vdir.mkdir(parents=True)
    bpath = bundle(work)
    model_version = read_bundle_arrays(bpath).version
    fi.set_num_threads(args.threads)
    t0 = time.perf_counter()
    items, queries = make_data(n, 2 * args.queries + args.requests, args.dim, args.seed, 1000, 0.5, 0.8, 1.0)
    tune_q, gate_q, req_q = queries[: args.queries], queries[args.queries : 2 * args.queries], queries[2 * args.queries :]
    data_s = time.perf_counter() - t0
    spec = fi.auto_spec(n, args.dim)
    factory = args.factory or spec.factory
    build_params = {"train_size": args.train_per_list * (fi.factory_nlist(factory) or 1)} if args.train_per_list else {}
    log(f"{n:,} items: data {data_s:.0f}s; building {factory} {build_params}")
    t0 = time.perf_counter()
    index = fi.train_index(items, factory, build_params=build_params)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(0, n, 1 << 16):
        index.add(items[s : s + (1 << 16)])
    add_s = time.perf_counter() - t0
    log(f"train {train_s:.0f}s, add {add_s:.0f}s; tuning")
    t0 = time.perf_counter()
    params, tuned = fi.tune_search_params(index, items, tune_q, K, TARGET)
    tune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gate = fi.measure_recall(index, items, gate_q, K)
    _, truth = fi.exact_search(items, req_q, K)
    gate_s = time.perf_counter() - t0
    log(f"tuned {params} (recall {tuned:.4f} on the tuning queries) in {tune_s:.0f}s; gate recall@{K} {gate:.4f}")
    t0 = time.perf_counter()
    root = vdir / "index"
    root.mkdir()
    ids = [f"item{i:09d}" for i in range(n)]
    with store.locked(root):
        name = store.new_version_name()
        path = store.write_version(
            root, name, index=index, embeddings=items, item_ids=ids, bundle_path=bpath, model_version=model_version,
            index_info={"factory": factory, "search_params": params}, recall={f"recall@{K}": gate},
        )
    write_s = time.perf_counter() - t0
    np.save(vdir / "queries.npy", req_q)
    np.save(vdir / "truth.npy", truth)
    files = {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    facts = {
        "n": n, "factory": factory, "build_params": build_params, "search_params": params, "version": path.name,
        "data_s": round(data_s, 1), "train_s": round(train_s, 1), "add_s": round(add_s, 1), "tune_s": round(tune_s, 1),
        "gate_s": round(gate_s, 1), "write_s": round(write_s, 1), "tuned_recall": round(tuned, 4), "gate_recall": round(gate, 4),
        "file_mib": {k: round(v / 2**20, 1) for k, v in sorted(files.items()) if not k.startswith("model/")},
    }
    facts_path.write_text(json.dumps(facts, indent=1))
    log(f"written {path.name} in {write_s:.0f}s")
    return vdir, facts


def probe(vdir: Path, facts: dict, mode: str, args: argparse.Namespace) -> list[dict]:
    """`--workers` fresh serving processes of `mode` at once over the same version: one result
    each (with `shared`: its memory once every worker has loaded and served, when > 1)."""
    tree = Path(args.baseline).resolve() if mode == "baseline" else Path(__file__).resolve().parents[1]
    path = vdir / "index" / facts["version"]
    with tempfile.TemporaryDirectory() as barrier:
        cmd = [sys.executable, "-c", PROBE, str(path), str(vdir / "queries.npy"), str(vdir / "truth.npy"), mode,
               str(args.requests), str(args.lookups), barrier, str(args.workers)]
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tree)
                 for _ in range(args.workers)]
        outs = [(p.communicate(timeout=3600), p.returncode) for p in procs]
    results = []
    for w, ((stdout, stderr), rc) in enumerate(outs):
        if rc != 0:
            results.append({"mode": mode, "worker": w + 1, "workers": args.workers,
                            "error": (stderr.strip().splitlines() or [f"exit {rc}"])[-1]})
        else:
            results.append({**json.loads(stdout.strip().splitlines()[-1]), "worker": w + 1, "workers": args.workers})
    return results


def render_md(report: dict) -> str:
    a = report["args"]
    L = [
        "# Memory per serving worker (ids column, memory-mapped index)", "",
        "Generated by `bench/memory.py` from `memory.json`; the reading at the end is hand-written.", "",
        "Reproduce with:", "", "```", report["command"], "```", "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['usable_cpus']} usable CPUs, faiss "
        f"{report['machine']['faiss']}; shared with other jobs (load average at the end {report['machine']['loadavg_at_end']}). "
        f"Wall time {report['wall_s'] / 60:.1f} min. Baseline tree: `{a.get('baseline_rev') or a.get('baseline')}`.", "",
        "## Builds", "",
        "| items | factory | build params | train s | add s | tune s | write+verify s | tuned params | gate recall@100 | files MiB |",
        "|---:|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for b in report["builds"]:
        files = ", ".join(f"{k} {v:,.0f}" for k, v in b["file_mib"].items())
        bp = ", ".join(f"{k}={v}" for k, v in b["build_params"].items()) or "—"
        sp = ", ".join(f"{k}={v}" for k, v in b["search_params"].items()) or "—"
        L.append(f"| {b['n']:,} | `{b['factory']}` | {bp} | {b['train_s']} | {b['add_s']} | {b['tune_s']} | {b['write_s']} | "
                 f"{sp} | {b['gate_recall']:.4f} | {files} |")
    L += ["", f"## Serving workers ({a['requests']} requests of k = 100, {a['lookups']} id lookups each)", "",
          "MiB. `idle`: the process after its imports; `+anon`/`+file`: growth of private / file-backed RSS over idle "
          "after loading and serving; `RSS`, `PSS`: totals of the process after serving (with W workers at once: "
          "`mode ×W`, one row per worker, PSS taken once all W have served, so the mapped files are shared W ways).", "",
          "| items | mode | round | load s | loaded +anon | loaded +file | served +anon | served +file | RSS | PSS | "
          "idle RSS | p50 ms | p99 ms | recall@100 (served) | lookup µs |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        if "error" in r:
            L.append(f"| {r['n']:,} | {r['mode']} | {r['round']} | error: {r['error'][:80]} |" + " |" * 11)
            continue
        i, lo, s = r["idle"], r["loaded"], r["served"]
        w = r.get("workers", 1)
        mode = r["mode"] if w == 1 else f"{r['mode']} ×{w}"
        pss = (r.get("shared") or s)["Pss"]
        L.append(f"| {r['n']:,} | {mode} | {r['round']} | {r['load_s']} | {lo['RssAnon'] - i['RssAnon']:,.0f} | "
                 f"{lo['RssFile'] - i['RssFile']:,.0f} | {s['RssAnon'] - i['RssAnon']:,.0f} | {s['RssFile'] - i['RssFile']:,.0f} | "
                 f"{s['VmRSS']:,.0f} | {pss:,.0f} | {i['VmRSS']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                 f"{r['recall@100']:.4f} | {r['lookup_us']:.1f} |")
    L += ["", report.get("notes", ""), ""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--modes", nargs="+", default=["baseline", "read", "mmap"], choices=["baseline", "read", "mmap"])
    p.add_argument("--baseline", default=None, help="a checkout of the code before this change (mode baseline)")
    p.add_argument("--factory", default=None, help="index factory (default: auto for the size)")
    p.add_argument("--train-per-list", type=int, default=None, help="k-means sample per inverted list (default: the build's 40)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="serving processes of a mode at once (PSS shares the mapped files)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--lookups", type=int, default=1000)
    p.add_argument("--queries", type=int, default=500, help="tuning queries, and as many gate queries")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/bench-memory", help="where the versions are written (kept for reruns)")
    p.add_argument("--append", action="store_true", help="add to the results already in OUT/memory.json")
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args(argv)
    if "baseline" in args.modes and not args.baseline:
        p.error("mode baseline needs --baseline TREE")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    builds, runs = [], []
    for n in args.sizes:
        vdir, facts = build(n, args, work)
        builds.append(facts)
        for rnd in range(args.rounds):
            for mode in args.modes:
                for r in probe(vdir, facts, mode, args):
                    runs.append({"n": n, "round": rnd + 1, **r})
                    pss = (r.get("shared") or r.get("served") or {}).get("Pss", 0)
                    log(f"{n:,} {mode} round {rnd + 1} worker {r['worker']}/{r['workers']}: " + (r.get("error") or
                        f"load {r['load_s']}s, served RSS {r['served']['VmRSS']:.0f} MiB (anon {r['served']['RssAnon']:.0f}, "
                        f"file {r['served']['RssFile']:.0f}), PSS {pss:.0f}, p50 {r['p50_ms']:.3f} ms, "
                        f"recall {r['recall@100']:.4f}"))
    out = Path(args.out)
    prev_path = out / "memory.json"
    prev = json.loads(prev_path.read_text()) if prev_path.is_file() else {}
    rev = None
    if args.baseline:
        rev = subprocess.run(["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "command": command_line("bench.memory", argv), "machine": machine_facts(args),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "args": {**{k: v for k, v in vars(args).items() if k not in ("out", "append", "work")}, "baseline_rev": rev},
        "builds": builds, "runs": runs,
    }
    if args.append and prev:
        report["command"] = prev["command"] + "\n" + report["command"]
        report["wall_s"] += prev["wall_s"]
        report["builds"] = prev["builds"] + [b for b in builds if b not in prev["builds"]]
        report["runs"] = prev["runs"] + runs
        report["args"]["baseline_rev"] = rev or prev["args"].get("baseline_rev")
    report["notes"] = prev.get("notes", "")
    out.mkdir(parents=True, exist_ok=True)
    prev_path.write_text(json.dumps(report, indent=1) + "\n")
    (out / "memory.md").write_text(render_md(report))
    log(f"wrote {out}/memory.md, memory.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
