"""An exponential moving average of the weights (Polyak averaging).

After every optimizer step the average moves toward the live weights:
`avg ← d·avg + (1 − d)·w`. The average is what gets validated and kept. It smooths the
step-to-step noise of small-batch training, so which epoch early stopping picks depends less
on where the last few steps happened to land. With about 70 steps an epoch on ML-100K, d = 0.99
averages over roughly the last 1.5 epochs.

The decay warms up as `d_t = min(d, (1 + t) / (10 + t))` after t earlier updates (the schedule
of TensorFlow's `ExponentialMovingAverage` with `num_updates`): a plain d = 0.99 would keep 67 %
of the random initialization after 40 steps, so a small dataset's few hundred steps would serve
a model close to its starting point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


class WeightAverage:
    """Shadow copies of `params`, updated by `update()` after each optimizer step."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Overwrite the live weights with the average (the end of training)."""
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
