"""Training throughput against catalog size: examples/s and peak RSS of `trainer fit`'s loop.

For each catalog size (same users, same interactions: `prepare_synthetic(users, items=N,
interactions, seed)`), each repository checkout (`--repo LABEL=PATH`, e.g. main's code as
"before" and this checkout as "after") runs `fit(..., full=True)` with the default config in a
fresh subprocess, limited to `--warmup + --steps` steps of its one epoch (a fixed number of
steps, not an epoch: a step's cost is what grows or not with the catalog). The subprocess
reports, separately:

* data loading: `read_dataset` seconds and the process's peak RSS after it;
* the training loop: the median step time over the `--steps` timed steps (after `--warmup`),
  examples/s = batch rows / median step, the peak RSS sampled at every step;
* the work after the last step (`post`): the weight average copied in, history baking, the
  cold-start calibration and the bundle write, i.e. the end of `fit`.

Run it as one exclusive job on the shared machine (`cpujob --exclusive python -m bench.train
...`); it writes docs/bench/train.json, the results block of docs/bench/train.md (the prose
around it is kept) and a plot of step time vs catalog size (train_step_time.png). `--costs
SIZES` also times, on this checkout, the O(catalog) pieces outside the step one by one. A size is
skipped for a checkout whose estimated table memory exceeds `--max-gib` (reported as such).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BEGIN, END, command_line, cpu_model, loadavg, splice_results

ROOT = Path(__file__).resolve().parents[1]

# The worker runs inside the checkout under test (PYTHONPATH=that checkout): it may only use what
# both main's and this branch's `training` have (fit, read_dataset, the tqdm of training.train).
WORKER = r"""
import json, os, resource, sys, time, tempfile
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(args["threads"])
import training.train as tt
from training.config import TrainConfig

PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

out = {"steps": [], "rss_loop": 0}
real_read = tt.read_dataset
def timed_read(path):
    t = time.perf_counter()
    d = real_read(path)
    out["load_s"] = time.perf_counter() - t
    out["load_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["n_interactions"] = len(d.interactions)
    out["n_items"] = len(d.items)
    return d
tt.read_dataset = timed_read

class Steps:
    def __init__(self, iterable, **kw):
        self.items = list(iterable)[: args["warmup"] + args["steps"]]
    def __iter__(self):
        out["loop_start"] = time.perf_counter()
        out["rss_loop_start"] = rss()
        last = time.perf_counter()
        for x in self.items:
            yield x
            now = time.perf_counter()
            out["steps"].append(now - last)
            out["rss_loop"] = max(out["rss_loop"], rss())
            last = now
        out["loop_end"] = time.perf_counter()
    def set_postfix(self, **kw): pass
    def close(self): pass
tt.tqdm = Steps

cfg = TrainConfig(full_epochs=1)
t0 = time.perf_counter()
with tempfile.TemporaryDirectory() as models:
    tt.fit(args["data"], models, cfg, full=True, progress=False)
    out["fit_end"] = time.perf_counter()
out["post_s"] = out["fit_end"] - out["loop_end"]
out["batch_size"] = cfg.batch_size
out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
for k in ("loop_start", "loop_end", "fit_end"):
    out.pop(k)
print("RESULT " + json.dumps(out))
"""


# The O(catalog) pieces of a run outside the step, timed one by one on a fresh default model
# (this checkout only): what each epoch adds (validation, hard mining), what a step draws (SSL
# rows, mixed negatives), and the work after training (baking, calibration, the bundle write).
COSTS = r"""
import json, sys, time, tempfile
args = json.loads(sys.argv[1])
import numpy as np, torch
torch.set_num_threads(args["threads"])
from training.alloc import tune_allocator
tune_allocator()
import training.train as tt
from training.config import TrainConfig
from training.dataset import read_dataset
from training.split import split_interactions
from training.evaluate import evaluate_model
from training.cold import calibrate_cold_start
from training.samplers import HardNegativeSampler
from training.ssl import SSLTask
from training.bundle import save_bundle
from training.model import HistoryPooling, TwoTowerModel, bake_history

def timed(f, *a, **k):
    t = time.perf_counter(); r = f(*a, **k); return time.perf_counter() - t, r

cfg = TrainConfig()
ds = read_dataset(args["data"])
split = split_interactions(ds.interactions)
train = split.train
ue, ie = tt.fit_encoders(ds, train, cfg)
model = TwoTowerModel(cfg.model, ue, ie)
data = tt.TrainingData.encode(ds, train, ue, ie, cfg, torch.device("cpu"))
pool = HistoryPooling(data.n_items, cfg.model.id_dim, cfg.history_alpha)
out = {}
model.eval()
def validation():
    with tt.baked_history(model, pool, data.history, data.users["id"]):
        iv = model.item_tower.embed_encoded(data.items).numpy()
        return evaluate_model(model, ds, split, truth_part="val", item_vecs=iv, max_users=cfg.eval_max_users, seed=0)
out["validation_per_epoch_s"], _ = timed(validation)
uv, iv = tt.model_vectors(model, data.users, data.items)
hard = HardNegativeSampler(data.n_items, data.pos_keys.numpy(), *cfg.hard_rank_band)
out["hard_mining_per_epoch_s"], _ = timed(hard.refresh, uv, iv)
g = torch.Generator().manual_seed(0)
ssl = SSLTask(data.items, augmentation="random", batch_size=cfg.ssl_batch_size)
t, _ = timed(lambda: [ssl.sample_items(g) for _ in range(100)])
out["ssl_draw_per_step_ms"] = t * 10
t, _ = timed(lambda: [torch.randint(data.n_items, (1024,), generator=g) for _ in range(100)])
out["mixed_negatives_draw_per_step_ms"] = t * 10
t, pooled = timed(pool.pooled_all, data.history)
t2, _ = timed(bake_history, model.user_tower, data.users["id"], pooled)
out["history_baking_s"] = t + t2
ku, ki = data.user_index.get_indexer(train["user_id"]), data.item_index.get_indexer(train["item_id"])
out["cold_calibration_s"], _ = timed(calibrate_cold_start, model.user_tower, model.item_tower, data.users, data.items, ku, ki,
                                     steps=cfg.cold_calibration_steps, temperature=cfg.cold_calibration_temperature)
with tempfile.TemporaryDirectory() as d:
    counts = {str(i): int(c) for i, c in zip(data.item_index, data.counts, strict=True) if c > 0}
    out["bundle_write_s"], _ = timed(save_bundle, model, d, train_config=cfg.to_dict(), schema=ds.schema.to_json(),
                                     item_counts=counts, data_fingerprint=ds.fingerprint(), metrics={}, full=True)
print("RESULT " + json.dumps({k: round(v, 3) for k, v in out.items()}))
"""


def table_gib(n_items: int, n_users: int, dense: bool) -> float:
    """Rough memory of the id + history tables with their optimizer state and average: 64-wide
    float32 rows; weights, Adam's two moments and the EMA shadow, plus the dense gradient and
    the swap copy on the dense (main) path."""
    copies = 6 if dense else 4
    return (2 * n_items + n_users) * 64 * 4 * copies / 2**30


def ensure_data(root: Path, n_items: int, users: int, interactions: int, seed: int) -> tuple[Path, dict]:
    path = root / f"synthetic_u{users}_i{n_items}_n{interactions}_s{seed}"
    info = {}
    if not path.exists():
        from training.prepare import prepare_synthetic

        t = time.perf_counter()
        prepare_synthetic(path, users, n_items, interactions, seed)
        info["prepare_s"] = round(time.perf_counter() - t, 1)
    return path, info


def run_worker(repo: Path, data: Path, threads: int, warmup: int, steps: int, code: str = WORKER) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS=str(threads))
    args = json.dumps({"data": str(data), "threads": threads, "warmup": warmup, "steps": steps})
    proc = subprocess.run([sys.executable, "-c", code, args], cwd=repo, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"}


def summarize(r: dict, warmup: int) -> dict:
    if "error" in r:
        return r
    timed = sorted(r["steps"][warmup:])
    med = timed[len(timed) // 2]
    return {
        "step_ms": round(med * 1000, 2),
        "examples_per_s": round(r["batch_size"] / med),
        "loop_peak_rss_gib": round(r["rss_loop"] / 2**30, 2),
        "loop_start_rss_gib": round(r["rss_loop_start"] / 2**30, 2),
        "load_s": round(r["load_s"], 2),
        "load_peak_rss_gib": round(r["load_peak_rss"] / 2**30, 2),
        "post_s": round(r["post_s"], 2),
        "peak_rss_gib": round(r["peak_rss"] / 2**30, 2),
        "n_interactions": r["n_interactions"],
        "n_items": r["n_items"],
    }


def plot(results: dict, sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in results.items():
        xs = [n for n in sizes if "step_ms" in rows.get(str(n), {})]
        ax.plot(xs, [rows[str(n)]["step_ms"] for n in xs], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("catalog items")
    ax.set_ylabel("median step time (ms), batch 1024")
    ax.set_title("trainer fit: step time vs catalog size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", action="append", default=[], help="LABEL=PATH of a checkout to measure (default: after=.)")
    p.add_argument("--sizes", default="10000,100000,1000000,10000000")
    p.add_argument("--users", type=int, default=20000)
    p.add_argument("--interactions", type=int, default=100000)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-gib", type=float, default=12.0, help="skip a run whose tables would need more (shared machine)")
    p.add_argument("--data-root", default=str(Path(tempfile.gettempdir()) / "bench_train"))
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "train"))
    p.add_argument("--costs", default="", help="sizes at which to time the O(catalog) pieces outside the step (this checkout)")
    a = p.parse_args(argv)
    repos = [r.split("=", 1) for r in a.repo] or [["after", str(ROOT)]]
    sizes = [int(s) for s in a.sizes.split(",")]
    root = Path(a.data_root)
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {label: {} for label, _ in repos}
    data_info = {}
    for n in sizes:
        data, info = ensure_data(root, n, a.users, a.interactions, a.seed)
        data_info[str(n)] = info
        for label, repo in repos:
            dense = label != "after"
            need = table_gib(n, a.users, dense)
            if need > a.max_gib:
                results[label][str(n)] = {"skipped": f"tables would need ~{need:.1f} GiB > --max-gib {a.max_gib}"}
                print(f"{label:>7} {n:>10,} items: skipped (~{need:.1f} GiB)", flush=True)
                continue
            r = summarize(run_worker(Path(repo), data, a.threads, a.warmup, a.steps), a.warmup)
            results[label][str(n)] = r
            print(f"{label:>7} {n:>10,} items: {r}", flush=True)
    costs = {}
    for n in [int(x) for x in a.costs.split(",") if x]:
        data, _ = ensure_data(root, n, a.users, a.interactions, a.seed)
        costs[str(n)] = run_worker(ROOT, data, a.threads, 0, 0, COSTS)
        print(f"  costs {n:>10,} items: {costs[str(n)]}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "cpujob --exclusive " + command_line("bench.train", argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_model(), "threads": a.threads, "loadavg_end": loadavg(),
        "users": a.users, "interactions": a.interactions, "seed": a.seed, "warmup": a.warmup, "steps": a.steps,
        "repos": dict(repos), "data": data_info, "results": results, "costs": costs,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, sizes, out.with_name(out.name + "_step_time.png"))
    lines = [
        "| checkout | items | step ms (median) | examples/s | loop peak RSS GiB | load s | load peak RSS GiB | post-loop s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, rows in results.items():
        for n in sizes:
            r = rows.get(str(n), {})
            if "step_ms" in r:
                lines.append(f"| {label} | {n:,} | {r['step_ms']} | {r['examples_per_s']:,} | {r['loop_peak_rss_gib']} | "
                             f"{r['load_s']} | {r['load_peak_rss_gib']} | {r['post_s']} |")
            else:
                lines.append(f"| {label} | {n:,} | {r.get('skipped') or r.get('error')} | | | | | |")
    if costs:
        names = sorted({k for c in costs.values() for k in c})
        lines += ["", "| items | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        lines += [f"| {int(n):,} | " + " | ".join(str(c.get(k, "")) for k in names) + " |" for n, c in costs.items()]
    table = "\n".join(lines)
    print(table)
    block = f"`{report['command']}`\n\nCPU: {report['cpu']}, {a.threads} threads; load average at the end {report['loadavg_end']}.\n\n{table}\n"
    md = out.with_suffix(".md")
    text = md.read_text() if md.exists() else f"# Training throughput vs catalog size\n\n{BEGIN}\n{END}\n"
    md.write_text(splice_results(text, block) or text + f"\n{BEGIN}\n{block}{END}\n")


if __name__ == "__main__":
    main()
