"""Weight averaging: the update rule by hand, the swap restores the live weights, fit wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_train_config
from training.ema import WeightAverage
from training.train import fit


def test_update_follows_the_recurrence_by_hand() -> None:
    p = torch.nn.Parameter(torch.tensor([0.0, 40.0]))
    ema = WeightAverage([p], decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([40.0, 0.0]))
    ema.update()  # warm-up: d = min(0.5, 1/10) = 0.1 → 0.1·[0, 40] + 0.9·[40, 0] = [36, 4]
    assert torch.allclose(ema.shadow[0], torch.tensor([36.0, 4.0]))
    ema.update()  # d = min(0.5, 2/11) → [36, 4]·2/11 + [40, 0]·9/11
    assert torch.allclose(ema.shadow[0], torch.tensor([36.0 * 2 / 11 + 40.0 * 9 / 11, 4.0 * 2 / 11]))
    ema.updates = 100  # warm-up over: d = min(0.5, 101/110) = 0.5
    before = ema.shadow[0].clone()
    ema.update()
    assert torch.allclose(ema.shadow[0], 0.5 * before + 0.5 * torch.tensor([40.0, 0.0]))
    assert torch.equal(p.detach(), torch.tensor([40.0, 0.0]))  # the live weights are not touched


def test_a_few_hundred_steps_do_not_leave_the_average_near_the_start() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    ema = WeightAverage([p], decay=0.999)
    with torch.no_grad():
        p.fill_(1.0)
    for _ in range(200):
        ema.update()
    # without the warm-up 0.999^200 = 82 % of the start would remain; with it, under 5 %
    assert ema.shadow[0].item() > 0.95


def test_swapped_shows_the_average_then_restores_the_live_weights() -> None:
    p = torch.nn.Parameter(torch.tensor([2.0]))
    ema = WeightAverage([p], decay=0.5)
    ema.updates = 100  # past the warm-up: d = 0.5
    with torch.no_grad():
        p.fill_(6.0)
    ema.update()  # 0.5·2 + 0.5·6 = 4
    with ema.swapped():
        assert p.item() == 4.0
    assert p.item() == 6.0
    ema.copy_to_params()
    assert p.item() == 4.0


@pytest.mark.parametrize("decay", [-0.1, 1.0, 2.0])
def test_rejects_a_decay_outside_zero_one(decay: float) -> None:
    with pytest.raises(ValueError, match="EMA decay must be in"):
        WeightAverage([torch.nn.Parameter(torch.zeros(1))], decay)


def test_fit_validates_and_keeps_the_average(tiny_dataset: Path, tmp_path: Path) -> None:
    plain = fit(tiny_dataset, tmp_path / "plain", tiny_train_config(epochs=3, patience=3, ema_decay=0.0), progress=False)
    avg = fit(tiny_dataset, tmp_path / "ema", tiny_train_config(epochs=3, patience=3, ema_decay=0.9), progress=False)
    hist = lambda p: [h["val_recall@20"] for h in json.loads((p / "manifest.json").read_text())["history"]]  # noqa: E731
    assert hist(plain) != hist(avg)  # validation saw different (averaged) weights
    with pytest.raises(ValueError, match="ema_decay=1.0 must be in"):
        fit(tiny_dataset, tmp_path / "bad", tiny_train_config(ema_decay=1.0), progress=False)
