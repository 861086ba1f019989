"""The fit loop: determinism, --full, crash safety, config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from tests.conftest import tiny_train_config
from training.bundle import load_bundle
from training.train import TrainConfig, fit


def test_same_seed_same_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    a = fit(tiny_dataset, tmp_path / "a", tiny_train_config(epochs=1), progress=False)
    b = fit(tiny_dataset, tmp_path / "b", tiny_train_config(epochs=1), progress=False)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), k
    c = fit(tiny_dataset, tmp_path / "c", tiny_train_config(epochs=1, seed=7), progress=False)
    wc = load_file(str(c / "model.safetensors"))
    assert any((wa[k] != wc[k]).any() for k in wa)


def test_full_mode_trains_on_everything_and_skips_metrics(tiny_dataset: Path, tmp_path: Path) -> None:
    path = fit(tiny_dataset, tmp_path, tiny_train_config(full_epochs=1), full=True, progress=False)
    b = load_bundle(path)
    assert b.manifest["full"] is True and b.manifest["metrics"] == {}
    assert len(b.manifest["history"]) == 1
    # cold users (id % 10 == 0 rule → crc32 for 'u…' ids) are in the vocabulary in full mode
    from training.split import is_cold_user

    assert any(is_cold_user(u) for u in b.model.user_encoder.ids.tokens)
    counts = json.loads((path / "item_counts.json").read_text())
    total = len((tiny_dataset / "interactions.csv").read_text().splitlines()) - 1
    assert sum(counts.values()) == total


def test_refit_retrains_on_fit_plus_val_for_the_chosen_epochs(tiny_dataset: Path, tmp_path: Path) -> None:
    from training.dataset import read_dataset
    from training.split import split_interactions

    plain = load_bundle(fit(tiny_dataset, tmp_path / "a", tiny_train_config(epochs=3, patience=1, refit=False), progress=False))
    refit = load_bundle(fit(tiny_dataset, tmp_path / "b", tiny_train_config(epochs=3, patience=1, refit=True), progress=False))
    # the same first pass chose the epoch count; its validation history is kept
    assert refit.manifest["best_epoch"] == plain.manifest["best_epoch"]
    assert refit.manifest["history"] == plain.manifest["history"]
    split = split_interactions(read_dataset(tiny_dataset).interactions)
    # the logQ counts (and so the training rows) are those of fit + val, not fit alone
    counts = json.loads((refit.path / "item_counts.json").read_text())
    assert sum(counts.values()) == len(split.train) > len(split.fit)
    assert sum(json.loads((plain.path / "item_counts.json").read_text()).values()) == len(split.fit)
    assert set(refit.manifest["metrics"]) == set(plain.manifest["metrics"])
    assert refit.manifest["metrics"] != plain.manifest["metrics"]


def test_recency_boost_trains_and_changes_the_model(tiny_dataset: Path, tmp_path: Path) -> None:
    a = fit(tiny_dataset, tmp_path / "a", tiny_train_config(epochs=1, recency_boost=0.0), progress=False)
    b = fit(tiny_dataset, tmp_path / "b", tiny_train_config(epochs=1, recency_boost=3.0), progress=False)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert any((wa[k] != wb[k]).any() for k in wa)


def test_failure_leaves_no_bundle(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.bundle as bundle_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_mod, "write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        fit(tiny_dataset, tmp_path / "m", tiny_train_config(epochs=1), progress=False)
    assert list((tmp_path / "m").iterdir()) == []


def test_config_rejects_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown training config key\(s\) \['epochz'\]"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['layers'\]"):
        TrainConfig.from_dict({"model": {"layers": 3}})
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"epochs": 3, "model": {"hidden": [8]}}))
    cfg = TrainConfig.from_file(p)
    assert cfg.epochs == 3 and cfg.model.hidden == [8]
