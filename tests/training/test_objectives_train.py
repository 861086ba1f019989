"""One short training run per objective / sampler / SSL option on the tiny dataset."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import tiny_train_config
from training.bundle import load_bundle
from training.task import RetrievalTask
from training.train import fit


@pytest.mark.parametrize(
    "over",
    [
        {"objective": "pointwise", "negative_sampler": "uniform"},
        {"objective": "triplet_hinge", "negative_sampler": "hard", "hard_rank_band": [5, 40]},
        {"objective": "triplet_logistic", "negative_sampler": "in_batch"},
        {"objective": "listwise", "negative_sampler": "mixture", "num_negatives": 4, "positive_beta": 0.5},
        {"objective": "listwise", "negative_sampler": "popularity", "ssl_weight": 0.3, "ssl_augmentation": "correlated"},
        {"frequency": "streaming", "positive_keep_t": 0.01, "ssl_weight": 0.3, "ssl_augmentation": "random"},
        {"mixed_negatives": 64},
        {"mixed_negatives": 32, "frequency": "streaming", "cold_logq_weight": None},
    ],
    ids=[
        "pointwise-uniform", "hinge-hard", "logistic-inbatch", "listwise-mixture", "listwise-pop-ssl", "inbatch-stream-ssl",
        "inbatch-mixed", "inbatch-mixed-stream",
    ],
)
def test_objective_trains_one_epoch(tiny_dataset: Path, tmp_path: Path, over: dict) -> None:
    path = fit(tiny_dataset, tmp_path, tiny_train_config(epochs=1, **over), progress=False)
    b = load_bundle(path)
    assert all(math.isfinite(r["loss"]) for r in b.manifest["history"])
    assert b.model.embed_items(pd.read_csv(tiny_dataset / "items.csv", dtype=str)).shape[1] == 16


def test_exposures_are_never_negatives(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Items seen only in exposure rows (clicked = 0) never enter a batch, so never as negatives."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    inter = pd.read_csv(data / "interactions.csv", dtype=str)
    clicked_items = set(inter["item_id"])
    items = pd.read_csv(data / "items.csv", dtype=str)
    exposed_only = [i for i in items["item_id"] if i not in clicked_items][:5]
    assert exposed_only, "tiny dataset should have never-clicked items"
    users = inter["user_id"].unique()[:50]
    expo = pd.DataFrame({
        "user_id": [u for u in users for _ in exposed_only],
        "item_id": exposed_only * len(users),
        "timestamp": inter["timestamp"].iloc[0],
    })
    inter = pd.concat([inter.assign(clicked="1"), expo.assign(clicked="0")], ignore_index=True)
    if "weight" in inter:
        inter["weight"] = inter["weight"].fillna("1")
    inter.to_csv(data / "interactions.csv", index=False)
    expo_rows = set(items.index[items["item_id"].isin(exposed_only)])

    seen: set[int] = set()
    orig_call = RetrievalTask.__call__

    def spy_call(self, user, item, item_ids, *a, **k):
        seen.update(item_ids.tolist())
        return orig_call(self, user, item, item_ids, *a, **k)

    monkeypatch.setattr(RetrievalTask, "__call__", spy_call)
    fit(data, tmp_path / "m1", tiny_train_config(epochs=1), progress=False)
    assert seen and not (seen & expo_rows)

    import training.samplers as samplers_mod

    orig_sample = samplers_mod.InBatchSampler.sample
    negs: set[int] = set()

    def spy_sample(self, user_idx, pos_ids, k, generator):
        ids, lq = orig_sample(self, user_idx, pos_ids, k, generator)
        negs.update(ids.reshape(-1).tolist())
        return ids, lq

    monkeypatch.setattr(samplers_mod.InBatchSampler, "sample", spy_sample)
    fit(data, tmp_path / "m2", tiny_train_config(epochs=1, objective="listwise", negative_sampler="in_batch"), progress=False)
    assert negs and not (negs & expo_rows)


def test_mixed_negatives_need_in_batch_softmax(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mixed_negatives=8: .*'in_batch_softmax' only"):
        fit(tiny_dataset, tmp_path, tiny_train_config(epochs=1, mixed_negatives=8, objective="listwise"), progress=False)
    with pytest.raises(ValueError, match="mixed_negatives=-1"):
        fit(tiny_dataset, tmp_path, tiny_train_config(epochs=1, mixed_negatives=-1), progress=False)


def test_mixed_negatives_default_follows_the_objective(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, MNS is on with the in-batch softmax (min(1024, catalog) uniform negatives a step)
    and off with sampled objectives, which then train without complaint."""
    import training.task as task_mod

    seen: list[tuple[int, int]] = []
    real = task_mod.mixed_log_q
    monkeypatch.setattr(task_mod, "mixed_log_q", lambda lp, b, m, n: seen.append((m, n)) or real(lp, b, m, n))
    assert tiny_train_config().mixed_negatives is None
    fit(tiny_dataset, tmp_path / "inbatch", tiny_train_config(epochs=1), progress=False)
    n_items = len(pd.read_csv(tiny_dataset / "items.csv"))
    assert n_items < 1024 and seen and set(seen) == {(n_items, n_items)}  # capped at the catalog size
    seen.clear()
    fit(tiny_dataset, tmp_path / "listwise", tiny_train_config(epochs=1, objective="listwise"), progress=False)
    assert seen == []
    fit(tiny_dataset, tmp_path / "off", tiny_train_config(epochs=1, mixed_negatives=0), progress=False)
    assert seen == []
