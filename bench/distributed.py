"""Data-parallel training on CPU: examples/s of `trainer fit`'s step on 1 rank against 2 ranks.

Each run is a fresh `fit(..., full=True)` with the default config (global batch 1024) on one
synthetic dataset, limited to `--warmup + --steps` steps of its one epoch; the reported figure is
the median step time after the warm-up and examples/s = global batch / median step. Variants:

* `1 rank x T threads` — plain `python`, one process (`ONE_PROCESS`);
* `2 ranks x 1 thread` — `torchrun --standalone --nproc_per_node=2` (gloo), each rank 512 rows
  of every global batch, item vectors gathered with autograd, DDP + the sparse-gradient sync;
* `1 rank x 1 thread, batch 512` — one process on one rank's share of the rows: what a rank
  would cost without the other rank (its logits are 512 x (512 + M) instead of 512 x (1024 + M)),
  the reference that puts a number on the distributed step's overhead.

Variants are interleaved `--repeats` times (A B C A B C ...) so load drift on the shared
machine hits all alike. On a 2-core machine two ranks cannot beat one process using both cores:
the run shows that the distributed step works and what its collectives cost, not a speed-up.
The figures on a GPU machine (NCCL, 1 GPU per rank) need such a machine; none was used here.

Run as one exclusive job: `cpujob --exclusive python -m bench.distributed`; it writes
docs/bench/distributed.json and the results block of docs/bench/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BEGIN, END, command_line, cpu_model, loadavg, splice_results

ROOT = Path(__file__).resolve().parents[1]


def worker(args: dict) -> None:
    """One run (inside plain python or a torchrun rank): fit with the step loop cut short."""
    import torch

    torch.set_num_threads(args["threads"])
    import training.train as tt
    from training.config import TrainConfig
    from training.distributed import session

    times: list[float] = []

    class Timed:  # stands in for tqdm: yields the first warmup + steps batches and times each
        def __init__(self, iterable, **kw) -> None:
            self.items = list(iterable)[: args["warmup"] + args["steps"]]

        def __iter__(self):
            last = time.perf_counter()
            for x in self.items:
                yield x
                now = time.perf_counter()
                times.append(now - last)
                last = now

        def set_postfix(self, **kw) -> None:
            pass

        def close(self) -> None:
            pass

    tt.tqdm = Timed
    cfg = TrainConfig(full_epochs=1, cold_calibration_steps=0, batch_size=args["batch"])
    with session("cpu") as ranks, tempfile.TemporaryDirectory() as models:
        tt.fit(args["data"], models, cfg, full=True, progress=False, ranks=ranks)
        if ranks.is_main:
            step = statistics.median(times[args["warmup"] :])
            print("RESULT " + json.dumps({"world": ranks.world, "batch": cfg.batch_size, "step_s": step,
                                          "steps": len(times) - args["warmup"]}))


def run(variant: dict, data: Path, warmup: int, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(variant["threads"]))
    args = json.dumps({"data": str(data), "threads": variant["threads"], "warmup": warmup, "steps": steps,
                       "batch": variant.get("batch", 1024)})
    launch = [sys.executable] if variant["ranks"] == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={variant['ranks']}"]
    proc = subprocess.run([*launch, "-m", "bench.distributed", "--worker", args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] }"}


def ok_batch(rs: list[dict]) -> int:
    return next(r["batch"] for r in rs if "batch" in r)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--interactions", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-root", default=str(Path(tempfile.gettempdir()) / "bench_distributed"))
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "distributed"))
    a = p.parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return
    data = Path(a.data_root) / f"synthetic_u{a.users}_i{a.items}_n{a.interactions}_s{a.seed}"
    if not data.exists():
        from training.prepare import prepare_synthetic

        prepare_synthetic(data, a.users, a.items, a.interactions, a.seed)
    variants = {
        "1 rank x 1 thread": {"ranks": 1, "threads": 1},
        "2 ranks x 1 thread": {"ranks": 2, "threads": 1},
        "1 rank x 2 threads": {"ranks": 1, "threads": 2},
        "1 rank x 1 thread, batch 512": {"ranks": 1, "threads": 1, "batch": 512},
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for rep in range(a.repeats):
        for name, v in variants.items():
            r = run(v, data, a.warmup, a.steps)
            runs[name].append(r)
            print(f"repeat {rep + 1} {name}: {r}", flush=True)
    summary = {}
    for name, rs in runs.items():
        ok = [r["step_s"] for r in rs if "step_s" in r]
        if not ok:
            summary[name] = {"error": rs[0].get("error")}
            continue
        med = statistics.median(ok)
        summary[name] = {"step_ms": round(med * 1000, 1), "examples_per_s": round(ok_batch(rs) / med),
                         "runs_step_ms": [round(x * 1000, 1) for x in ok]}
    base = summary.get("1 rank x 1 thread", {}).get("examples_per_s")
    for s in summary.values():
        if base and "step_ms" in s:
            s["vs_1_rank_1_thread"] = round(s["examples_per_s"] / base, 2)  # throughput ratio
    report = {
        "command": "cpujob --exclusive " + command_line("bench.distributed", argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_model(), "usable_cpus": len(os.sched_getaffinity(0)), "loadavg_end": loadavg(),
        "data": {"users": a.users, "items": a.items, "interactions": a.interactions, "seed": a.seed},
        "warmup": a.warmup, "steps": a.steps, "repeats": a.repeats, "gpu": "none used (CPU machine)",
        "summary": summary, "runs": runs,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| variant | median step ms | examples/s | examples/s vs 1 rank x 1 thread | step ms per repeat |",
             "|---|---:|---:|---:|---|"]
    for name, s in summary.items():
        if "step_ms" in s:
            lines.append(f"| {name} | {s['step_ms']} | {s['examples_per_s']:,} | {s['vs_1_rank_1_thread']}x | "
                         f"{', '.join(map(str, s['runs_step_ms']))} |")
        else:
            lines.append(f"| {name} | {s['error']} | | | |")
    table = "\n".join(lines)
    print(table)
    block = (f"`{report['command']}`\n\nCPU: {report['cpu']} ({report['usable_cpus']} usable); load average at the end "
             f"{report['loadavg_end']}; {a.users:,} users, {a.items:,} items, {a.interactions:,} interactions; "
             f"{a.warmup} warm-up + {a.steps} timed steps, {a.repeats} interleaved repeats.\n\n{table}\n")
    md = out.with_suffix(".md")
    text = md.read_text() if md.exists() else f"# Data-parallel training on CPU\n\n{BEGIN}\n{END}\n"
    md.write_text(splice_results(text, block) or text + f"\n{BEGIN}\n{block}{END}\n")


if __name__ == "__main__":
    main()
