"""`trainer export --format onnx` (training/export.py) against PyTorch and a client without our code.

The oracle is the torch tower on the project's own encoding (`TowerEncoder.encode_records`):
onnxruntime must give the same unit vectors (max abs diff <= 1e-5) on every feature type,
missing values, unknown ids and categories, for batches of 1 and 1,000; and
tests/training/onnx_client.py, which reads only preprocessing.json and the .onnx files, must
encode exactly as we do and reproduce the reference vectors shipped in preprocessing.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnxruntime as ort  # noqa: E402

from tests.training.onnx_client import TowerClient  # noqa: E402
from training import cli  # noqa: E402
from training.artifacts import check_hashes, read_json  # noqa: E402
from training.config import ModelConfig  # noqa: E402
from training.export import BATCH, OUTPUT, ExportError, export_onnx, input_names, reference_records  # noqa: E402
from training.features import TowerEncoder  # noqa: E402
from training.model import TwoTowerModel  # noqa: E402
from training.schema import FeatureSpec  # noqa: E402

TOL = 1e-5
SPECS = {
    "country": FeatureSpec("country", "categorical"),
    "tags": FeatureSpec("tags", "multi_categorical", "|"),
    "age": FeatureSpec("age", "continuous"),
}
ITEM_SPECS = {
    "genre": FeatureSpec("genre", "categorical"),
    "labels": FeatureSpec("labels", "multi_categorical", ","),
    "price": FeatureSpec("price", "continuous"),
}


def _model() -> TwoTowerModel:
    """Both towers with a feature of every type; the item tower also takes its popularity."""
    rng = np.random.default_rng(0)
    n = 120
    users = pd.DataFrame({
        "user_id": [f"u{i}" for i in range(n)],
        "country": rng.choice(["de", "fr", "it", "es"], n),
        "tags": ["|".join(rng.choice(list("abcde"), rng.integers(0, 5), replace=False)) for _ in range(n)],
        "age": [str(v) for v in rng.integers(16, 80, n)],
    })
    items = pd.DataFrame({
        "item_id": [f"i{i}" for i in range(40)],
        "genre": rng.choice(["rock", "pop", "jazz"], 40),
        "labels": [",".join(rng.choice(list("xyzw"), rng.integers(0, 4), replace=False)) for _ in range(40)],
        "price": [f"{v:.2f}" for v in rng.gamma(2.0, 10.0, 40)],
    })
    user_enc = TowerEncoder.fit("user", SPECS, users["user_id"].repeat(2), users, n_buckets=5)
    item_enc = TowerEncoder.fit("item", ITEM_SPECS, rng.choice(items["item_id"], 500), items, n_buckets=4, popularity=True)
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=8, id_dim=6, feature_dim=4, hidden=[16, 12], dropout=0.1)
    model = TwoTowerModel(cfg, user_enc, item_enc)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[TwoTowerModel, Path]:
    model = _model()
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_onnx(model, {"version": "test-version", "data_fingerprint": "x"}, out)
    return model, out


def _random_records(enc: TowerEncoder, n: int, seed: int) -> list[dict]:
    """Known and unknown ids, known and unseen categories and tokens, missing (absent or null)
    values, multi values as lists or joined strings, continuous values inside and far outside
    the training range."""
    rng = np.random.default_rng(seed)
    key = f"{enc.side}_id"
    recs = []
    for _ in range(n):
        feats: dict[str, object] = {}
        for name, spec in enc.specs.items():
            r = rng.random()
            if r < 0.15:
                continue  # absent
            if r < 0.25:
                feats[name] = None
                continue
            if spec.type == "categorical":
                feats[name] = str(rng.choice([*enc.vocabs[name].tokens, "unseen"]))
            elif spec.type == "multi_categorical":
                toks = [str(t) for t in rng.choice([*enc.vocabs[name].tokens, "zz"], rng.integers(0, 7))]
                feats[name] = toks if rng.random() < 0.5 else spec.separator.join(toks)
            else:
                st = enc.stats[name]
                feats[name] = float(rng.choice([rng.normal(st.mean, st.std), rng.normal(0, 1e4), st.boundaries[0] if st.boundaries else 0.0]))
        rid = rng.choice([None, "unknown-id", *enc.ids.tokens[:20]])
        recs.append({key: None if rid is None else str(rid), "features": feats})
    return recs


def _torch(model: TwoTowerModel, side: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
    tower = model.user_tower if side == "user" else model.item_tower
    with torch.inference_mode():
        return tower({k: torch.from_numpy(v) for k, v in arrays.items()}).numpy()


@pytest.mark.parametrize("batch", [1, 1000])
@pytest.mark.parametrize("side", ["user", "item"])
def test_onnxruntime_equals_torch(exported: tuple[TwoTowerModel, Path], side: str, batch: int) -> None:
    model, out = exported
    enc = model.user_encoder if side == "user" else model.item_encoder
    sess = ort.InferenceSession(str(out / f"{side}_tower.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == input_names(enc)
    assert all(i.shape[0] == BATCH for i in sess.get_inputs())
    records = _random_records(enc, batch, seed=batch)
    arrays = enc.encode_records(records)
    got = sess.run([OUTPUT], {k: arrays[k] for k in input_names(enc)})[0]
    want = _torch(model, side, arrays)
    assert got.shape == (batch, model.embedding_dim) and got.dtype == np.float32
    assert float(np.abs(got - want).max()) <= TOL
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    if side == "user":  # the serving path's own vectors (embed_users) are the same too
        assert float(np.abs(got - model.embed_users(records)).max()) <= TOL


@pytest.mark.parametrize("side", ["user", "item"])
def test_standalone_client_reproduces_the_reference_vectors(exported: tuple[TwoTowerModel, Path], side: str) -> None:
    """preprocessing.json alone (no project code) encodes the reference inputs as we do and the
    .onnx file gives their expected vectors."""
    _, out = exported
    pre = json.loads((out / "preprocessing.json").read_text())
    refs = pre["reference"][side]
    assert len(refs) >= 5
    client = TowerClient(out, side)
    encoded = client.encode([r["record"] for r in refs])
    for i, ref in enumerate(refs):
        for name, value in ref["encoded"].items():
            np.testing.assert_array_equal(encoded[name][i], np.asarray(value, dtype=encoded[name].dtype), err_msg=f"{name} of {ref['record']}")
    got = client.embed([r["record"] for r in refs])
    want = np.asarray([r["vector"] for r in refs], dtype=np.float32)
    assert float(np.abs(got - want).max()) <= TOL


@pytest.mark.parametrize("side", ["user", "item"])
def test_standalone_client_encodes_like_the_project(exported: tuple[TwoTowerModel, Path], side: str) -> None:
    """On 300 random records the client's arrays are the project encoder's, bit for bit."""
    model, out = exported
    enc = model.user_encoder if side == "user" else model.item_encoder
    records = _random_records(enc, 300, seed=7)
    ours = enc.encode_records(records)
    theirs = TowerClient(out, side).encode(records)
    assert set(ours) == set(theirs)
    for k in ours:
        assert theirs[k].dtype == ours[k].dtype and np.array_equal(theirs[k], ours[k]), k


def test_reference_set_covers_every_rule(exported: tuple[TwoTowerModel, Path]) -> None:
    model, _ = exported
    for enc in (model.user_encoder, model.item_encoder):
        arrays = enc.encode_records(reference_records(enc))
        assert 0 in arrays["id"] and (arrays["id"] > 0).any()  # OOV and known ids
        for name, spec in enc.specs.items():
            if spec.type == "categorical":
                assert 0 in arrays[f"cat.{name}"] and (arrays[f"cat.{name}"] > 0).any()
            elif spec.type == "multi_categorical":
                m = arrays[f"multi.{name}"]
                assert (m == 1).any() and (m == 0).all(axis=1).any() and (m > 1).any()  # unseen, empty, known
            else:
                b = arrays[f"bucket.{name}"]
                assert 0 in b and b.max() == enc.stats[name].n_buckets - 1 and 1 in b  # missing, both ends


def test_cli_export_of_a_trained_bundle(tiny_bundle_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export"
    assert cli.main(["export", "--model", str(tiny_bundle_path), "--format", "onnx", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    manifest = read_json(out / "manifest.json")
    assert sorted(manifest["files"]) == ["item_tower.onnx", "preprocessing.json", "user_tower.onnx"]
    assert check_hashes(out, manifest["files"]) == []
    assert manifest["model_version"] == read_json(tiny_bundle_path / "manifest.json")["version"]
    assert max(manifest["parity_max_abs_diff"].values()) <= TOL
    pre = read_json(out / "preprocessing.json")
    for side in ("user", "item"):
        refs = pre["reference"][side]
        got = TowerClient(out, side).embed([r["record"] for r in refs])
        assert float(np.abs(got - np.asarray([r["vector"] for r in refs], np.float32)).max()) <= TOL

    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["export", "--model", str(tiny_bundle_path), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["export", "--model", str(tiny_bundle_path), "--format", "torchscript", "--out", str(tmp_path / "ts")]) == 2
    assert "--format torchscript is not supported" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.export as export_mod

    def disagree(path: Path, *a: object) -> float:
        raise ExportError(f"{path.name}: onnxruntime differs from torch by 1.00e+00")

    monkeypatch.setattr(export_mod, "_check_parity", disagree)
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(_model(), {"version": "v"}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
