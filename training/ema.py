"""An exponential moving average of the weights (Polyak averaging), lazy for sparse tables.

After every optimizer step the average moves toward the live weights:
`avg ← d·avg + (1 − d)·w`. The average is what gets validated and kept. It smooths the
step-to-step noise of small-batch training, so which epoch early stopping picks depends less
on where the last few steps happened to land. With about 70 steps an epoch on ML-100K, d = 0.99
averages over roughly the last 1.5 epochs.

The decay warms up as `d_t = min(d, (1 + t) / (10 + t))` after t earlier updates (the schedule
of TensorFlow's `ExponentialMovingAverage` with `num_updates`): a plain d = 0.99 would keep 67 %
of the random initialization after 40 steps, so a small dataset's few hundred steps would serve
a model close to its starting point.

Lazy rows. A catalog-sized embedding table trained with sparse gradients (`training.optim`)
changes only the rows a step touched; averaging every row every step would make the step's cost
grow with the catalog again. A row untouched since update s keeps its live value w, and the
dense recurrence over updates s..t−1 then has a closed form:
`avg_t = P·avg_s + (1 − P)·w` with `P = Π_{s ≤ k < t} d_k`. So each row of a lazy parameter
remembers the update it was last averaged at (`last`), the cumulative `Σ log d_k` is kept per
update, and a row is brought up to date only when the optimizer is about to move it
(`before_step`, which must run before `optimizer.step()`) or when the whole average is read
(`swapped`, `copy_to_params`, `synced`). The result equals the dense average up to float
rounding (tests/training/test_ema.py checks it against the dense recurrence).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch


class WeightAverage:
    """Shadow copies of `params`, updated by `update()` after each optimizer step.

    `lazy`: parameters (a subset of `params`, 2-D tables) whose gradients are sparse and whose
    untouched rows the optimizer leaves unchanged (SparseAdam): they are averaged row by row,
    lazily, and `before_step()` must be called after backward and before `optimizer.step()`.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float, lazy: Iterable[torch.nn.Parameter] = ()) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0
        lazy_ids = {id(p) for p in lazy}
        unknown = lazy_ids - {id(p) for p in self.params}
        if unknown:
            raise ValueError(f"{len(unknown)} lazy parameter(s) are not among the averaged parameters")
        self._lazy = [i for i, p in enumerate(self.params) if id(p) in lazy_ids]
        for i in self._lazy:
            if self.params[i].dim() != 2:
                raise ValueError(f"a lazily averaged parameter must be a 2-D table, got shape {tuple(self.params[i].shape)}")
        # last[i][r]: the number of updates already folded into shadow row r of lazy parameter i
        self._last = {i: torch.zeros(len(self.params[i]), dtype=torch.int64, device=self.params[i].device) for i in self._lazy}
        self._log_cum = torch.zeros(1024, dtype=torch.float64)  # _log_cum[t] = Σ_{k < t} log d_k
        self._touched: dict[int, torch.Tensor] | None = None

    def _d(self, t: int) -> float:
        return min(self.decay, (1 + t) / (10 + t))

    def _catch_up(self, i: int, rows: torch.Tensor | None) -> None:
        """Fold the updates between each row's `last` and now into shadow rows `rows` (None: all),
        the live rows having stayed constant meanwhile."""
        s, p, last = self.shadow[i], self.params[i].detach(), self._last[i]
        lc = self._log_cum.to(last.device)
        seen = last if rows is None else last[rows]
        keep = torch.exp(lc[self.updates] - lc[seen]).to(s.dtype).unsqueeze(1)  # Π d_k over the missed updates
        if rows is None:
            s.mul_(keep).add_((1 - keep) * p)
            last.fill_(self.updates)
        else:
            s[rows] = keep * s[rows] + (1 - keep) * p[rows]
            last[rows] = self.updates

    @torch.no_grad()
    def before_step(self) -> None:
        """Bring the rows this step's sparse gradients touch up to date, before the optimizer
        moves them (the closed form needs their value from before the step)."""
        self._touched = {}
        for i in self._lazy:
            g = self.params[i].grad
            if g is None:
                rows = torch.empty(0, dtype=torch.int64, device=self.params[i].device)
            elif g.is_sparse:
                g = g.coalesce()
                self.params[i].grad = g  # the optimizer would coalesce it again otherwise
                rows = g.indices()[0]
            else:  # a dense gradient moves every row (e.g. dense Adam): average it densely
                rows = torch.arange(len(self.params[i]), device=g.device)
            self._catch_up(i, rows)
            self._touched[i] = rows

    @torch.no_grad()
    def update(self) -> None:
        if self._lazy and self._touched is None:
            raise RuntimeError("WeightAverage.update(): call before_step() after backward and before optimizer.step()")
        d = self._d(self.updates)
        lazy = set(self._lazy)
        for i, (s, p) in enumerate(zip(self.shadow, self.params, strict=True)):
            if i not in lazy:
                s.lerp_(p.detach(), 1.0 - d)
                continue
            rows = self._touched[i]  # type: ignore[index]
            s[rows] = d * s[rows] + (1.0 - d) * p.detach()[rows]
            self._last[i][rows] = self.updates + 1
        if self.updates + 1 >= len(self._log_cum):
            self._log_cum = torch.cat([self._log_cum, torch.zeros_like(self._log_cum)])
        self._log_cum[self.updates + 1] = self._log_cum[self.updates] + math.log(max(d, 1e-300))  # d = 0: P underflows to 0, no NaN
        self.updates += 1
        self._touched = None

    @torch.no_grad()
    def sync(self) -> None:
        """Bring every lazy row up to date (O(table) once; before reading the whole average)."""
        for i in self._lazy:
            self._catch_up(i, None)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Overwrite the live weights with the average (the end of training)."""
        self.sync()
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the parameters hold the average; the live weights come back after."""
        live = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for keep, p in zip(live, self.params, strict=True):
                    p.copy_(keep)
