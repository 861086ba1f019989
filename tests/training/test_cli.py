"""`trainer` CLI: a failure is exactly one line on stderr and a non-zero exit."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from training.bundle import Bundle
from training.cli import check_bundle_matches_dataset
from training.dataset import read_dataset

TRAINER = Path(sys.executable).parent / "trainer"


def test_bad_dataset_is_one_stderr_line(tmp_path: Path) -> None:
    p = subprocess.run([str(TRAINER), "fit", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainer fit: error:") and "nope" in lines[0]
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_prepare_refuses_non_empty_out(tiny_dataset: Path) -> None:
    p = subprocess.run([str(TRAINER), "prepare", "synthetic", "--out", str(tiny_dataset)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "already exists and is not empty" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def _trainer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TRAINER), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"epochs": "3"}, "epochs='3' must be an integer"),
        ({"refit": "false"}, "refit='false' must be true or false"),
        ({"model": {"temperature": 0}}, "model.temperature=0 must be > 0"),
    ],
)
def test_fit_bad_config_exits_2_naming_key(tmp_path: Path, config: dict, message: str) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(config))
    p = _trainer("fit", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m"), "--config", str(cfg))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"config {cfg}: {message}" in lines[0]


def test_fit_out_is_a_file_exits_2_before_reading_data(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    p = _trainer("fit", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "afile" / "m"))
    assert p.returncode == 2 and f"models directory {tmp_path / 'afile' / 'm'}" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_evaluate_refuses_a_bundle_of_another_schema(tiny_dataset: Path, tiny_bundle_path: Path, tmp_path: Path) -> None:
    """It printed all-1.0 metrics for a bundle whose features the dataset does not have."""
    data = tmp_path / "d"
    shutil.copytree(tiny_dataset, data)
    schema = json.loads((data / "schema.json").read_text())
    del schema["item"]["features"]["year"]
    (data / "schema.json").write_text(json.dumps(schema))
    p = _trainer("evaluate", "--data", str(data), "--model", str(tiny_bundle_path))
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "another feature schema" in lines[0] and "item.year" in lines[0]


def test_evaluate_warns_on_other_data_or_full_bundle(tiny_dataset: Path, tiny_bundle: Bundle, tmp_path: Path) -> None:
    assert check_bundle_matches_dataset(tiny_bundle, read_dataset(tiny_dataset)) == []
    data = tmp_path / "d"
    shutil.copytree(tiny_dataset, data)
    df = pd.read_csv(data / "interactions.csv", dtype=str)
    df.iloc[:-1].to_csv(data / "interactions.csv", index=False)
    full = Bundle(path=tiny_bundle.path, manifest=copy.deepcopy(tiny_bundle.manifest) | {"full": True}, model=tiny_bundle.model)
    warnings = check_bundle_matches_dataset(full, read_dataset(data))
    assert len(warnings) == 2
    assert "trained with --full" in warnings[0] and "data fingerprint differs" in warnings[1]


def test_prepare_synthetic_warns_when_short(tmp_path: Path) -> None:
    """It silently wrote 4,341 of 5,000 asked-for clicks (repeats are dropped)."""
    p = _trainer("prepare", "synthetic", "--out", str(tmp_path / "d"), "--users", "100", "--items", "200",
                 "--interactions", "5000")
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == str(tmp_path / "d")
    n = len(pd.read_csv(tmp_path / "d" / "interactions.csv"))
    assert n < 5000 and f"trainer prepare: warning: wrote {n:,} of the 5,000 interactions" in p.stderr
