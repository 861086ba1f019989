"""The optimizer of a training pass: sparse updates for the catalog-sized tables, Adam for the rest.

A step of in-batch training touches a few thousand rows of the id and history tables (the
batch's users, its positives, the mixed negatives, the batch users' clicked items), whatever
the catalog's size. With dense gradients every step would still read and write every row of
those tables three times (the gradient, Adam's two moments) plus once more in the weight
average, so a step's cost would grow with the catalog: on 1M items that was ~80 % of the step.
So the big tables produce sparse gradients (`nn.Embedding(sparse=True)`) and are updated by
`torch.optim.SparseAdam`, which reads and writes only the rows in the gradient; the weight
average follows them lazily (`training.ema`). The MLPs and the small feature tables keep
dense Adam.

SparseAdam is "lazy Adam": a row's moments decay only at steps that touch it, where dense Adam
keeps moving a row along its stale momentum with a zero gradient. On a step that touches every
row both are the same update (tests/training/test_optim.py checks it over many steps); for rows
a step leaves out, lazy Adam simply does not move them — the behaviour of the embedding
optimizers of TensorFlow (LazyAdam) and TorchRec. TorchRec's fused embedding optimizers would do
the same inside FBGEMM kernels, but the `fbgemm-gpu-cpu` 1.9.0 wheel does not load with torch
2.13 (undefined `torch::autograd::_wrap_outputs` symbol), so plain PyTorch it is.

`sparse_tables` (TrainConfig): true = every id / history table is sparse; false = dense Adam for
everything (the reference path); null (auto) = a table with at least `SPARSE_MIN_ROWS` rows is
sparse, provided `weight_decay` is 0. Why the threshold: on a small table (ML-100K: 944 users,
1,683 items) a batch touches a large share of the rows anyway, so the sparse bookkeeping
(coalescing, index gathers) costs more than the dense update it saves, and dense Adam keeps
the numbers that ML-100K's results were tuned on. Why weight decay turns it off: Adam's L2 decay
pulls every row toward 0 at every step, which is O(table) by definition and which SparseAdam
does not implement.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["SPARSE_MIN_ROWS", "TableOptimizer", "choose_sparse_tables", "keep_rows_gradient"]

SPARSE_MIN_ROWS = 16_384


def choose_sparse_tables(tables: Sequence[nn.Embedding], setting: bool | None, weight_decay: float) -> list[nn.Embedding]:
    """The tables among `tables` (the id / history tables) to train with sparse gradients."""
    if setting is False:
        return []
    if setting is True:
        if weight_decay > 0:
            raise ValueError(f"sparse_tables=true with weight_decay={weight_decay}: SparseAdam has no weight decay")
        return list(tables)
    if weight_decay > 0:
        return []
    return [t for t in tables if t.num_embeddings >= SPARSE_MIN_ROWS]


class TableOptimizer:
    """Adam over the dense parameters + SparseAdam over the sparse tables, stepped together.

    `sparse` tables are switched to sparse gradients here (`emb.sparse = True`); their weights
    are not touched, so a model saved after training has the same format either way.
    """

    def __init__(
        self, params: Iterable[nn.Parameter], sparse: Sequence[nn.Embedding], *, lr: float, weight_decay: float = 0.0
    ) -> None:
        self.sparse_params = [t.weight for t in sparse]
        sparse_ids = {id(p) for p in self.sparse_params}
        params = list(params)
        missing = sparse_ids - {id(p) for p in params}
        if missing:
            raise ValueError(f"{len(missing)} sparse table(s) are not among the trained parameters")
        for t in sparse:
            t.sparse = True
        self.dense_params = [p for p in params if id(p) not in sparse_ids]
        self.dense = torch.optim.Adam(self.dense_params, lr=lr, weight_decay=weight_decay) if self.dense_params else None
        self.sparse = torch.optim.SparseAdam(self.sparse_params, lr=lr) if self.sparse_params else None

    def zero_grad(self) -> None:
        for opt in (self.dense, self.sparse):
            if opt is not None:
                opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self) -> None:
        for opt in (self.dense, self.sparse):
            if opt is not None:
                opt.step()


def keep_rows_gradient(weight: nn.Parameter, rows: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Let only `rows` of the table `weight` learn: a gradient hook drops every other row's
    gradient, dense (multiplied by a row mask) or sparse (its entries for other rows removed,
    so a sparse optimizer never sees, let alone moves, them).

    Used for the user id table when users are their history alone (`history_free_id` off): only
    the out-of-vocabulary row 0, the fallback of unseen users, trains. A hook on `.grad`
    multiplication alone would break with sparse gradients (no broadcasting for sparse × dense),
    which is why both layouts are handled explicitly here.
    """
    keep = torch.zeros(len(weight), dtype=torch.bool, device=weight.device)
    keep[rows] = True
    dense_keep = keep.to(weight.dtype).unsqueeze(1)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if not grad.is_sparse:
            return grad * dense_keep
        grad = grad.coalesce()
        sel = keep[grad.indices()[0]]
        return torch.sparse_coo_tensor(
            grad.indices()[:, sel], grad.values()[sel], grad.shape, is_coalesced=True, check_invariants=False
        )

    return weight.register_hook(hook)
