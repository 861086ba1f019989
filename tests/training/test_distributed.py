"""Data-parallel training over 2 gloo ranks reproduces one process (training/distributed.py).

The oracle is the one-process code path itself: every worker also builds the same step with
`ONE_PROCESS` and runs it on the concatenated global batch. Workers run under
`torch.multiprocessing` (spawn) with a file rendezvous, report what they measured as JSON, and
the assertions run here; `run_ranks` fails a test whose ranks hang instead of waiting forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import tiny_train_config
from training import distributed
from training.bundle import load_bundle
from training.config import TrainConfig
from training.dataset import read_dataset
from training.distributed import ONE_PROCESS, RankFailedError, Ranks, ShardMismatchError
from training.ema import WeightAverage
from training.model import HistoryPooling, TwoTowerModel
from training.optim import TableOptimizer, choose_sparse_tables
from training.prepare import prepare_synthetic
from training.split import split_interactions
from training.task import build_task
from training.train import TrainingData, TrainStep, fit, fit_encoders, freeze_known_user_ids

REPO = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 64
RTOL = 1e-5

# test 1: each config's loss and gradients; weights != 1 (recency, head sub-sampling), id
# dropout, logQ with the cold rows' weight, known-positive masks, history pooling throughout
CONFIGS = {
    "dense_exact_mns_ssl": {"sparse_tables": False, "mixed_negatives": 16, "ssl_weight": 0.1},
    "sparse_streaming_mns": {"sparse_tables": True, "frequency": "streaming", "mixed_negatives": 16},
    "listwise_in_batch_sampler": {"objective": "listwise", "negative_sampler": "in_batch", "num_negatives": 4},
}


def step_config(**over) -> TrainConfig:
    base = {"batch_size": GLOBAL_BATCH, "positive_keep_t": 0.02, "seed": 3}
    return tiny_train_config(**(base | over))


def run_ranks(fn, *args, world: int = 2, timeout_s: float = 240.0) -> None:
    """Run fn(rank, world, *args) in `world` spawned processes; fail if they hang."""
    ctx = mp.start_processes(fn, args=(world, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks still running after {timeout_s:.0f}s: a hang")


def join(rank: int, world: int, tmp: Path, **kw) -> Ranks:
    torch.set_num_threads(1)
    return distributed.start(rank, world, init_method=f"file://{tmp / 'rendezvous'}", **kw)


def build_step(data_dir: Path, cfg: TrainConfig, ranks: Ranks) -> tuple[TrainStep, TableOptimizer]:
    """What `training.train._train` builds before its loop (history pooling on, CPU)."""
    dataset = read_dataset(data_dir)
    train = split_interactions(dataset.interactions).fit
    torch.manual_seed(cfg.seed)
    user_enc, item_enc = fit_encoders(dataset, train, cfg)
    model = TwoTowerModel(cfg.model, user_enc, item_enc)
    data = TrainingData.encode(dataset, train, user_enc, item_enc, cfg, torch.device("cpu"))
    pool = HistoryPooling(data.n_items, cfg.model.id_dim, cfg.history_alpha)
    freeze_known_user_ids(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = TrainStep(model, pool, build_task(cfg, data.counts, data.pos_keys, gen, "cpu", ranks=ranks), data, cfg, gen)
    tables = choose_sparse_tables([model.user_tower.id_emb, model.item_tower.id_emb, pool.emb], cfg.sparse_tables, 0.0)
    return step, TableOptimizer(list(step.parameters()), tables, lr=cfg.lr)


def global_batch(data: TrainingData, k: int = 0) -> torch.Tensor:
    """The k-th global batch of a fixed permutation whose first batch holds an item twice on
    one rank and an item on both ranks (accidental hits within and across ranks)."""
    for seed in range(1000):
        perm = torch.randperm(len(data.pair_items), generator=torch.Generator().manual_seed(seed))
        items = data.pair_items[perm[:GLOBAL_BATCH]]
        half = GLOBAL_BATCH // 2
        a, b = items[:half], items[half:]
        if len(a.unique()) < half and np.intersect1d(a.numpy(), b.numpy()).size:
            return perm[k * GLOBAL_BATCH : (k + 1) * GLOBAL_BATCH]
    raise AssertionError("no permutation with duplicates")


def grads(step: TrainStep) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in step.named_parameters():
        g = p.grad
        out[name] = torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g).clone()
    return out


def deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / (rtol·|want| + rtol·max|want|): <= 1 passes at rtol."""
    tol = RTOL * want.abs() + RTOL * want.abs().max().clamp(min=1e-12)
    return float(((got - want).abs() / tol).max())


@dataclass(frozen=True, eq=False)
class DetachedGather(Ranks):
    """The classic bug: the other ranks' vectors gathered without autograd (only a rank's own
    slice carries a gradient), so no rank's loss trains the others' towers."""

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = list(self.gather_plain(t.detach()).chunk(self.world))
        parts[self.rank] = t
        return torch.cat(parts)


def one_step(data_dir: Path, cfg: TrainConfig, ranks: Ranks) -> dict:
    ref, _ = build_step(data_dir, cfg, ONE_PROCESS)
    rows = global_batch(ref.data)
    torch.manual_seed(11)
    ref.generator.manual_seed(5)
    want_loss = ref(rows)
    want_loss.backward()
    want = grads(ref)

    step, opt = build_step(data_dir, cfg, ranks)
    runner = ranks.wrap(step, opt.sparse_params)
    torch.manual_seed(11)
    step.generator.manual_seed(5)
    loss = runner(ranks.local(rows))
    loss.backward()
    ranks.sync_sparse_grads(opt.sparse_params)
    got = grads(step)
    flat = torch.cat([g.flatten() for g in got.values()])
    every = ranks.gather_plain(flat).view(ranks.world, -1)
    dev = {name: deviation(got[name], want[name]) for name in want}
    worst = max(dev, key=dev.get)
    return {
        "loss": float(ranks.sum(loss.detach().double())) / ranks.world, "want_loss": float(want_loss),
        "worst": worst, "deviation": dev[worst], "ranks_identical": bool((every == every[0]).all()),
        "sparse": [n for n, p in step.named_parameters() if any(p is q for q in opt.sparse_params)],
    }


def equivalence_worker(rank: int, world: int, tmp: Path, data_dir: Path) -> None:
    ranks = join(rank, world, tmp, timeout_s=120)
    detached = DetachedGather(ranks.rank, ranks.world, ranks.local_rank, ranks.control)
    out = {}
    for name, over in CONFIGS.items():
        cfg = step_config(**over)
        out[name] = {"autograd": one_step(data_dir, cfg, ranks), "detached": one_step(data_dir, cfg, detached)}
    (tmp / f"equivalence{rank}.json").write_text(json.dumps(out))
    distributed.shutdown()


@pytest.fixture(scope="module")
def equivalence(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("equivalence")
    run_ranks(equivalence_worker, tmp, tiny_dataset)
    return [json.loads((tmp / f"equivalence{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_ranks_give_the_one_process_loss_and_gradients(equivalence: list[dict], config: str) -> None:
    for rank, result in enumerate(equivalence):
        r = result[config]["autograd"]
        assert r["loss"] == pytest.approx(r["want_loss"], rel=RTOL), (rank, r)
        assert r["deviation"] <= 1.0, f"rank {rank}: {r['worst']} off by {r['deviation']:.3g} x rtol"
        assert r["ranks_identical"], rank
    if CONFIGS[config].get("sparse_tables"):  # the SparseAdam tables' gradients are averaged by sync_sparse_grads
        assert {"model.item_tower.id_emb.weight", "pool.emb.weight"} <= set(equivalence[0][config]["autograd"]["sparse"])


@pytest.mark.parametrize("config", [c for c in CONFIGS if CONFIGS[c].get("objective") is None])
def test_gathering_without_autograd_fails_the_gradient_check(equivalence: list[dict], config: str) -> None:
    """Negative control: the forward (the loss) is the same, the cross-rank gradient terms are
    missing, and the check above sees it."""
    for result in equivalence:
        r = result[config]["detached"]
        assert r["loss"] == pytest.approx(r["want_loss"], rel=RTOL)
        assert r["deviation"] > 100.0, r
        assert r["worst"].startswith("model.item_tower"), r


# ---- test 3: K optimizer + EMA steps --------------------------------------------------------


def train_steps(step: TrainStep, ranks: Ranks, opt: TableOptimizer, k: int) -> WeightAverage:
    """k steps of `_train`'s loop body (forward, backward, sparse sync, EMA, optimizer)."""
    ema = WeightAverage(list(step.parameters()), 0.9, lazy=opt.sparse_params)
    runner = ranks.wrap(step, opt.sparse_params)
    torch.manual_seed(11)
    step.generator.manual_seed(5)
    for b in range(k):
        loss = runner(ranks.local(global_batch(step.data, b)))
        opt.zero_grad()
        loss.backward()
        ranks.sync_sparse_grads(opt.sparse_params)
        ema.before_step()
        opt.step()
        ema.update()
    ema.sync()
    return ema


def steps_worker(rank: int, world: int, tmp: Path, data_dir: Path, k: int) -> None:
    ranks = join(rank, world, tmp, timeout_s=120)
    cfg = step_config(sparse_tables=True, frequency="streaming", mixed_negatives=16)
    ref, ref_opt = build_step(data_dir, cfg, ONE_PROCESS)
    ref_ema = train_steps(ref, ONE_PROCESS, ref_opt, k)
    step, opt = build_step(data_dir, cfg, ranks)
    ema = train_steps(step, ranks, opt, k)
    names = [n for n, _ in step.named_parameters()]
    want = dict(zip(names, [p.detach() for p in ref.parameters()], strict=True))
    got = dict(zip(names, [p.detach() for p in step.parameters()], strict=True))
    moved = {n: float((got[n] - want[n]).abs().max()) for n in names}
    averaged = {n: float((a - b).abs().max()) for n, a, b in zip(names, ema.shadow, ref_ema.shadow, strict=True)}
    s, t = step.task.stream, ref.task.stream
    flat = torch.cat([p.detach().flatten() for p in step.parameters()])
    every = ranks.gather_plain(flat).view(ranks.world, -1)
    out = {
        "params": moved, "ema": averaged, "changed": float(max((p.detach() - q).abs().max() for p, q in zip(step.parameters(), ema.shadow, strict=True))),
        "stream_equal": bool(np.array_equal(s.A, t.A) and np.array_equal(s.B, t.B) and s.step == t.step == k),
        "generator_equal": bool(torch.equal(step.generator.get_state(), ref.generator.get_state())),
        "ranks_identical": bool((every == every[0]).all()),
    }
    (tmp / f"steps{rank}.json").write_text(json.dumps(out))
    distributed.shutdown()


def test_k_optimizer_and_ema_steps_match_one_process(tiny_dataset: Path, tmp_path: Path) -> None:
    run_ranks(steps_worker, tmp_path, tiny_dataset, 4)
    for rank in range(2):
        r = json.loads((tmp_path / f"steps{rank}.json").read_text())
        # Adam moves every parameter by ~lr = 3e-3 per step; float rounding of the two sums stays far below
        assert max(r["params"].values()) < 1e-5, (rank, sorted(r["params"].items(), key=lambda kv: -kv[1])[:3])
        assert max(r["ema"].values()) < 1e-5, (rank, r["ema"])
        assert r["changed"] > 1e-4  # the average lags the weights: the EMA really ran
        assert r["stream_equal"] and r["generator_equal"] and r["ranks_identical"], r


# ---- test 4: rank-0 decisions, timeouts, unequal shards --------------------------------------


def control_worker(rank: int, world: int, tmp: Path, data_dir: Path, other_data: Path, models: Path) -> None:
    ranks = join(rank, world, tmp, timeout_s=2.0, wait_s=120.0)
    out: dict = {}

    def slow_decision() -> dict:
        time.sleep(4.0)  # twice the collective timeout: a long rank-0 evaluation
        return {"stop": True, "best_epoch": 3}

    out["decision"] = ranks.on_main(slow_decision)
    out["after"] = float(ranks.sum(torch.ones(1)))  # the default group is still usable

    def broken() -> None:
        raise ValueError("validation split is empty")

    try:
        ranks.on_main(broken)
    except (ValueError, RankFailedError) as e:
        out["failure"] = f"{type(e).__name__}: {e}"
    # unequal shards: rank 1 reads other data; both ranks must fail before training, naming both
    t0 = time.monotonic()
    try:
        fit(data_dir if rank == 0 else other_data, models / "unequal", tiny_train_config(), progress=False, ranks=ranks)
    except ShardMismatchError as e:
        out["unequal"] = str(e)
    out["unequal_s"] = time.monotonic() - t0
    (tmp / f"control{rank}.json").write_text(json.dumps(out))
    distributed.shutdown()


def test_rank0_decisions_reach_every_rank_and_unequal_shards_fail_fast(tiny_dataset: Path, tmp_path: Path) -> None:
    other = prepare_synthetic(tmp_path / "other", n_users=300, n_items=200, n_interactions=4000, seed=1)
    run_ranks(control_worker, tmp_path, tiny_dataset, other, tmp_path / "models", timeout_s=120)
    results = [json.loads((tmp_path / f"control{r}.json").read_text()) for r in range(2)]
    for rank, r in enumerate(results):
        assert r["decision"] == {"stop": True, "best_epoch": 3} and r["after"] == 2.0
        want = "ValueError: validation split is empty" if rank == 0 else "RankFailedError: rank 0 failed: ValueError: validation split is empty"
        assert r["failure"] == want
        assert "unequal shards" in r["unequal"] and "rank 0: rows=" in r["unequal"] and "rank 1: rows=" in r["unequal"], r
        assert r["unequal_s"] < 60
    assert not (tmp_path / "models" / "unequal").exists() or not any((tmp_path / "models" / "unequal").iterdir())


def stop_worker(rank: int, world: int, tmp: Path, data_dir: Path, models: Path) -> None:
    ranks = join(rank, world, tmp, timeout_s=60.0)
    cfg = tiny_train_config(epochs=30, patience=1, refit=False, cold_calibration_steps=0)
    path = fit(data_dir, models, cfg, progress=False, ranks=ranks)
    (tmp / f"stop{rank}.json").write_text(json.dumps({"path": str(path)}))
    distributed.shutdown()


def test_early_stopping_on_rank0_ends_both_ranks(tiny_dataset: Path, tmp_path: Path) -> None:
    run_ranks(stop_worker, tmp_path, tiny_dataset, tmp_path / "models", timeout_s=180)
    paths = {json.loads((tmp_path / f"stop{r}.json").read_text())["path"] for r in range(2)}
    assert len(paths) == 1  # every rank returned rank 0's bundle
    manifest = load_bundle(paths.pop()).manifest
    assert len(manifest["history"]) < 30 and manifest["history"][-1]["epoch"] - manifest["best_epoch"] == 1


# ---- test 5: torchrun end to end ----------------------------------------------------------------


def torchrun(*args: str, timeout_s: float = 240.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)


def test_torchrun_fit_matches_one_process(tiny_dataset: Path, tiny_bundle_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.json"
    config.write_text(json.dumps(tiny_train_config().to_dict()))
    done = torchrun("training.cli", "fit", "--data", str(tiny_dataset), "--out", str(tmp_path / "models"),
                    "--config", str(config), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(str(tmp_path))]
    assert len(lines) == 1  # the path once (rank 0), not once per rank
    two = load_bundle(lines[0]).manifest
    one = load_bundle(tiny_bundle_path).manifest
    assert two["metrics"].keys() == one["metrics"].keys()
    # the same batches but for the odd row each epoch of the fit split leaves out: equal within noise
    for key in ("recall@20", "recall@100", "ndcg@20", "cold_recall@100"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=0.02), key
    # the refit pass trains on an even number of rows: exactly the one-process batches
    assert len(split_interactions(read_dataset(tiny_dataset).interactions).train) % 2 == 0
    assert two["best_epoch"] == one["best_epoch"]
