"""The fit loop: determinism, --full, crash safety, config validation."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file

from tests.conftest import tiny_train_config
from training.bundle import load_bundle
from training.config import ModelConfig, TrainConfig
from training.dataset import read_dataset
from training.split import is_cold_user, split_interactions
from training.train import TrainingDiverged, batch_bounds, fit


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


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"epochs": "3"}, "epochs='3' must be an integer"),
        ({"epochs": 2.5}, "epochs=2.5 must be an integer"),
        ({"epochs": True}, "epochs=True must be an integer"),
        ({"epochs": 0}, "epochs=0 must be >= 1"),
        ({"epochs": -1}, "epochs=-1 must be >= 1"),
        ({"batch_size": 0}, "batch_size=0 must be >= 1"),
        ({"refit": "false"}, "refit='false' must be true or false"),
        ({"refit": 0}, "refit=0 must be true or false"),
        ({"lr": "0.01"}, "lr='0.01' must be a finite number"),
        ({"lr": 0}, "lr=0 must be > 0"),
        ({"lr": float("nan")}, "lr=nan must be a finite number"),
        ({"seed": "1"}, "seed='1' must be an integer"),
        ({"ema_decay": None}, "ema_decay=None must be a finite number"),
        ({"ema_decay": 1.0}, r"ema_decay=1.0 must be in \[0, 1\)"),
        ({"eval_max_users": 0}, "eval_max_users=0 must be >= 1"),
        ({"full_epochs": 0}, "full_epochs=0 must be >= 1"),
        ({"hard_rank_band": [100, 20]}, "hard_rank_band=\\[100, 20\\] must be"),
        ({"hard_rank_band": ["20", 100]}, "must be a list of integers"),
        ({"objective": "softmax"}, "objective='softmax' must be one of"),
        ({"device": "gpu"}, "device='gpu' must be 'auto' or a torch device"),
        ({"model": None}, "model=None must be an object"),
        ({"model": {"id_dim": "8"}}, "model.id_dim='8' must be an integer"),
        ({"model": {"id_dim": 0}}, "model.id_dim=0 must be >= 1"),
        ({"model": {"hidden": [0]}}, "model.hidden=\\[0\\] must be a list of layer widths >= 1"),
        ({"model": {"temperature": 0}}, "model.temperature=0 must be > 0"),
        ({"model": {"temperature": -0.05}}, "model.temperature=-0.05 must be > 0"),
        ({"model": {"user_id_dropout": 1}}, r"model.user_id_dropout=1 must be in \[0, 1\)"),
        ({"history_alpha": 1.5}, r"history_alpha=1.5 must be in \[0, 1\]"),
        ({"objective": "listwise", "negative_sampler": "in_batch", "batch_size": 1}, "in-batch negatives need batches of >= 2"),
        ({"objective": "listwise", "negative_sampler": "mixture", "mixture_easy": "in_batch", "batch_size": 1}, "need batches of >= 2"),
        ({"objective": "listwise", "frequency": "streaming"}, "frequency='streaming' estimates the in-batch softmax's logQ"),
        ({"user_history": False, "history_free_id": True}, "history_free_id=true only applies with user_history=true"),
        ({"history_encoder": "attention"}, r"history_encoder='attention' must be one of \['mean', 'recency'\]"),
        ({"history_cold_max_len": -1}, r"history_cold_max_len=-1 must be >= 0"),
        ({"cold_row_weight": 0.0}, r"cold_row_weight=0.0 must be > 0"),
        ({"model": {"history": {"max_len": 5}}}, "model.history is written by the trainer"),
    ],
)
def test_config_checks_types_and_ranges(over: dict, message: str, tmp_path: Path) -> None:
    """Wrong types and values were accepted: "false" refit anyway, 0 epochs wrote an untrained
    bundle, batch_size 0 crashed after the data was read. The error names key, value, expectation."""
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(over)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(over))
    with pytest.raises(ValueError, match=f"config {p}: .*{message}"):
        TrainConfig.from_file(p)


def test_config_accepts_every_valid_shape() -> None:
    """ints where floats are expected, nulls where optional, and the default round-trips."""
    cfg = TrainConfig.from_dict({"lr": 1, "ema_decay": 0, "full_epochs": None, "cold_logq_weight": None,
                                 "eval_max_users": None, "mixed_negatives": 0, "model": {"temperature": 1, "hidden": []}})
    assert cfg.lr == 1 and cfg.full_epochs is None and cfg.model.hidden == []
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()


def test_committed_configs_stay_valid() -> None:
    """Every training config recorded under docs/results (and every bundle's) still loads."""
    root = Path(__file__).resolve().parents[2]
    found = 0

    def walk(o: object) -> Iterator[dict]:
        if isinstance(o, dict):
            if isinstance(o.get("model"), dict) and "temperature" in o["model"]:
                yield o
            for v in o.values():
                yield from walk(v)
        elif isinstance(o, list):
            for v in o:
                yield from walk(v)

    for path in sorted((root / "docs" / "results").glob("*.json")):
        for c in walk(json.loads(path.read_text())):
            base = TrainConfig().to_dict()
            TrainConfig.from_dict(base | {k: v for k, v in c.get("train", c).items() if k in base})
            ModelConfig.from_dict(c["model"])
            found += 1
    if found == 0:
        pytest.skip("no committed results")


def test_config_non_utf8_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.json"
    p.write_bytes(b'{"epochs": 2,\n "note": "caf\xe9"}')
    with pytest.raises(ValueError, match=rf"config {p}: not valid UTF-8: byte 0xe9 at line 2"):
        TrainConfig.from_file(p)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_clear_error_before_reading_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device='cuda': this machine has 0 CUDA device"):
        fit(tmp_path / "no-data", tmp_path / "m", tiny_train_config(device="cuda"), progress=False)


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_models_dir_checked_before_reading_data(tmp_path: Path, where: str) -> None:
    """--out that can never hold a bundle failed only after all training; the data dir here
    does not even exist, so the error proves the check comes first."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" if where == "file" else tmp_path / "afile" / "models"
    with pytest.raises(ValueError, match=f"models directory {out}: "):
        fit(tmp_path / "no-data", out, tiny_train_config(), progress=False)


@pytest.mark.parametrize("full", [False, True])
def test_diverged_fit_writes_no_bundle(tiny_dataset: Path, tmp_path: Path, full: bool) -> None:
    """lr 1e30 made the loss NaN; the NaN weights were saved as a bundle with exit 0."""
    cfg = tiny_train_config(lr=1e30, epochs=3, full_epochs=3, refit=False, cold_calibration_steps=0)
    with pytest.raises(TrainingDiverged, match=r"training diverged: .* at epoch \d+; lower lr / check temperature"):
        fit(tiny_dataset, tmp_path / "m", cfg, full=full, progress=False)
    assert not (tmp_path / "m").exists() or list((tmp_path / "m").iterdir()) == []


def test_no_positive_training_weight_is_an_error(tiny_dataset: Path, tmp_path: Path) -> None:
    """Only held-out rows weigh anything: the fit split trains on nothing (was exit 0)."""
    data = tmp_path / "d"
    shutil.copytree(tiny_dataset, data)
    df = pd.read_csv(data / "interactions.csv", dtype=str)
    df["weight"] = "0"
    cold = next(u for u in df["user_id"] if is_cold_user(u))
    df.loc[df["user_id"] == cold, "weight"] = "1"  # a cold user's rows: never in training
    df.to_csv(data / "interactions.csv", index=False)
    with pytest.raises(ValueError, match="every training interaction has weight 0"):
        fit(data, tmp_path / "m", tiny_train_config(epochs=1), progress=False)


@pytest.mark.parametrize(("n_rows", "batch_size", "want"), [
    (10, 4, [(0, 4), (4, 8), (8, 10)]),
    (9, 4, [(0, 4), (4, 9)]),        # a 1-row tail joins the batch before it
    (1, 4, [(0, 1)]),                # a single row is still trained on
    (8, 4, [(0, 4), (4, 8)]),
    (5, 1, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),  # batch_size 1 stays 1 (no in-batch negatives)
])
def test_batch_bounds_cover_every_row_once_without_a_one_row_tail(n_rows: int, batch_size: int, want: list) -> None:
    got = batch_bounds(n_rows, batch_size)
    assert got == want
    assert [i for a, b in got for i in range(a, b)] == list(range(n_rows))


def test_in_batch_sampler_trains_when_a_pass_would_end_with_one_row(tiny_dataset: Path, tmp_path: Path) -> None:
    """Row count ≡ 1 (mod batch_size) made the last batch a single row, and the in-batch sampler
    raised "needs a batch of at least 2 rows" mid-training (or in the refit pass)."""
    split = split_interactions(read_dataset(tiny_dataset).interactions)
    n_fit = len(split.fit)
    cfg = tiny_train_config(objective="listwise", negative_sampler="in_batch", num_negatives=2,
                            batch_size=n_fit - 1, epochs=1, refit=False)
    assert load_bundle(fit(tiny_dataset, tmp_path / "m", cfg, progress=False)).manifest["metrics"]["recall@20"] is not None


def test_early_stopping_breaks_recall_ties_with_ndcg(tmp_path: Path) -> None:
    """On a catalog of <= 20 items recall@20 is 1 at every epoch; the strict > on recall alone
    kept epoch 1 whatever the ranking did after. The chosen epoch is the best (recall, ndcg)."""
    from training.prepare import prepare_synthetic

    data = prepare_synthetic(tmp_path / "d", n_users=80, n_items=15, n_interactions=800, seed=1)
    cfg = tiny_train_config(epochs=4, patience=4, refit=False, batch_size=32, cold_calibration_steps=0, lr=1e-2)
    manifest = load_bundle(fit(data, tmp_path / "m", cfg, progress=False)).manifest
    hist = manifest["history"]
    assert {row["val_recall@20"] for row in hist} == {1.0}  # the tie this test is about
    best = max(hist, key=lambda row: (row["val_recall@20"], row["val_ndcg@20"]))
    assert manifest["best_epoch"] == best["epoch"]
    assert best["epoch"] > 1  # the ranking kept improving after epoch 1 (else the test shows nothing)
