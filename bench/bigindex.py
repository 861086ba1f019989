"""Benchmark of quantized + re-ranked indexes for large catalogs (issue 20, the index part).

    python -m bench.bigindex [--sizes 1000000 3000000] [--configs ...] [--out docs/bench]

For each catalog size and index configuration: build time (train / add), serialized size,
search parameters tuned exactly as `indexer rebuild` tunes them (`tune_search_params` on 500
queries for recall@100 >= 0.96, the gate's 0.95 + the default margin), recall@100 on 500 other
queries, single-query latency through `indexer.faiss_index.search` (1 thread), and the memory
of a *search process*: a fresh Python process that reads index.faiss (plainly, and with
`faiss_index.read_index(mmap=True)`: `IO_FLAG_MMAP_IFC`), memory-maps embeddings.npy as the service does, answers 300 queries and
re-scores each one's candidates exactly from embeddings.npy (what `indexer.topk` does), and
reports VmRSS split into private (RssAnon) and file-backed (RssFile: page cache, shared by
every worker on the machine and evictable) memory. The Python list of item ids the service
holds today is measured separately (`ids_list_mib`), since its replacement is another change.

Also, for one configuration (`--shard-config`), the add step one-process vs
`indexer.sharded.build_sharded` with 2 shards and 2 threads over the same trained index, with a
check that both give identical search results.

Data: `bench.index.make_data`, the generator calibrated against a trained model's item
vectors (docs/bench/index.md). Writes `bigindex.md` and `bigindex.json` under `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from bench.common import command_line, machine_facts, make_data
from indexer import faiss_index as fi
from indexer import sharded

K = 100
TARGET = 0.96  # the rebuild's tuning target: recall gate 0.95 + tune_margin 0.01
DEFAULT_CONFIGS = (
    "Flat", "HNSW32", "IVF{nl},Flat", "IVF{nl},PQ32x8", "IVF{nl},PQ32x8,RFlat", "IVF{nl},PQ32x8,Refine(SQ8)",
    "IVF{nl},PQ16x8,Refine(SQ8)", "IVF{nl},PQ16x8,RFlat",
)


def _rss() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
    return out


def serve_probe(index_path: str, emb_path: str, queries_path: str, mmap: bool, k: int) -> dict:
    """Runs in a fresh process: the memory a serving worker needs for this index."""
    fi.set_num_threads(1)
    base = _rss()
    t0 = time.perf_counter()
    index = fi.read_index(index_path, mmap=mmap)
    load_s = time.perf_counter() - t0
    loaded = _rss()
    emb = np.load(emb_path, mmap_mode="r").view(np.ndarray)
    queries = np.load(queries_path)
    for q in queries:
        _, rows = fi.search(index, q, k)
        r = rows[0][rows[0] >= 0]
        np.einsum("ij,j->i", emb.take(r, axis=0).astype(np.float64), q.astype(np.float64))  # the exact re-score
    served = _rss()
    n = int(index.ntotal)
    del index
    gc.collect()
    before_ids = _rss()["RssAnon"]
    ids = [f"item{i:09d}" for i in range(n)]
    ids_mib = _rss()["RssAnon"] - before_ids
    del ids
    return {
        "load_s": round(load_s, 2), "base_rss_mib": round(base["VmRSS"], 1),
        "loaded_rss_mib": round(loaded["VmRSS"] - base["VmRSS"], 1),
        "served_rss_mib": round(served["VmRSS"] - base["VmRSS"], 1),
        "served_anon_mib": round(served["RssAnon"] - base["RssAnon"], 1),
        "served_file_mib": round(served["RssFile"] - base["RssFile"], 1),
        "ids_list_mib": round(ids_mib, 1),
    }


def probe(index_path: Path, emb_path: Path, queries_path: Path, mmap: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.bigindex", "--probe", str(index_path), str(emb_path), str(queries_path),
           "mmap" if mmap else "read"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def latency_ms(index: faiss.Index, queries: np.ndarray, n: int) -> tuple[float, float]:
    fi.set_num_threads(1)
    for q in queries[:10]:
        fi.search(index, q, K)
    lat = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter_ns()
        fi.search(index, queries[i % len(queries)], K)
        lat[i] = (time.perf_counter_ns() - t0) / 1e6
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def run_size(n: int, args: argparse.Namespace, tmp: Path) -> tuple[list[dict], dict | None]:
    print(f"\n== {n:,} items x {args.dim}-d", flush=True)
    t0 = time.perf_counter()
    items, queries = make_data(n, 2 * args.queries, args.dim, args.seed, 1000, 0.5, 0.8, 1.0)
    tune_q, gate_q = queries[: args.queries], queries[args.queries :]
    fi.set_num_threads(args.threads)
    truth = fi.exact_search(items, gate_q, K)
    print(f"   data + exact truth: {time.perf_counter() - t0:.1f}s", flush=True)
    emb_path, q_path = tmp / f"emb{n}.npy", tmp / f"q{n}.npy"
    np.save(emb_path, items)
    np.save(q_path, gate_q[: args.probe_queries])
    nl = fi.auto_nlist(n)
    rows: list[dict] = []
    shard_row = None
    for tmpl in args.configs:
        factory = tmpl.format(nl=nl)
        if factory.startswith("HNSW") and n > args.hnsw_max:
            continue
        gc.collect()
        fi.set_num_threads(args.threads)
        t0 = time.perf_counter()
        template = fi.train_index(items, factory, build_params={"seed": args.seed})
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = faiss.clone_index(template) if factory == args.shard_config.format(nl=nl) else template
        for s in range(0, n, 65_536):
            index.add(items[s : s + 65_536])
        add_s = time.perf_counter() - t0
        tuned, tune_rec = fi.tune_search_params(index, items, tune_q, K, TARGET)
        rec = fi.measure_recall(index, items, gate_q, K, truth=truth)
        bare = None
        if fi.is_refined(index):  # the same index without re-ranking: k_factor 1 is the bare base ranking
            fi.apply_search_params(index, {"k_factor": 1})
            bare = round(fi.measure_recall(index, items, gate_q, K, truth=truth), 4)
            fi.apply_search_params(index, tuned)
        p50, p99 = latency_ms(index, gate_q, args.latency_queries)
        path = tmp / "index.faiss"
        fi.write_index(index, path)
        size_mib = path.stat().st_size / 2**20
        mem_read = probe(path, emb_path, q_path, mmap=False)
        mem_mmap = probe(path, emb_path, q_path, mmap=True)
        row = {
            "n": n, "dim": args.dim, "factory": factory, "search_params": tuned, "train_s": round(train_s, 1),
            "add_s": round(add_s, 1), "build_s": round(train_s + add_s, 1), "index_mib": round(size_mib, 1),
            "bytes_per_vector": round(path.stat().st_size / n, 1), f"recall@{K}": round(rec, 4),
            "tune_recall": round(tune_rec, 4), "recall_without_refine": bare, "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
            "rss_read": mem_read, "rss_mmap": mem_mmap,
        }
        rows.append(row)
        print(f"-- {factory}: train {train_s:.1f}s add {add_s:.1f}s, {size_mib:.0f} MiB, {tuned} recall@{K} {rec:.4f} "
              f"p50 {p50:.3f} ms | search process: read {mem_read} | mmap {mem_mmap}", flush=True)
        if factory == args.shard_config.format(nl=nl):
            shard_row = shard_timing(template, index, items, gate_q, tuned, n)
        path.unlink()
        del index, template
    return rows, shard_row


def shard_timing(template: faiss.Index, single: faiss.Index, items: np.ndarray, queries: np.ndarray,
                 params: dict, n: int) -> dict:
    """The add step in 2 shards / 2 threads over the same trained index, against one process."""
    fi.set_num_threads(2)
    t0 = time.perf_counter()
    merged = sharded.build_sharded(items, "", n_shards=2, workers=2, template=template, search_params=params)
    sharded_s = time.perf_counter() - t0
    same = bool(np.array_equal(fi.search(merged, queries, K)[1], fi.search(single, queries, K)[1]))
    print(f"   sharded add (2 shards, 2 threads): {sharded_s:.1f}s, identical results: {same}", flush=True)
    return {"n": n, "factory": None, "sharded_add_s": round(sharded_s, 1), "shards": 2, "workers": 2, "identical": same}


def _bare(r: dict) -> str:
    return f" ({r['recall_without_refine']:.4f})" if r.get("recall_without_refine") is not None else ""


def render_md(report: dict) -> str:
    a, facts = report["args"], report["machine"]
    L = [
        "# Large-catalog index benchmark (quantized + re-ranked)", "",
        "Generated by `bench/bigindex.py` from `bigindex.json`; do not edit by hand.", "",
        "Reproduce with:", "", "```", report["command"], "```", "",
        f"Machine: {facts['cpu']}, {facts['usable_cpus']} usable CPUs, faiss {facts['faiss']}, numpy {facts['numpy']}; "
        f"shared with other jobs (load average at the end {facts['loadavg_at_end']}). Wall time {report['wall_s'] / 60:.1f} min.",
        "",
        f"Data: `bench.index.make_data` ({a['dim']}-d, calibrated against a trained model, docs/bench/index.md). "
        f"Search parameters tuned like `indexer rebuild` does (`tune_search_params`, target recall@{K} {TARGET} on "
        f"{a['queries']} queries); recall@{K} measured on {a['queries']} other queries. Build with {a['threads']} threads; "
        f"latency: 1 thread, one query per call through `faiss_index.search` ({a['latency_queries']} calls). "
        "Search process: a fresh Python process reads index.faiss (`read`: plain, `mmap`: `faiss_index.read_index(mmap=True)`: `IO_FLAG_MMAP_IFC`), memory-maps "
        f"embeddings.npy, answers {a['probe_queries']} queries and re-scores their candidates from embeddings.npy; "
        "its RSS growth over an idle Python + FAISS process, split into private memory (anon) and file-backed pages "
        "(file: page cache, shared by all workers, evictable). `ids MiB`: the Python list of item ids the service "
        "holds today (measured in the same process; its memory-mapped replacement is a separate change).",
        "",
        f"| items | factory | tuned params | train s | add s | index MiB | B/vector | recall@{K} (k_factor 1) | p50 ms | p99 ms | "
        "read: RSS MiB (anon / file) | mmap: RSS MiB (anon / file) | ids MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        sp = ", ".join(f"{k}={v}" for k, v in r["search_params"].items()) or "—"

        def mem(m: dict) -> str:
            return m.get("error", "")[:60] if "error" in m else f"{m['served_rss_mib']:,.0f} ({m['served_anon_mib']:,.0f} / {m['served_file_mib']:,.0f})"

        ids = r["rss_read"].get("ids_list_mib", "")
        L.append(f"| {r['n']:,} | `{r['factory']}` | {sp} | {r['train_s']} | {r['add_s']} | {r['index_mib']:,.0f} | "
                 f"{r['bytes_per_vector']} | {r[f'recall@{K}']:.4f}{_bare(r)} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                 f"{mem(r['rss_read'])} | {mem(r['rss_mmap'])} | {ids} |")
    if report.get("sharded"):
        L += ["", "Sharded add (`indexer.sharded.build_sharded`, same trained index, 2 contiguous shards, 2 threads) "
              "against the one-process add of the same configuration:", "",
              "| items | factory | one-process add s | sharded add s | identical search results |", "|---:|---|---:|---:|---|"]
        for s in report["sharded"]:
            L.append(f"| {s['n']:,} | `{s['factory']}` | {s['single_add_s']} | {s['sharded_add_s']} | {s['identical']} |")
    L += ["", report.get("notes", ""), ""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--probe":
        index_path, emb_path, q_path, mode = argv[1:5]
        print(json.dumps(serve_probe(index_path, emb_path, q_path, mode == "mmap", K)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="factory strings; {nl} = auto nlist")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=500, help="tuning queries, and as many gate queries")
    p.add_argument("--latency-queries", type=int, default=500)
    p.add_argument("--probe-queries", type=int, default=300)
    p.add_argument("--hnsw-max", type=int, default=1_000_000, help="skip HNSW above this size (build time)")
    p.add_argument("--shard-config", default="IVF{nl},PQ32x8,Refine(SQ8)")
    p.add_argument("--threads", type=int, default=fi.available_cpus())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="directory for index/embedding files (default: a temp dir)")
    p.add_argument("--append", action="store_true", help="add to the results already in OUT/bigindex.json")
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    results, shards = [], []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in args.sizes:
            rows, shard_row = run_size(n, args, Path(tmp))
            results += rows
            if shard_row:
                shard_row["factory"] = args.shard_config.format(nl=fi.auto_nlist(n))
                shard_row["single_add_s"] = next(r["add_s"] for r in rows if r["factory"] == shard_row["factory"])
                shards.append(shard_row)
    prev_path = out / "bigindex.json"
    prev = json.loads(prev_path.read_text()) if prev_path.is_file() else {}
    cmd = command_line("bench.bigindex", argv)
    report = {
        "command": cmd, "machine": machine_facts(args), "k": K,
        "wall_s": round(time.perf_counter() - t0, 1),
        "args": {k: v for k, v in vars(args).items() if k not in ("tmp", "out", "append")}, "results": results, "sharded": shards,
    }
    if args.append and prev:
        report["command"] = prev["command"] + "\n" + cmd
        report["wall_s"] += prev["wall_s"]
        report["results"] = prev["results"] + results
        report["sharded"] = prev.get("sharded", []) + shards
    report["notes"] = prev.get("notes", "")  # the hand-written reading survives reruns
    out.mkdir(parents=True, exist_ok=True)
    (out / "bigindex.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bigindex.md").write_text(render_md(report))
    print(f"\nwrote {out}/bigindex.md, bigindex.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
