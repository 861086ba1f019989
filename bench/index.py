"""Benchmark of the FAISS index types the indexer can build, on synthetic clustered embeddings.

    python -m bench.index [--sizes 100000 1000000] [--dim 64] [--out docs/bench]

For each catalog size and index configuration it measures build time, memory (serialized index
size and RSS growth), single-query latency p50/p99 (1 thread, one query per call, through
`indexer.faiss_index.search`, i.e. with our checks and per-call parameters), batch throughput
(all queries in one call, `--batch-threads` threads) and recall@k against exact search.
Writes `index.md` (table + the command + machine facts), `index.json` and
`index_recall_latency.png` under `--out`.

Data: real item embeddings are clustered (genres, categories, popularity), and uniform random
vectors on the sphere are the worst case for IVF and a poor proxy. Items are drawn from a
Gaussian mixture with power-law cluster sizes, then L2-normalized; queries are drawn from the
same mixture (held out), as user vectors live in the item space.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from indexer import faiss_index as fi

K = 100
STATS: dict[int, dict] = {}
# The same statistics for the item vectors of a 64-d two-tower model trained on ML-100K with
# the default config (1,682 items), which the generator's defaults were calibrated against.
REFERENCE_STATS = {"pca_var_top10": 0.814, "pca_var_top20": 0.958, "mean_vector_norm": 0.498,
                   "pairwise_cos_mean": 0.248, "pairwise_cos_std": 0.353, "nn_cos_median": 0.906}


@dataclass
class Config:
    name: str
    factory: str
    build_params: dict = field(default_factory=dict)
    sweep: tuple[str, list[int]] | None = None  # search parameter name, values


def configs_for(n: int) -> list[Config]:
    """Index configurations per catalog size (nlist ~ 1-4 sqrt(n), FAISS's usual advice)."""
    ef = ("efSearch", [100, 128, 192, 256, 512])
    probes = ("nprobe", [4, 8, 16, 32, 64, 128])
    small_ivf, big_ivf = (256, 1024) if n <= 200_000 else (1024, 4096)
    return [
        Config("Flat", "Flat"),
        Config("HNSW32", "HNSW32", {"efConstruction": 40}, ef),
        Config("HNSW16", "HNSW16", {"efConstruction": 40}, ef),
        Config(f"IVF{small_ivf},Flat", f"IVF{small_ivf},Flat", {}, probes),
        Config(f"IVF{big_ivf},Flat", f"IVF{big_ivf},Flat", {}, probes),
        Config(f"IVF{small_ivf},PQ32x8", f"IVF{small_ivf},PQ32x8", {}, probes),
    ]


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


def embedding_stats(x: np.ndarray, sample: int = 1682, seed: int = 0) -> dict:
    """Shape statistics of a set of unit vectors (on a sample the size of the ML-100K catalog)."""
    rng = np.random.default_rng(seed)
    v = x[np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))].astype(np.float64)
    sv = np.linalg.svd(v - v.mean(0), compute_uv=False) ** 2
    ev = np.cumsum(sv) / sv.sum()
    cos = v @ v.T
    iu = np.triu_indices(len(v), 1)
    np.fill_diagonal(cos, -np.inf)
    return {
        "pca_var_top10": round(float(ev[9]), 3), "pca_var_top20": round(float(ev[19]), 3),
        "mean_vector_norm": round(float(np.linalg.norm(v.mean(0))), 3),
        "pairwise_cos_mean": round(float(cos[iu].mean()), 3), "pairwise_cos_std": round(float(cos[iu].std()), 3),
        "nn_cos_median": round(float(np.median(cos.max(1))), 3),
    }


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def index_bytes(index: faiss.Index) -> int:
    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name)


def recall(rows: np.ndarray, truth_rows: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(r[r >= 0], t)) for r, t in zip(rows, truth_rows, strict=True))
    return hits / truth_rows.size


def single_query_latency(index: faiss.Index, queries: np.ndarray, n: int) -> tuple[float, float]:
    faiss.omp_set_num_threads(1)
    for q in queries[:10]:  # warm-up
        fi.search(index, q, K)
    lat = np.empty(n)
    for i in range(n):
        q = queries[i % len(queries)]
        t0 = time.perf_counter_ns()
        fi.search(index, q, K)
        lat[i] = (time.perf_counter_ns() - t0) / 1e6
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def batch_qps(index: faiss.Index, queries: np.ndarray, threads: int) -> float:
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    fi.search(index, queries, K)
    return len(queries) / (time.perf_counter() - t0)


def run_size(n: int, args: argparse.Namespace) -> list[dict]:
    print(f"\n== {n:,} items x {args.dim}-d: generating data ...", flush=True)
    items, queries = make_data(n, args.queries, args.dim, args.seed, args.clusters, args.spread, args.alpha, args.offset)
    stats = embedding_stats(items)
    print(f"   data shape: {stats}", flush=True)
    STATS[n] = stats
    faiss.omp_set_num_threads(args.build_threads)
    t0 = time.perf_counter()
    truth_scores, truth_rows = fi.exact_search(items, queries, K)
    print(f"   exact ground truth for {len(queries)} queries: {time.perf_counter() - t0:.1f}s", flush=True)
    rows_out: list[dict] = []
    for cfg in configs_for(n):
        if args.only and not any(s in cfg.name for s in args.only):
            continue
        gc.collect()
        rss0 = rss_bytes()
        faiss.omp_set_num_threads(args.build_threads)
        t0 = time.perf_counter()
        index = fi.build_index(items, cfg.factory, build_params=cfg.build_params)
        build_s = time.perf_counter() - t0
        gc.collect()
        rss_delta = rss_bytes() - rss0
        size = index_bytes(index)
        print(f"-- {cfg.name}: build {build_s:.1f}s, {size / 2**20:.0f} MiB serialized, RSS +{rss_delta / 2**20:.0f} MiB", flush=True)
        values = cfg.sweep[1] if cfg.sweep else [None]
        for v in values:
            params = {cfg.sweep[0]: v} if cfg.sweep else {}
            if cfg.sweep and cfg.sweep[0] == "nprobe" and v > index.nlist:
                continue
            fi.apply_search_params(index, params)
            faiss.omp_set_num_threads(args.batch_threads)
            _, rows = fi.search(index, queries, K)
            rec = recall(rows, truth_rows)
            n_lat = args.latency_queries if cfg.factory != "Flat" else max(50, args.latency_queries // 10)
            p50, p99 = single_query_latency(index, queries, n_lat)
            qps = batch_qps(index, queries, args.batch_threads)
            row = {
                "n": n, "dim": args.dim, "index": cfg.name, "factory": cfg.factory, "build_params": cfg.build_params,
                "search_params": params, "build_s": round(build_s, 2), "index_mib": round(size / 2**20, 1),
                "rss_delta_mib": round(rss_delta / 2**20, 1), "p50_ms": round(p50, 4), "p99_ms": round(p99, 4),
                "batch_qps": round(qps, 1), f"recall@{K}": round(rec, 4), "latency_queries": n_lat,
            }
            rows_out.append(row)
            print(f"   {str(params or ''):>18}  recall@{K} {rec:.4f}  p50 {p50:.3f} ms  p99 {p99:.3f} ms  batch {qps:,.0f} q/s", flush=True)
        del index
    return rows_out


def machine_facts(args: argparse.Namespace) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu, "usable_cpus": fi.available_cpus(), "python": platform.python_version(),
        "faiss": faiss.__version__, "numpy": np.__version__, "platform": platform.platform(),
        "loadavg_at_end": [round(x, 2) for x in load] if load else None,
    }


def write_report(rows: list[dict], args: argparse.Namespace, facts: dict, wall_s: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m bench.index " + " ".join(sys.argv[1:])
    (out / "index.json").write_text(json.dumps({"command": cmd, "machine": facts, "k": K, "wall_s": round(wall_s, 1),
                                                "data_stats": {str(n): v for n, v in STATS.items()},
                                                "reference_stats": REFERENCE_STATS,
                                                "args": vars(args), "results": rows}, indent=2) + "\n")
    plot(rows, out / "index_recall_latency.png")
    lines = [
        "# Index benchmark",
        "",
        "Generated by `bench/index.py`; do not edit by hand. Reproduce with:",
        "",
        "```",
        cmd.strip(),
        "```",
        "",
        f"Machine: {facts['cpu']}, {facts['usable_cpus']} usable CPUs, faiss {facts['faiss']}, numpy {facts['numpy']}, "
        f"Python {facts['python']}. Load average at the end: {facts['loadavg_at_end']}. Wall time {wall_s / 60:.1f} min.",
        "",
        f"Data: {args.dim}-d unit vectors from a Gaussian mixture ({args.clusters} clusters, power-law sizes, "
        f"spread {args.spread}, spectrum decay alpha {args.alpha}, offset {args.offset}), {args.queries} held-out "
        f"queries from the same distribution, k = {K}. Build with {args.build_threads} threads; single-query latency "
        f"with 1 thread, one query per call through `indexer.faiss_index.search` (p50/p99 over {args.latency_queries} "
        f"calls, Flat over fewer); batch throughput = all queries in one call with {args.batch_threads} threads. "
        f"Recall@{K} against exact search.",
        "",
        "Uniform random vectors are the worst case for every ANN index and look nothing like trained embeddings, "
        "so the generator is calibrated against the item vectors of a 64-d model trained on ML-100K "
        "(statistics on a 1,682-vector sample):",
        "",
        "| statistic | " + " | ".join(f"synthetic {n:,}" for n in STATS) + " | ML-100K model |",
        "|---|" + "---:|" * (len(STATS) + 1),
        *[f"| {key} | " + " | ".join(str(STATS[n][key]) for n in STATS) + f" | {REFERENCE_STATS[key]} |"
          for key in REFERENCE_STATS],
        "",
        "| items | index | search params | build s | index MiB | RSS +MiB | p50 ms | p99 ms | batch q/s | recall@100 |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sp = ", ".join(f"{k}={v}" for k, v in r["search_params"].items()) or "—"
        lines.append(f"| {r['n']:,} | {r['index']} | {sp} | {r['build_s']} | {r['index_mib']} | {r['rss_delta_mib']} | "
                     f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['batch_qps']:,.0f} | {r[f'recall@{K}']:.4f} |")
    lines += ["", "![recall vs latency](index_recall_latency.png)", ""]
    (out / "index.md").write_text("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.8), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        for name in dict.fromkeys(r["index"] for r in rows if r["n"] == n):
            pts = [r for r in rows if r["n"] == n and r["index"] == name]
            ax.plot([p["p50_ms"] for p in pts], [p[f"recall@{K}"] for p in pts], marker="o", label=name)
            for p in pts:
                if p["search_params"]:
                    ax.annotate(str(next(iter(p["search_params"].values()))), (p["p50_ms"], p[f"recall@{K}"]),
                                fontsize=7, xytext=(3, -8), textcoords="offset points")
        ax.axhline(0.95, color="grey", lw=0.8, ls="--")
        ax.axvline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("single-query latency p50 (ms, 1 thread, log)")
        ax.set_ylabel(f"recall@{K} vs exact")
        ax.set_title(f"{n:,} items")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.index", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000, help="held-out queries (recall, batch)")
    p.add_argument("--latency-queries", type=int, default=1000, help="single-query calls timed per setting")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.5, help="within-cluster std relative to the centres' (default 0.5)")
    p.add_argument("--alpha", type=float, default=0.8, help="spectrum decay: latent dim j scaled by j^-alpha (default 0.8)")
    p.add_argument("--offset", type=float, default=1.0, help="common offset of all vectors (default 1.0)")
    p.add_argument("--build-threads", type=int, default=fi.available_cpus())
    p.add_argument("--batch-threads", type=int, default=min(2, fi.available_cpus()))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="only configurations whose name contains one of these")
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows: list[dict] = []
    for n in args.sizes:
        rows += run_size(n, args)
    wall = time.perf_counter() - t0
    write_report(rows, args, machine_facts(args), wall)
    print(f"\nwrote {args.out}/index.md, index.json, index_recall_latency.png ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

