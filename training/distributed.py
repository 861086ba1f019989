"""Data parallelism over `torchrun` ranks: one process group, the collectives the trainer and
the rank-parallel catalog embedding need, and nothing of the training math.

`torchrun --nproc_per_node=N -m training.cli fit ...` starts N processes with `RANK`,
`WORLD_SIZE`, `LOCAL_RANK` and the rendezvous address in their environment; `session()` turns
that into a `Ranks` (gloo on CPU, NCCL on CUDA) and tears it down afterwards. Without those
variables (a plain `trainer fit`) it is `ONE_PROCESS`, whose every collective is the identity,
so the one-process code path is the W = 1 case of the same code, not a second copy.

What the trainer does with it (training/train.py, training/task.py; docs/design.md has the math):

* every rank draws the same seeded permutation and takes its slice of each global batch
  (`batch_rows`), and every shared random draw (id dropout, head sub-sampling) is drawn for the
  global batch from the shared seeded generators and sliced (`local`), so W ranks reproduce
  one process on the concatenated batch;
* item vectors of the other ranks' positives are gathered **with** autograd (`gather`:
  `torch.distributed.nn.functional.all_gather`, whose backward sums every rank's gradient
  for a slice into its owner), ids plainly (`gather_plain`), and each rank scales its loss by
  its share of the global batch's weight (`scale_loss`), so DDP's gradient average is the
  one-process gradient of the concatenated batch;
* dense parameters are averaged by `DistributedDataParallel` (`wrap`); the catalog-sized tables
  with sparse gradients (SparseAdam, training/optim.py) are left out of DDP and averaged by
  `sync_sparse_grads` — NCCL has no sparse all-reduce, and this one path works on gloo and NCCL;
* validation, early stopping, baking, calibration and the bundle run on rank 0 (`on_main`), the
  result — or the failure — broadcast to every rank, so a rank can never stop alone.

Two timeouts. Collectives of the training step run on the default group with `timeout_s`
(`TWOTOWER_DIST_TIMEOUT_S`, default 600 s): a rank that dies or diverges from the others'
sequence of collectives becomes an error, not an endless hang. Waiting for rank 0 (its
per-epoch validation, the final bundle) runs on a second, gloo, group with `wait_s`
(`TWOTOWER_DIST_WAIT_S`, default 24 h), so a long rank-0 evaluation cannot trip the short
timeout. Different data on different ranks (unequal shards) is refused before the first step by
`check_same`, naming each rank's value (`ShardMismatchError`), instead of hanging in a
collective of mismatched shapes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

if TYPE_CHECKING:
    from training.shards import RankRows

__all__ = [
    "ONE_PROCESS", "RankFailedError", "Ranks", "ShardMismatchError", "current", "rank_batch_size", "session", "start",
]

log = logging.getLogger("trainer.distributed")

TIMEOUT_ENV = "TWOTOWER_DIST_TIMEOUT_S"
WAIT_ENV = "TWOTOWER_DIST_WAIT_S"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_WAIT_S = 86_400.0

T = TypeVar("T")


class ShardMismatchError(ValueError):
    """Ranks disagree on what must be identical everywhere (data size, batch plan): their
    collectives would have mismatched shapes and hang. The message names every rank's value."""


class RankFailedError(RuntimeError):
    """Rank 0 failed in a section the others were waiting on (validation, writing the bundle)."""


@dataclass(frozen=True, eq=False)
class Ranks:
    """This process's place among the ranks, and the collectives over them.

    `rank` / `world`: position and count; `local_rank`: the GPU index on this machine; `control`:
    the gloo group with the long timeout used to wait for rank 0 (None in one process).
    Every method is the identity (or the obvious constant) when `world == 1`.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    control: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- slicing the global batch ------------------------------------------------------------
    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of `t`, a tensor over the global batch (W equal contiguous parts)."""
        if self.world == 1:
            return t
        n = len(t)
        if n % self.world:
            raise ValueError(f"a global batch of {n} rows does not split into {self.world} equal rank slices")
        part = n // self.world
        return t[self.rank * part : (self.rank + 1) * part]

    def batch_rows(self, perm: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """This rank's rows of the global batch made of this rank's per-rank bounds [lo, hi):
        the global batch is `perm[W·lo : W·hi]`, rank r takes its r-th contiguous part."""
        size = hi - lo
        start = self.world * lo + self.rank * size
        return perm[start : start + size]

    def others(self, n_local: int, device: torch.device) -> torch.Tensor:
        """Positions, in the global batch of W·n_local rows, of the rows of every other rank."""
        every = torch.arange(self.world * n_local, device=device)
        return every[(every < self.rank * n_local) | (every >= (self.rank + 1) * n_local)]

    def read_shards(self, path: str | os.PathLike[str]) -> RankRows:
        """This rank's rows of an integer-coded shards directory (`trainer prepare shards`):
        only its shards are read (training/shards.py), and the ranks are checked to have read
        the same directory (fingerprint, rows each) before any collective depends on it."""
        from training.shards import read_rank_shards

        rows = read_rank_shards(path, self.rank, self.world)
        self.check_same("the training shards", {
            "fingerprint": rows.manifest["dataset_fingerprint"], "shards": len(rows.manifest["shard_rows"]),
            "rows": len(rows), "seed": rows.manifest["seed"], "which": rows.manifest["rows"],
        })
        return rows

    # ---- collectives ---------------------------------------------------------------------
    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` concatenated in rank order, differentiable: the gradient of each
        slice flows back to the rank that owns it, summed over every rank that used it."""
        if self.world == 1:
            return t
        with warnings.catch_warnings():  # deprecated in favour of a private module: the public API stays
            warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)
            return torch.cat(dist_fn.all_gather(t.contiguous()))

    def gather_plain(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` concatenated in rank order, without autograd (ids, counts)."""
        if self.world == 1:
            return t
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return torch.cat(out)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the ranks (a new tensor, without autograd)."""
        if self.world == 1:
            return t
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    def scale_loss(self, loss: torch.Tensor, weights: torch.Tensor | None, n_rows: int) -> torch.Tensor:
        """This rank's loss, a weighted mean over its own rows, rescaled so that the ranks'
        gradients *averaged* (what DDP does) are the gradient of the weighted mean over the
        global batch: × W · (this rank's weight) / (the global batch's weight). Unweighted rows
        count 1 each."""
        if self.world == 1:
            return loss
        local = weights.sum() if weights is not None else torch.tensor(float(n_rows), device=loss.device)
        total = self.sum(local.detach().to(torch.float64))
        share = self.world * local.detach().to(torch.float64) / total.clamp(min=1e-12)
        return loss * share.to(loss.dtype)

    def check_same(self, what: str, values: dict[str, int | float | str]) -> None:
        """Raise ShardMismatchError unless every rank passes the same `values`, naming each
        rank's values; `what` says what they describe (e.g. 'training data')."""
        if self.world == 1:
            return
        every = self.gather_objects(values)
        if any(v != every[0] for v in every):
            keys = list(dict.fromkeys(k for v in every for k in v))  # in the order given
            differ = [k for k in keys if len({repr(v.get(k)) for v in every}) > 1]
            per_rank = "; ".join(f"rank {r}: " + ", ".join(f"{k}={v.get(k)!r}" for k in differ) for r, v in enumerate(every))
            raise ShardMismatchError(
                f"unequal shards: the ranks disagree on {what} ({per_rank}); every rank must read the same "
                "data with the same config"
            )

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's `obj` (small, picklable), in rank order (long timeout)."""
        if self.world == 1:
            return [obj]
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, obj, group=self.control)
        return every

    def barrier(self) -> None:
        """Wait for every rank (long timeout: a rank may be finishing a long rank-0 section)."""
        if self.world > 1:
            dist.barrier(group=self.control)

    def broadcast(self, obj: T | None) -> T:
        """Rank 0's `obj` on every rank (small picklable values: decisions, paths)."""
        if self.world == 1:
            return obj  # type: ignore[return-value]
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]  # type: ignore[return-value]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and return its result on every rank. If it raises, rank 0
        re-raises and every other rank raises RankFailedError naming the failure, so no rank
        waits forever for a decision that will not come."""
        if self.world == 1:
            return fn()
        if not self.is_main:
            status, value = self.broadcast(None)
            if status == "error":
                raise RankFailedError(f"rank 0 failed: {value}")
            return value
        try:
            value = fn()
        except BaseException as e:
            self.broadcast(("error", f"{type(e).__name__}: {e}"))
            raise
        self.broadcast(("ok", value))
        return value

    # ---- gradients -----------------------------------------------------------------------
    def wrap(self, module: nn.Module, sparse: Sequence[nn.Parameter]) -> nn.Module:
        """`module` under DistributedDataParallel for its dense parameters (`module` itself in
        one process); the `sparse` parameters are left to `sync_sparse_grads`."""
        if self.world == 1:
            return module
        ids = {id(p) for p in sparse}
        names = [n for n, p in module.named_parameters() if id(p) in ids]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
        device = next(module.parameters()).device
        return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)

    @torch.no_grad()
    def sync_sparse_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Average the sparse gradients of `params` over the ranks, as DDP averages the dense
        ones: each rank's coalesced (row, values) pairs are gathered (padded to the largest
        count: collectives need equal shapes), summed per row and divided by W."""
        if self.world == 1 or not params:
            return
        grads = []
        for p in params:
            g = p.grad
            if g is None:
                g = torch.sparse_coo_tensor(torch.empty((1, 0), dtype=torch.int64, device=p.device),
                                            p.new_empty((0, *p.shape[1:])), p.shape)
            elif not g.is_sparse:
                raise ValueError(f"sync_sparse_grads: a table of shape {tuple(p.shape)} has a dense gradient")
            grads.append(g.coalesce())
        device = params[0].device
        counts = self.gather_plain(torch.tensor([[g._nnz() for g in grads]], device=device)).cpu()  # (W, tables)
        for p, g, col in zip(params, grads, counts.T, strict=True):
            m = int(col.max())
            packed = torch.zeros((m, 1 + p.shape[1]), dtype=torch.float64, device=device)  # row id (exact), values
            packed[: g._nnz(), 0] = g.indices()[0].to(torch.float64)
            packed[: g._nnz(), 1:] = g.values().to(torch.float64)
            every = self.gather_plain(packed).view(self.world, m, -1)
            keep = torch.arange(m).unsqueeze(0) < col.unsqueeze(1)  # (W, m): the real entries
            rows = every[keep.to(device)]
            summed = torch.sparse_coo_tensor(rows[:, 0].long().unsqueeze(0), rows[:, 1:] / self.world, g.shape).coalesce()
            p.grad = torch.sparse_coo_tensor(summed.indices(), summed.values().to(p.dtype), g.shape, is_coalesced=True)


ONE_PROCESS = Ranks()
_current: Ranks = ONE_PROCESS


def current() -> Ranks:
    """The ranks this process belongs to (`ONE_PROCESS` unless `session()` / `start()` ran)."""
    return _current


def rank_batch_size(batch_size: int, ranks: Ranks) -> int:
    """Rows per rank of a global batch of `batch_size` (W equal parts; the global batch becomes
    W·(batch_size // W) rows when W does not divide it)."""
    if batch_size < ranks.world:
        raise ValueError(f"batch_size={batch_size} is smaller than the {ranks.world} ranks: every rank needs a row")
    return batch_size // ranks.world


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r} must be a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{env}={raw!r} must be > 0 seconds")
    return value


def start(
    rank: int, world: int, *, backend: str = "gloo", init_method: str = "env://", local_rank: int | None = None,
    timeout_s: float | None = None, wait_s: float | None = None,
) -> Ranks:
    """Join the process group (`init_method` as `torch.distributed.init_process_group` takes it)
    and make this process's `Ranks` current. Timeouts default to the environment's (see the
    module docstring)."""
    global _current
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world size {world}: need 0 <= rank < world")
    if world == 1:
        _current = ONE_PROCESS
        return _current
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    wait = datetime.timedelta(seconds=wait_s if wait_s is not None else _seconds(WAIT_ENV, DEFAULT_WAIT_S))
    local = rank if local_rank is None else local_rank
    kwargs = {"device_id": torch.device("cuda", local)} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout, **kwargs)
    control = dist.new_group(backend="gloo", timeout=wait)
    _current = Ranks(rank=rank, world=world, local_rank=local, control=control)
    log.info("rank %d of %d joined (%s; collective timeout %ss, rank-0 wait %ss)",
             rank, world, backend, timeout.total_seconds(), wait.total_seconds())
    return _current


def shutdown() -> None:
    """Leave the process group (no-op in one process)."""
    global _current
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _current = ONE_PROCESS


@contextlib.contextmanager
def session(device: str | torch.device = "cpu") -> Iterator[Ranks]:
    """The ranks of a `torchrun` launch (from RANK / WORLD_SIZE / LOCAL_RANK), for the block;
    one process without them. NCCL when the run trains on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield ONE_PROCESS
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    ranks = start(rank, world, backend=backend, local_rank=local)
    try:
        yield ranks
    finally:
        shutdown()
