"""Serving benchmark: `uvicorn service.app:app` on a 1M-item HNSW catalog, driven by `wrk`.

    python -m bench.serve                       # full run: 1,000,000 items (builds once, ~5 min)
    python -m bench.serve --items 50000 --duration 5 --out /tmp/b.json --md /tmp/b.md   # smoke
    python -m bench.serve --ef-search k20 --in-process   # CPU µs per request, no wrk (see 5.)

What it does (docs/bench/serve.md has the results and their reading):

1. **Catalog** (cached under `--root`, rebuilt with `--rebuild`; ~10 min at 1M items on 2 cores):
   the production pipeline — `trainer prepare synthetic` with `--items` items (20k users, 150k
   clicks), `trainer fit --full` (default architecture: 64-d, 256-unit MLP; 2 epochs), then
   `indexer rebuild --index HNSW32`, which embeds every item, builds the graph, tunes efSearch
   to its recall@100 >= 0.95 gate and switches `INDEX_ROOT/current`. Also recorded: the efSearch
   that reaches recall@20 >= 0.95 (what these k=20 requests need), see `--ef-search`.
2. **Server**: a `redis-server` on a free loopback port and `python -m service.run` with
   `--workers` uvicorn processes under gunicorn, each on its own SO_REUSEPORT listener
   (`--supervisor uvicorn`: `uvicorn --workers` and its one shared socket instead;
   `--supervisor gunicorn`: the bare `gunicorn --reuse-port` command line with uvicorn's h11
   worker), configured only through `SERVICE_*` variables. The worker CPU split per scenario shows whether the load reached every worker.
3. **Load**: `wrk` (Lua scripts for the POST bodies) at `--connections` connections, one warm-up
   then one measured run per scenario:
   - `healthz`: GET /healthz — the framework ceiling of the same server;
   - `retrieve_hit`: POST /retrieve, 256 users whose vectors are cached in Redis;
   - `retrieve_miss`: POST /retrieve, every request a new user id and new features;
   - `retrieve_redis_down`: the cache-hit bodies with redis-server killed (breaker open);
   - `batch`: POST /retrieve/batch with `--batch` new users per call;
   - `filter50` ... `filter0.01` (not in the default list; docs/bench/filters.md): the cache-hit
     users with an attribute filter of selectivity 50 %, 10 %, 1 %, 0.1 %, 0.01 % (half of the
     bodies a `brand` value of that share, half a `u` window of that width, each its own), their
     recall@20 against the exact filtered top-20 on 64 probes, and the strategy the service's
     rule picks;
   - `retrieve_miss_swaps`: `retrieve_miss` while `INDEX_ROOT/current` switches between two
     versions every `--swap-every` seconds (a second version is built once from the same
     bundle); reports each worker's reload cost from the server log. With `--server-repo` the
     server runs another checkout's code: before/after figures in one run (docs/bench/swap.md).
   Before each scenario a probe checks the `cached` flag is what the scenario claims.
4. **Report**: throughput and p50/p95/p99/max latency per scenario (wrk's numbers), the targets
   (miss p99 <= 15 ms; /retrieve >= 40% of /healthz throughput), machine facts (cores, load
   average before and after: the machine may be shared) to `--out` (JSON) and `--md`. Also per
   scenario: the CPU time the uvicorn processes, redis-server and wrk used per request (from
   /proc and getrusage). On a dedicated box the cores are the bottleneck and
   cpu(healthz) / cpu(retrieve) ("CPU share") predicts the throughput share; on a shared box it
   moves much less than req/s does.
5. **`--in-process`**: no wrk, no sockets: the app behind uvicorn's HTTP protocol class in this
   process, fed raw requests through a fake transport, with a real redis-server; CPU µs per
   request for healthz / retrieve_miss / retrieve_hit / retrieve_miss_history (a miss that also
   sends 50 history ids: issue 18's +50 % CPU budget), rounds interleaved, min and median. The
   tool for comparing changes on a loaded machine (what the report's "where the time goes" uses).
   `--routes fastapi` registers the JSON POST routes as plain FastAPI routes (without
   service.jsonroute.JSONBodyRoute), `--env SERVICE_REDIS_CLIENT=redis-py` swaps the Redis client:
   the figures that keep those two hand-written pieces.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.common import BEGIN, END, command_line, cpu_model, splice_results

REPO = Path(__file__).resolve().parents[1]

FEATURE_POOL = {"countries": 20, "devices": ["ios", "android", "web"], "interests": 30}
K = 20
HISTORY_CLICKS = 50  # --in-process retrieve_miss_history: clicks per request (EVAL.md warm_fresh sends 50)


# ---- catalog ------------------------------------------------------------------------------------


def random_user(rng: np.random.Generator, user_id: str | None) -> dict:
    """A request body's user: the synthetic dataset's user features (random values)."""
    return {
        "user_id": user_id,
        "features": {
            "age": int(rng.integers(16, 80)),
            "country": f"k{int(rng.integers(0, FEATURE_POOL['countries']))}",
            "device": str(rng.choice(FEATURE_POOL["devices"])),
            "interests": "|".join(f"t{int(t)}" for t in rng.choice(FEATURE_POOL["interests"], 3, replace=False)),
        },
    }


BRANDS, BRAND_EXPONENT = 10_000, 1.0


def add_filter_attributes(data: Path, seed: int) -> None:
    """Two filterable attributes for the filter scenarios (not model features): `brand`, a
    categorical with a power-law (Zipf, exponent 1) distribution over 10,000 values — the top
    value holds ~10 % of the items, rank ~100 ~0.1 %, rank ~1000 ~0.01 % — and `u`, a continuous
    uniform on [0, 1), so a range of width s selects a share s of the catalog."""
    import pandas as pd

    rng = np.random.default_rng(seed + 7)
    items = pd.read_csv(data / "items.csv", dtype=str, keep_default_na=False)
    weights = 1.0 / np.arange(1, BRANDS + 1) ** BRAND_EXPONENT
    items["brand"] = np.char.add("b", rng.choice(BRANDS, len(items), p=weights / weights.sum()).astype(str))
    items["u"] = np.char.mod("%.6f", rng.random(len(items)))
    items.to_csv(data / "items.csv", index=False)
    schema = json.loads((data / "schema.json").read_text())
    schema["item"]["attributes"] = {"brand": {"type": "categorical"}, "u": {"type": "continuous"}}
    (data / "schema.json").write_text(json.dumps(schema, indent=2) + "\n")


# filter scenarios: name -> selectivity (share of the catalog a filter allows)
FILTER_SCENARIOS = {"filter50": 0.5, "filter10": 0.1, "filter1": 0.01, "filter0.1": 0.001, "filter0.01": 0.0001}
RECALL_PROBES = 64


class FilterOracle:
    """The served version's attributes and vectors, in this process: the filters of a scenario
    (half a `brand` value or set of the wanted share — the power-law column — half a `u` window
    of that width at a random offset, each body its own filter) and the exact filtered top-k
    every served answer is compared with (float64 over the allowed rows)."""

    def __init__(self, index_root: Path) -> None:
        from indexer.attributes import AttributeTable
        from indexer.version import read_item_ids, read_manifest

        path = (index_root / "current").resolve()
        manifest = read_manifest(path)
        self.table = AttributeTable.load(path, manifest["attributes"], manifest["count"])
        self.embeddings = np.load(path / "embeddings.npy", mmap_mode="r")
        self.item_ids = read_item_ids(path / "item_ids.txt")
        self.rows = {item: i for i, item in enumerate(self.item_ids)}
        self.index_version = manifest["index_version"]
        brand = self.table.columns["brand"]
        counts = np.bincount(brand.arrays["codes"][brand.arrays["codes"] >= 0], minlength=len(brand.values))
        self.brands = [(brand.values[i], int(counts[i])) for i in np.argsort(-counts, kind="stable")]

    def filters(self, share: float, n: int, rng: np.random.Generator) -> list[dict]:
        target = share * len(self.item_ids)
        best = min(self.brands, key=lambda vc: abs(vc[1] - target))
        if abs(best[1] - target) <= 0.3 * target:
            brand = {"brand": best[0]}
        else:  # the head of the distribution until the share is reached
            chosen, total = [], 0
            for value, count in self.brands:
                chosen.append(value)
                total += count
                if total >= target:
                    break
            brand = {"brand": {"in": chosen}}
        out = []
        for i in range(n):
            lo = float(rng.uniform(0, 1 - share))
            out.append(brand if i % 2 == 0 else {"u": {"gte": round(lo, 6), "lte": round(lo + share, 6)}})
        return out

    def exact(self, filt: dict, vec: np.ndarray, k: int) -> tuple[set[str], int]:
        from indexer.attributes import parse_filter

        mask = self.table.mask(parse_filter(filt))
        rows = np.flatnonzero(mask)
        scores = self.embeddings.take(rows, axis=0).astype(np.float64) @ vec.astype(np.float64)
        top = rows[np.lexsort((rows, -scores))[:k]]
        return {self.item_ids[r] for r in top}, len(rows)


def service_strategy(allowed: int, n_items: int) -> str:
    """The strategy the service picks for a filter of `allowed` rows (indexer.topk's rule)."""
    from indexer.topk import FILTER_EXACT_FRACTION, FILTER_EXACT_MAX_ROWS

    return "exact" if allowed <= max(FILTER_EXACT_MAX_ROWS, FILTER_EXACT_FRACTION * n_items) else "ann"


def build_catalog(root: Path, n_items: int, seed: int, log) -> dict:  # noqa: ANN001
    """The production pipeline at `n_items`: prepare synthetic → trainer fit → indexer rebuild.

    Items beyond the clicked ones are out of the trained id vocabulary and get their vector from
    their features (category, tags, price, year), as fresh items do in production.
    """
    from indexer import faiss_index as fi
    from indexer.rebuild import RebuildConfig, rebuild
    from indexer.version import load_version
    from training.numpy_tower import UserRecord
    from training.prepare import prepare_synthetic
    from training.train import TrainConfig, fit

    t0 = time.perf_counter()
    data = prepare_synthetic(
        root / "data", n_users=20_000, n_items=n_items, n_interactions=min(150_000, 30 * n_items), seed=seed
    )
    add_filter_attributes(data, seed)
    log(f"dataset with {n_items} items in {time.perf_counter() - t0:.0f}s")
    t1 = time.perf_counter()
    cfg = TrainConfig(epochs=2, full_epochs=2, eval_max_users=1000, seed=seed)
    bundle_path = fit(data, root / "models", cfg, full=True, progress=False)
    log(f"model {bundle_path.name} trained in {time.perf_counter() - t1:.0f}s")
    t2 = time.perf_counter()
    result = rebuild(RebuildConfig(model=bundle_path, data=data, out=root / "index", index="HNSW32", progress=False))
    log(f"indexer rebuild in {time.perf_counter() - t2:.0f}s: {result.manifest['index']} recall {result.manifest['recall']}")

    # the bench's requests ask for k=20: which efSearch reaches the same recall target at k=20
    loaded = load_version(result.path)
    tower = loaded.tower
    rng = np.random.default_rng(seed + 1)
    users = [random_user(rng, f"u{i}") for i in range(1000)]
    queries = tower.embed([UserRecord(u["user_id"], tower.validate(u["features"])) for u in users])
    emb = np.asarray(loaded.embeddings)
    ef20, recall20 = fi.tune_search_params(loaded.index, emb, queries[:500], k=K, target=0.95)
    held20 = fi.measure_recall(loaded.index, emb, queries[500:], k=K)
    log(f"for k={K}: {ef20} reaches recall@{K} {recall20:.3f} (tuning) / {held20:.3f} (held out)")
    m = result.manifest
    info = {
        "items": n_items, "dim": m["dim"], "factory": m["index"]["factory"], "search_params": m["index"]["search_params"],
        "recall": m["recall"], f"search_params_k{K}": ef20, f"recall@{K}_at_k{K}_params": round(held20, 4),
        "rebuild_timings_s": result.timings, "model_version": m["model_version"], "index_version": m["index_version"],
    }
    (root / "catalog.json").write_text(json.dumps(info, indent=2))
    return info


def ensure_second_version(root: Path, catalog: dict, log) -> None:  # noqa: ANN001
    """`retrieve_miss_swaps` switches between two versions of one model: rebuild the catalog's
    index once more from the same bundle (kept with the cached catalog), `current` unchanged."""
    from indexer import store
    from indexer.rebuild import RebuildConfig, rebuild

    index_root = root / "index"
    if any(v.name != catalog["index_version"] for v in store.list_versions(index_root)):
        return
    t0 = time.perf_counter()
    bundle = root / "models" / catalog["model_version"]
    rebuild(RebuildConfig(model=bundle, data=root / "data", out=index_root, index="HNSW32", progress=False))
    store.switch_current(index_root, catalog["index_version"])
    log(f"second version for the swap scenario built in {time.perf_counter() - t0:.0f}s")


# ---- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            if self.cli("ping") == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stats(self) -> dict[str, int] | None:
        """keyspace_hits / keyspace_misses from INFO stats (None while Redis is down)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        out = {}
        for line in self.cli("info", "stats").splitlines():
            key, _, value = line.partition(":")
            if key in ("keyspace_hits", "keyspace_misses"):
                out[key] = int(value)
        return out or None

    def cli(self, *args: str) -> str:
        r = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, check=False)
        return r.stdout.strip()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_server(args: argparse.Namespace, index_root: Path, redis_url: str, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update(
        SERVICE_INDEX_ROOT=str(index_root),
        SERVICE_REDIS_URL=redis_url,
        SERVICE_ACCESS_LOG="true" if args.access_log else "false",
        **({"SERVICE_HNSW_EF_SEARCH": str(args.ef_value)} if args.ef_value else {}),
        PYTHONUNBUFFERED="1",
    )
    for setting in args.env:  # --env SERVICE_X=V, applied last
        name, sep, value = setting.partition("=")
        if not sep or not name.startswith("SERVICE_"):
            raise SystemExit(f"--env expects SERVICE_NAME=VALUE, got {setting!r}")
        env[name] = value
    if args.supervisor == "gunicorn":
        # gunicorn >= 19.8 with --reuse-port binds one SO_REUSEPORT socket per worker after the
        # fork, as service.run does; UvicornH11Worker is uvicorn's h11 protocol (gunicorn sets
        # TCP_NODELAY on its listeners, which accepted connections inherit). No access log.
        cmd = [
            sys.executable, "-m", "gunicorn", "service.app:app", "--worker-class", "uvicorn_worker.UvicornH11Worker",
            "--bind", f"127.0.0.1:{args.port}", "--workers", str(args.workers), "--reuse-port",
            "--log-level", "warning", "--backlog", "1024",
        ]
    else:
        launcher = ["-m", "service.run"] if args.supervisor == "service.run" else ["-m", "uvicorn", "service.app:app"]
        cmd = [
            sys.executable, *launcher, "--host", "127.0.0.1", "--port", str(args.port),
            "--workers", str(args.workers), "--http", args.http, "--loop", args.loop, "--no-access-log",
            "--log-level", "warning",
            "--backlog", "1024",
        ]
    out = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=args.server_repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        loaded = log_path.read_text(errors="replace").count('"msg": "serving new version"')
        if loaded >= args.workers:
            return proc
        time.sleep(0.5)
    raise RuntimeError(f"workers not ready after {args.start_timeout}s:\n{log_path.read_text()[-3000:]}")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a live process, from /proc (None if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _all_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) of every live process."""
    return {int(e): st for e in os.listdir("/proc") if e.isdigit() and (st := _stat(int(e))) is not None}


def tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by `root` and all its live descendants (the uvicorn workers)."""
    stats = _all_stats()
    total, todo, seen = 0.0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(child for child, (ppid, _) in stats.items() if ppid == pid)
    return total


def child_cpu_s(root: int) -> dict[int, float]:
    """CPU seconds so far of each direct child of `root` (the uvicorn workers under the supervisor)."""
    return {pid: cpu for pid, (ppid, cpu) in _all_stats().items() if ppid == root}


def worker_split(before: dict[int, float], after: dict[int, float]) -> list[float]:
    """Each worker's share of the workers' CPU over a run, largest first.

    uvicorn's workers share one listening socket and asyncio accepts every pending connection
    on a wake-up, so a load generator that opens all its connections at once can land most of
    them on one worker: then that worker's core is the limit and the other one idles.
    """
    used = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    total = sum(used.values())
    if total <= 0:
        return []
    return sorted((round(v / total, 2) for v in used.values()), reverse=True)


class CpuMeter:
    """CPU time of the server processes, redis-server and wrk over one measured run.

    Throughput on a shared machine moves with whatever else runs; CPU time per request does much
    less. On a dedicated box the cores are the bottleneck, so the /retrieve share of /healthz
    throughput is about cpu_per_request(healthz) / cpu_per_request(retrieve): `cpu_share_of_healthz`.
    """

    def __init__(self, server_pid: int, redis_pid: int | None) -> None:
        self.server_pid, self.redis_pid = server_pid, redis_pid

    def sample(self) -> dict[str, float]:
        redis = _stat(self.redis_pid) if self.redis_pid else None
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once it has been waited for
        return {
            "server": tree_cpu_s(self.server_pid),
            "redis": redis[1] if redis else 0.0,
            "wrk": children.ru_utime + children.ru_stime,
        }

    @staticmethod
    def per_request_us(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
        out = {k: round((after[k] - before[k]) / max(requests, 1) * 1e6, 1) for k in before}
        out["total"] = round(sum(out.values()), 1)
        return out


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---- wrk ----------------------------------------------------------------------------------------

LUA_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\": %d, \"duration_us\": %d, \"socket_errors\": %d, \"non_2xx\": %d, " ..
    "\"p50_us\": %d, \"p90_us\": %d, \"p95_us\": %d, \"p99_us\": %d, \"max_us\": %d, \"mean_us\": %.1f}\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99),
    latency.max, latency.mean))
end
"""

LUA_IDS = r"""
local counter = 0
local thread_id = 0
local threads = {}
setup = function(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end
"""


def lua_pool(bodies: list[str], path: str) -> str:
    quoted = ",\n".join("[==[" + b + "]==]" for b in bodies)
    return (
        LUA_IDS
        + f"local bodies = {{\n{quoted}\n}}\n"
        + 'local headers = {["Content-Type"] = "application/json"}\n'
        + "request = function()\n  counter = counter + 1\n"
        + f'  return wrk.format("POST", "{path}", headers, bodies[(counter % #bodies) + 1])\nend\n'
        + LUA_DONE
    )


def lua_unique(path: str, nonce: int, batch: int) -> str:
    """Every request (every user of a batch) has a cache key never seen before.

    Users are known ids (u0..u19999, in the trained vocabulary: a real user whose vector is not
    cached) and the continuous feature `age` carries a per-run nonce in its decimals, so the
    canonical features — and the key — are new for every request of every run.
    """
    one = (
        '"{\\"user_id\\": \\"u" .. ((counter * 13 + i * 7) % 20000) .. "\\", '
        '\\"features\\": {\\"age\\": " .. (20 + (counter + i) % 50) .. "." .. '
        'string.format("%07d", (NONCE + counter * 64 + i) % 10000000) .. ", '
        '\\"country\\": \\"k" .. ((counter + i) % 12) .. "\\", \\"device\\": \\"ios\\", '
        '\\"interests\\": \\"t" .. (counter % 30) .. "|t" .. ((counter + i) % 29) .. "\\"}, \\"k\\": ' + str(K) + '}"'
    ).replace("NONCE", str(nonce))
    if batch:
        body = (
            "  local parts = {}\n"
            f"  for i = 1, {batch} do\n    parts[i] = {one}\n  end\n"
            '  local body = "{\\"requests\\": [" .. table.concat(parts, ",") .. "]}"\n'
        )
    else:
        body = "  local i = 0\n" + f"  local body = {one}\n"
    return (
        LUA_IDS
        + 'local headers = {["Content-Type"] = "application/json"}\n'
        + "request = function()\n  counter = counter + 1\n"
        + body
        + f'  return wrk.format("POST", "{path}", headers, body)\nend\n'
        + LUA_DONE
    )


def run_wrk(url: str, script: str | None, duration: float, connections: int, threads: int, tmp: Path) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "5s", "--latency"]
    if script is not None:
        path = tmp / f"s{abs(hash(script))}.lua"
        path.write_text(script)
        cmd += ["-s", str(path)]
    else:
        path = tmp / "get.lua"
        path.write_text(LUA_DONE)
        cmd += ["-s", str(path)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=False, timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    r = json.loads(line[len("WRKJSON ") :])
    secs = r["duration_us"] / 1e6
    return {
        "rps": round(r["requests"] / secs, 1),
        "requests": r["requests"],
        "p50_ms": round(r["p50_us"] / 1000, 2),
        "p90_ms": round(r["p90_us"] / 1000, 2),
        "p95_ms": round(r["p95_us"] / 1000, 2),
        "p99_ms": round(r["p99_us"] / 1000, 2),
        "max_ms": round(r["max_us"] / 1000, 2),
        "mean_ms": round(r["mean_us"] / 1000, 2),
        "non_2xx": r["non_2xx"],
        "socket_errors": r["socket_errors"],
    }


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--root", type=Path, default=REPO / "artifacts" / "bench-serve")
    p.add_argument("--rebuild", action="store_true", help="rebuild the catalog even if one exists")
    p.add_argument("--build-only", action="store_true", help="build (or check) the catalog and exit")
    p.add_argument(
        "--ef-search",
        default="manifest",
        help="'manifest' (the indexer's efSearch, tuned for recall@100), 'k20' (tuned for recall@20, "
        "what these k=20 requests need) or a number; passed as SERVICE_HNSW_EF_SEARCH",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--supervisor", choices=("service.run", "uvicorn", "gunicorn"), default="service.run",
                   help="service.run: one SO_REUSEPORT socket per worker; uvicorn: `uvicorn --workers` (one shared "
                   "socket); gunicorn: `gunicorn --reuse-port` with uvicorn workers (pip install gunicorn uvicorn-worker)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--http", default="service.http:H11Protocol", help="uvicorn --http (see service/http.py)")
    p.add_argument("--loop", default="asyncio", help="uvicorn --loop: asyncio, uvloop (if installed) or auto")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--env", action="append", default=[], metavar="SERVICE_X=V", help="extra server setting")
    p.add_argument("--scenarios", default="healthz,retrieve_hit,retrieve_miss,batch,retrieve_redis_down")
    p.add_argument("--swap-every", type=float, default=10.0,
                   help="retrieve_miss_swaps: seconds between switches of INDEX_ROOT/current between two versions")
    p.add_argument("--server-repo", type=Path, default=REPO,
                   help="the checkout whose service/ the server runs (another one: before/after in one run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--in-process",
        action="store_true",
        help="instead of wrk: CPU µs per request through uvicorn's HTTP protocol in this process "
        "(fake transport, real redis-server), robust to other load; prints JSON, writes no report",
    )
    p.add_argument("--requests", type=int, default=2000, help="--in-process: requests per round")
    p.add_argument("--rounds", type=int, default=5, help="--in-process: rounds (min and median reported)")
    p.add_argument("--routes", choices=("jsonbody", "fastapi"), default="jsonbody",
                   help="--in-process: jsonbody: the app as deployed (service.jsonroute.JSONBodyRoute on the JSON "
                   "POST routes); fastapi: the same routes registered as plain FastAPI routes (what JSONBodyRoute saves)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "serve.json")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "bench" / "serve.md")
    args = p.parse_args(argv)
    args.port = args.port or free_port()
    for tool in ("redis-server", "redis-cli") if args.in_process else ("wrk", "redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed (apt-get install wrk redis-server)")

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    root = args.root / f"{args.items}"
    info_path = root / "catalog.json"
    if args.rebuild or not info_path.is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        catalog = build_catalog(root, args.items, args.seed, log)
    else:
        catalog = json.loads(info_path.read_text())
        log(f"reusing catalog {root} ({catalog['items']} items)")
    if args.build_only:
        print(json.dumps(catalog, indent=2))
        return 0
    ef_values: list[int | None] = []
    for spec in args.ef_search.split(","):
        spec = spec.strip()
        if spec == "manifest":
            ef_values.append(None)
        elif spec == "k20":
            ef_values.append(int(catalog[f"search_params_k{K}"]["efSearch"]))
        else:
            ef_values.append(int(spec))
    if args.in_process:
        out = [in_process_costs(args, root, ef, log) for ef in ef_values]
        print(json.dumps(out, indent=2))
        return 0

    if "retrieve_miss_swaps" in args.scenarios:
        ensure_second_version(root, catalog, log)
    load_before = os.getloadavg()
    runs = []
    for ef_value in ef_values:
        args.ef_value = ef_value
        results, metrics_lines = run_scenarios(args, root, log)
        runs.append({
            "ef_search": ef_value or catalog["search_params"].get("efSearch"),
            "ef_search_source": "manifest (indexer, recall@100 gate)" if ef_value is None else "SERVICE_HNSW_EF_SEARCH",
            "results": results,
            "targets": targets_of(results),
            "server_metrics_sample": metrics_lines,
        })
    load_after = os.getloadavg()

    report = {
        "command": command_line("bench.serve", argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "shared": "the 2 cores were shared with other jobs; see loadavg",
        },
        "config": {
            "workers": args.workers, "supervisor": args.supervisor, "connections": args.connections, "wrk_threads": args.wrk_threads,
            "duration_s": args.duration, "warmup_s": args.warmup, "k": K, "batch": args.batch,
            "access_log": args.access_log, "http": args.http, "loop": args.loop, "env": args.env,
        },
        "catalog": catalog,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")
    if args.md:
        write_markdown(args.md, render_markdown(report))
        log(f"wrote {args.md}")
    print(json.dumps([{"ef_search": r["ef_search"], "results": r["results"], "targets": r["targets"]} for r in runs], indent=2))
    return 0


def targets_of(results: dict[str, dict]) -> dict:
    """The issue's targets, judged on the cache-miss scenario (the expensive path)."""
    if "healthz" in results:
        ceiling = results["healthz"]["rps"]
        cpu_ceiling = results["healthz"].get("cpu_us_per_request", {}).get("total")
        for name in ("retrieve_hit", "retrieve_miss", "retrieve_redis_down"):
            if name in results:
                results[name]["share_of_healthz"] = round(results[name]["rps"] / ceiling, 3)
                cpu = results[name].get("cpu_us_per_request", {}).get("total")
                if cpu and cpu_ceiling:
                    results[name]["cpu_share_of_healthz"] = round(cpu_ceiling / cpu, 3)
    targets = {}
    if "retrieve_miss" in results:
        targets["miss_p99_le_15ms"] = {"value_ms": results["retrieve_miss"]["p99_ms"], "target_ms": 15.0,
                                       "met": results["retrieve_miss"]["p99_ms"] <= 15.0}
    for name in FILTER_SCENARIOS:
        if name in results:
            r = results[name]
            targets[f"{name}_recall_ge_0.95_p99_le_25ms"] = {
                f"recall@{K}": r[f"recall@{K}"], "p99_ms": r["p99_ms"],
                "met": r[f"recall@{K}"] >= 0.95 and r["p99_ms"] <= 25.0,
            }
    if "retrieve_miss" in results and "healthz" in results:
        share = results["retrieve_miss"]["share_of_healthz"]
        targets["retrieve_rps_ge_40pct_healthz"] = {"miss_share": share, "target": 0.4, "met": share >= 0.4}
    return targets


class Swapper:
    """`retrieve_miss_swaps`: switches `INDEX_ROOT/current` between the catalog's version and a
    second one every `every` seconds while wrk runs, the way a nightly rebuild or an update
    switches it, and reads back from the server log what each worker's swap cost (the reloader's
    `load_ms` and `gc_freeze_ms`). Ends on the version it started from."""

    def __init__(self, index_root: Path, every: float, server_log: Path) -> None:
        from indexer import store

        self.store, self.root, self.every, self.server_log = store, index_root, every, server_log
        self.first = store.read_current(index_root).name
        others = [v.name for v in store.list_versions(index_root) if v.name != self.first]
        self.pair = (self.first, others[-1])
        self.log_offset = server_log.stat().st_size
        self.swaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.swaps += 1
            self.store.switch_current(self.root, self.pair[self.swaps % 2])

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        if self.swaps % 2:
            self.store.switch_current(self.root, self.first)
        reloads = []
        with self.server_log.open("rb") as f:
            f.seek(self.log_offset)
            for line in f.read().decode(errors="replace").splitlines():
                if '"serving new version"' in line:
                    rec = json.loads(line)
                    reloads.append({k: rec.get(k) for k in ("load_ms", "gc_freeze_ms")})
        return {"swap_every_s": self.every, "swaps": self.swaps, "reloads": reloads}


def run_scenarios(args: argparse.Namespace, root: Path, log) -> tuple[dict[str, dict], list[str]]:  # noqa: ANN001
    """Fresh redis-server + uvicorn, every scenario once, both stopped again."""
    results: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    redis = Redis(tmp)
    redis.start()
    t_start = time.perf_counter()
    server = start_server(args, root / "index", redis.url, tmp / "server.log")
    log(f"efSearch {args.ef_value or 'from manifest'}: {args.workers} worker(s) ready in "
        f"{time.perf_counter() - t_start:.0f}s (port {args.port})")
    base = f"http://127.0.0.1:{args.port}"
    rng = np.random.default_rng(args.seed + 2)
    hit_bodies = [{**random_user(rng, f"u{i}"), "k": K} for i in range(256)]
    hit_text = [json.dumps(b) for b in hit_bodies]
    nonce = os.urandom(3).hex()  # probe user ids only
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    oracle = FilterOracle(root / "index") if any(s in FILTER_SCENARIOS for s in scenarios) else None

    def filter_probe(bodies: list[dict]) -> dict:
        """Recall@K of served filtered answers against the exact filtered top-K, and that each
        answer is exactly min(K, allowed) items, all allowed (checked on the oracle's mask)."""
        recalls, strategies, allowed_counts = [], [], []
        with httpx.Client(base_url=base, timeout=60) as c:
            for b in bodies[:RECALL_PROBES]:
                user = {"user_id": b["user_id"], "features": b["features"]}
                vec = np.asarray(c.post("/embed", json=user).json()["vector"], dtype=np.float32)
                r = c.post("/retrieve", json=b)
                r.raise_for_status()
                data = r.json()
                if data["index_version"] != oracle.index_version:
                    raise RuntimeError(f"answered by {data['index_version']}, oracle holds {oracle.index_version}")
                want, allowed = oracle.exact(b["filter"], vec, K)
                got = [it["item_id"] for it in data["items"]]
                if len(got) != min(K, allowed):
                    raise RuntimeError(f"{len(got)} items for a filter allowing {allowed}: {b['filter']}")
                recalls.append(len(set(got) & want) / max(1, len(want)))
                strategies.append(service_strategy(allowed, len(oracle.item_ids)))
                allowed_counts.append(allowed)
        return {
            f"recall@{K}": round(float(np.mean(recalls)), 4), f"recall@{K}_min": round(float(np.min(recalls)), 4),
            "recall_probes": len(recalls), "allowed_mean": round(float(np.mean(allowed_counts)), 1),
            "strategy_by_rule": {u: strategies.count(u) for u in sorted(set(strategies))},
        }

    def probe(path: str, bodies: list[dict], expect_cached: bool | None) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            for b in bodies:
                r = c.post(path, json=b)
                r.raise_for_status()
                data = r.json()
                for res in data.get("results", [data]):
                    if len(res["items"]) != K:
                        raise RuntimeError(f"{path}: {len(res['items'])} items, expected {K}")
                    if expect_cached is not None and res["cached"] != expect_cached:
                        raise RuntimeError(f"{path}: cached={res['cached']}, scenario expects {expect_cached}")

    try:
        for name in scenarios:
            warm_script = None
            if name == "healthz":
                url, script = base + "/healthz", None
            elif name == "retrieve_hit":
                probe("/retrieve", hit_bodies, None)  # fills the cache (every worker shares Redis)
                probe("/retrieve", hit_bodies[:32], True)
                url, script = base + "/retrieve", lua_pool(hit_text, "/retrieve")
            elif name in ("retrieve_miss", "retrieve_miss_swaps"):
                probe("/retrieve", [{**random_user(rng, f"probe-{nonce}-{i}"), "k": K} for i in range(8)], False)
                url = base + "/retrieve"
                script, warm_script = (lua_unique("/retrieve", int(rng.integers(1 << 30)), 0) for _ in range(2))
            elif name == "batch":
                url = base + "/retrieve/batch"
                script, warm_script = (lua_unique("/retrieve/batch", int(rng.integers(1 << 30)), args.batch)
                                       for _ in range(2))
            elif name in FILTER_SCENARIOS:
                probe("/retrieve", hit_bodies, None)  # the users' vectors cached: the filter and search are measured
                filters = oracle.filters(FILTER_SCENARIOS[name], len(hit_bodies), rng)
                bodies = [{**b, "filter": f} for b, f in zip(hit_bodies, filters, strict=True)]
                quality = filter_probe(bodies)
                log(f"{name}: {quality}")
                url, script = base + "/retrieve", lua_pool([json.dumps(b) for b in bodies], "/retrieve")
            elif name == "retrieve_redis_down":
                redis.stop()
                time.sleep(0.5)
                probe("/retrieve", hit_bodies[:32], False)
                url, script = base + "/retrieve", lua_pool(hit_text, "/retrieve")
            else:
                raise SystemExit(f"unknown scenario {name}")
            log(f"{name}: warm-up {args.warmup}s")
            run_wrk(url, warm_script or script, args.warmup, args.connections, args.wrk_threads, tmp)
            before = redis.stats()
            meter = CpuMeter(server.pid, redis.proc.pid if redis.proc and redis.proc.poll() is None else None)
            cpu0, workers0 = meter.sample(), child_cpu_s(server.pid)
            swapper = Swapper(root / "index", args.swap_every, tmp / "server.log") if name.endswith("_swaps") else None
            try:
                res = run_wrk(url, script, args.duration, args.connections, args.wrk_threads, tmp)
            finally:
                if swapper is not None:
                    res_swaps = swapper.stop()
            if swapper is not None:
                res.update(res_swaps)
            res["cpu_us_per_request"] = CpuMeter.per_request_us(cpu0, meter.sample(), res["requests"])
            res["worker_cpu_split"] = worker_split(workers0, child_cpu_s(server.pid))
            res["cores_busy"] = round(res["cpu_us_per_request"]["total"] * res["rps"] / 1e6, 2)
            after = redis.stats()
            if after and before:  # Redis's own count: what the scenario really did
                res["redis_hits"] = after["keyspace_hits"] - before["keyspace_hits"]
                res["redis_misses"] = after["keyspace_misses"] - before["keyspace_misses"]
            if name == "batch":
                res["users_per_s"] = round(res["rps"] * args.batch, 1)
                res["batch_size"] = args.batch
            if name in FILTER_SCENARIOS:
                res["selectivity"] = FILTER_SCENARIOS[name]
                res.update(quality)
            results[name] = res
            log(f"{name}: {res}")
        metrics_text = httpx.get(base + "/metrics", timeout=10).text
    finally:
        stop_server(server)
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return results, [
        ln for ln in metrics_text.splitlines()
        if ln.startswith(("service_cache", "service_filtered")) and "_created" not in ln
    ]


# ---- in-process cost per request ---------------------------------------------------------------


class _FakeTransport:
    """What uvicorn's HTTP protocol needs from a socket: writes are counted and dropped."""

    def __init__(self) -> None:
        self.closing = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _http_request(method: str, path: str, body: bytes | None = None) -> bytes:
    if body is None:
        return f"{method} {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def in_process_costs(args: argparse.Namespace, root: Path, ef_value: int | None, log) -> dict:  # noqa: ANN001
    """CPU µs per request of the whole server side, without sockets, wrk or other processes' noise.

    The app runs in this process behind uvicorn's own HTTP protocol class (`--http`, `--loop`),
    fed raw HTTP/1.1 bytes through a fake transport by `--connections / --workers` concurrent
    keep-alive "connections" (what one worker sees under the wrk load); Redis is a real
    redis-server. Per scenario and round: this process's CPU time
    (`time.process_time`) and redis-server's (/proc) per request. Scenarios are interleaved
    round by round, so that a burst of load elsewhere hits all of them alike; min and median
    over rounds are reported. What it leaves out (the same for every endpoint, roughly): the
    kernel's socket work and the load generator.
    """
    import asyncio
    import statistics

    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from service.app import create_app
    from service.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    redis = Redis(tmp)
    redis.start()
    connections = max(1, args.connections // args.workers)
    overrides = {}
    for setting in args.env:
        name, _, value = setting.partition("=")
        overrides[name.removeprefix("SERVICE_").lower()] = value
    settings = Settings(
        index_root=root / "index", redis_url=redis.url, access_log=args.access_log, hnsw_ef_search=ef_value,
        **overrides,
    )
    rng = np.random.default_rng(args.seed + 3)
    nonce = int(rng.integers(1 << 30))
    hit_bodies = [json.dumps({**random_user(rng, f"u{i}"), "k": K}).encode() for i in range(256)]

    def miss_body(n: int) -> bytes:  # a known user with never-seen features (as lua_unique)
        age = f"{20 + n % 50}.{(nonce + n) % 10_000_000:07d}"
        return (
            f'{{"user_id": "u{(n * 13) % 20000}", "features": {{"age": {age}, "country": "k{n % 12}", '
            f'"device": "ios", "interests": "t{n % 30}|t{n % 29}"}}, "k": {K}}}'
        ).encode()

    # history ids the served model knows (items with training clicks): every one is pooled
    known_items = json.loads((root / "index" / "current" / "model" / "features.json").read_text())["item"]["ids"]

    def history_body(n: int) -> bytes:  # a cache miss that also sends 50 recent clicks (issue 18)
        body = miss_body(n)
        clicks = ", ".join(f'"{known_items[(n * 7919 + j * 104729) % len(known_items)]}"' for j in range(HISTORY_CLICKS))
        return body[:-1] + f', "history": [{clicks}]}}'.encode()

    counter = [0]

    def requests(name: str, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            counter[0] += 1
            if name == "healthz":
                out.append(_http_request("GET", "/healthz"))
            elif name == "retrieve_miss":
                out.append(_http_request("POST", "/retrieve", miss_body(counter[0])))
            elif name == "retrieve_miss_history":
                out.append(_http_request("POST", "/retrieve", history_body(counter[0])))
            else:
                out.append(_http_request("POST", "/retrieve", hit_bodies[counter[0] % len(hit_bodies)]))
        return out

    async def run() -> dict:
        if args.routes == "fastapi":  # bench-only: the JSON POST routes without route_class_override
            from unittest import mock

            from service import routes

            def plain_post(app, path: str, **kwargs):  # noqa: ANN001, ANN202
                return app.post(path, **kwargs)

            with mock.patch.object(routes, "post_json", plain_post):
                app = create_app(settings, start_reloader=False)
        else:
            app = create_app(settings, start_reloader=False)
        async with app.router.lifespan_context(app):
            for handler in logging.getLogger().handlers:  # the access log goes nowhere
                if getattr(handler, "_service_handler", False):  # the one configure_logging installed
                    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115
            outcome = await asyncio.to_thread(app.state.service.reloader.check_once)
            if outcome != "swapped":
                raise RuntimeError(f"version did not load: {app.state.service.reloader.last_error}")
            config = Config(app=app, http=args.http, lifespan="off", log_level="warning", access_log=False)
            config.load()

            class Protocol(config.http_protocol_class):  # type: ignore[misc, name-defined]
                waiter: asyncio.Future | None = None

                def on_response_complete(self) -> None:
                    super().on_response_complete()
                    if self.waiter is not None and not self.waiter.done():
                        self.waiter.set_result(None)

            loop = asyncio.get_running_loop()
            state = ServerState()

            async def one_round(name: str, n: int) -> tuple[float, float]:
                todo = iter(requests(name, n))

                async def connection() -> None:
                    proto = Protocol(config=config, server_state=state, app_state={}, _loop=loop)
                    proto.connection_made(_FakeTransport())
                    for raw in todo:
                        proto.waiter = loop.create_future()
                        proto.data_received(raw)
                        await proto.waiter
                    proto.connection_lost(None)

                redis0, cpu0 = _stat(redis.proc.pid)[1], time.process_time()
                await asyncio.gather(*(connection() for _ in range(connections)))
                cpu1, redis1 = time.process_time(), _stat(redis.proc.pid)[1]
                return (cpu1 - cpu0) / n * 1e6, (redis1 - redis0) / n * 1e6

            names = ["healthz", "retrieve_miss", "retrieve_hit", "retrieve_miss_history"]
            for name in names:  # warm-up; fills the cache for the hit scenario
                await one_round(name, max(600, len(hit_bodies)))
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names:
                    samples[name].append(await one_round(name, args.requests))
                log(f"in-process round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{name} {samples[name][-1][0]:.0f} µs" for name in names))
        return samples

    load_before = os.getloadavg()
    runner = asyncio.run
    if args.loop in ("uvloop", "auto"):
        try:
            import uvloop
        except ImportError:
            if args.loop == "uvloop":
                raise
        else:
            runner = uvloop.run
    try:
        samples = runner(run())
    finally:
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results = {}
    for name, values in samples.items():
        server = [v[0] for v in values]
        results[name] = {
            "server_cpu_us_min": round(min(server), 1),
            "server_cpu_us_median": round(statistics.median(server), 1),
            "redis_cpu_us_median": round(statistics.median(v[1] for v in values), 1),
        }
    ceiling = results["healthz"]["server_cpu_us_median"]
    for name in ("retrieve_miss", "retrieve_hit", "retrieve_miss_history"):
        r = results[name]
        r["x_healthz"] = round((r["server_cpu_us_median"] + r["redis_cpu_us_median"]) / ceiling, 2)
    miss = results["retrieve_miss"]
    results["retrieve_miss_history"]["x_retrieve_miss"] = round(
        (results["retrieve_miss_history"]["server_cpu_us_median"] + results["retrieve_miss_history"]["redis_cpu_us_median"])
        / (miss["server_cpu_us_median"] + miss["redis_cpu_us_median"]), 3)
    return {
        "ef_search": ef_value or "manifest",
        "http": args.http,
        "routes": args.routes,
        "redis_client": settings.redis_client,
        "loop": "uvloop" if runner is not asyncio.run else "asyncio",
        "connections": connections,
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "results": results,
    }


def write_markdown(path: Path, table: str) -> None:
    """Replace the generated block of an existing page (keeping its prose), or write a new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    spliced = splice_results(path.read_text(), table) if path.is_file() else None
    path.write_text(spliced or f"# Serving benchmark\n\n{BEGIN}\n{table}{END}\n")


def render_markdown(report: dict) -> str:
    """The generated block of docs/bench/serve.md: setup line, one table per efSearch, targets."""
    m, c, cat = report["machine"], report["config"], report["catalog"]
    recall = (cat.get("recall") or {}).get("value")
    lines = [
        "<!-- generated by bench/serve.py: do not edit between the results markers -->",
        f"Run {report['date_utc']}: `{report['command']}`",
        "",
        f"- catalog: {cat['items']:,} items, dim {cat['dim']}, {cat['factory']}; the indexer's efSearch "
        f"{cat['search_params'].get('efSearch')} (recall@100 {recall}); efSearch "
        f"{cat[f'search_params_k{K}'].get('efSearch')} reaches recall@{K} {cat[f'recall@{K}_at_k{K}_params']}",
        f"- server: {c['workers']} uvicorn workers under `{c.get('supervisor', 'uvicorn')}` (`--http {c['http']}`), access log "
        f"{'on' if c['access_log'] else 'off'}, Redis cache; load: wrk, {c['connections']} connections, "
        f"{c['duration_s']:g} s per scenario after {c['warmup_s']:g} s warm-up, k={c['k']}, batch={c['batch']}",
        f"- machine: {m['cpus']} × {m['cpu']}, Python {m['python']}; load average {m['loadavg_before'][0]} "
        f"before, {m['loadavg_after'][0]} after (shared with other jobs)",
        "",
    ]
    for run in report["runs"]:
        lines += [
            f"**efSearch {run['ef_search']}** ({run['ef_search_source']})",
            "",
            "| scenario | req/s | p50 ms | p95 ms | p99 ms | max ms | share of /healthz | CPU µs/req: server + redis + wrk"
            " | CPU share | cores busy | worker CPU split | Redis hits / misses | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in run["results"].items():
            share = r.get("share_of_healthz")
            cpu_share = r.get("cpu_share_of_healthz")
            rps = f"{r['rps']:.0f}" + (f" ({r['users_per_s']:.0f} users/s)" if "users_per_s" in r else "")
            redis = f"{r['redis_hits']} / {r['redis_misses']}" if "redis_hits" in r else "–"
            c = r.get("cpu_us_per_request")
            cpu = f"{c['total']:.0f} = {c['server']:.0f} + {c['redis']:.0f} + {c['wrk']:.0f}" if c else "–"
            busy = f"{r['cores_busy']:.2f}" if "cores_busy" in r else "–"
            split = " / ".join(f"{x:.0%}" for x in r.get("worker_cpu_split") or []) or "–"
            lines.append(
                f"| {name} | {rps} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} | "
                f"{'' if share is None else f'{share:.0%}'} | {cpu} | "
                f"{'' if cpu_share is None else f'{cpu_share:.0%}'} | {busy} | {split} | {redis} | {r['non_2xx'] + r['socket_errors']} |"
            )
        lines.append("")
        filtered = {n: r for n, r in run["results"].items() if n in FILTER_SCENARIOS}
        if filtered:
            lines += [
                f"| filter scenario | selectivity | allowed rows (mean) | req/s | p50 ms | p99 ms | recall@{K} (min) | strategy (service rule) |",
                "|---|---:|---:|---:|---:|---:|---:|---|",
            ]
            for n, r in filtered.items():
                used = ", ".join(f"{k} {v}" for k, v in r["strategy_by_rule"].items())
                lines.append(
                    f"| {n} | {r['selectivity'] * 100:g} % | {r['allowed_mean']:,.0f} | {r['rps']:.0f} | {r['p50_ms']} | "
                    f"{r['p99_ms']} | {r[f'recall@{K}']:.3f} ({r[f'recall@{K}_min']:.2f}) | {used} |"
                )
            lines.append("")
        for name, t in run["targets"].items():
            lines.append(f"- target `{name}`: **{'met' if t['met'] else 'missed'}** ({t})")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
