"""Model bundles: the trained towers plus everything needed to run them, as one directory.

Layout (docs/design.md): `model.safetensors` (weights, never a pickle), `config.json` (model
config, training config, dataset schema), `features.json` (vocabularies and statistics),
`item_counts.json` (training clicks per item: the logQ input, which serving never reads) and
`manifest.json` (version, creation time, data fingerprint, metrics, sha256 of every file).

A bundle is written into a temp directory, fsynced and renamed, so `MODELS_DIR/<version>/`
either exists complete or not at all.

Two readers: `load_bundle` builds the torch `TwoTowerModel` (training, evaluation, the indexer's
item embedding, export), `read_bundle_arrays` reads the same files into numpy arrays and parsed
configs with `safetensors.numpy` (the service's version loading: no torch on the request path).
torch is imported only inside the functions that need it, so importing this module does not.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.artifacts import (
    TMP_PREFIX,
    atomic_directory,
    check_hashes,
    file_hashes,
    read_json,
    remove_stale_temps,
    write_json,
)
from training.config import ModelConfig
from training.features import TowerEncoder

if TYPE_CHECKING:
    import torch

    from training.model import TwoTowerModel

FORMAT = "twotower-bundle/1"
REQUIRED_FILES = ("model.safetensors", "config.json", "features.json", "item_counts.json")
STALE_TEMP_AGE_S = 3600.0  # a bundle's temp directory lives for seconds; one an hour old is a crash's


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupt or of an unknown format."""


@dataclass
class Bundle:
    path: Path
    manifest: dict
    model: TwoTowerModel

    @property
    def version(self) -> str:
        return self.manifest["version"]


@dataclass
class BundleArrays:
    """A bundle read without torch: parsed configs, both encoders and the weights as numpy.

    `weights` maps state-dict names (`user_tower.id_emb.weight`, ...) to float32 arrays, exactly
    the tensors `load_bundle` would put into the model; `config` is config.json as written.
    """

    path: Path
    manifest: dict
    config: dict
    model_config: ModelConfig
    user_encoder: TowerEncoder
    item_encoder: TowerEncoder
    weights: dict[str, np.ndarray]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def embedding_dim(self) -> int:
        return int(self.model_config.embedding_dim)


def new_version(now: dt.datetime | None = None) -> str:
    """UTC timestamp + random suffix: unique, and lexicographic order is chronological."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def save_bundle(
    model: TwoTowerModel,
    models_dir: str | os.PathLike[str],
    *,
    train_config: dict,
    schema: dict,
    item_counts: dict[str, int],
    data_fingerprint: str,
    metrics: dict,
    full: bool,
    extra: dict | None = None,
) -> Path:
    """Write a new bundle under `models_dir` atomically; return its path."""
    import torch
    from safetensors.torch import save_file

    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(models_dir, min_age_s=STALE_TEMP_AGE_S)  # another fit may be saving here now
    version = new_version()
    final = models_dir / version
    with atomic_directory(final) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT, "version": version})
        write_json(tmp / "config.json", {"model": model.config_dict(), "train": train_config, "schema": schema})
        write_json(tmp / "features.json", {"user": model.user_encoder.to_json(), "item": model.item_encoder.to_json()})
        write_json(tmp / "item_counts.json", item_counts)
        manifest = {
            "format": FORMAT,
            "version": version,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "data_fingerprint": data_fingerprint,
            "full": full,
            "metrics": metrics,
            "embedding_dim": model.embedding_dim,
            "torch_version": torch.__version__,
            **(extra or {}),
            "files": file_hashes(tmp),
        }
        write_json(tmp / "manifest.json", manifest)
    return final


def find_bundle(path: str | os.PathLike[str]) -> Path:
    """`path` itself if it is a bundle, else the newest complete bundle inside a models dir."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle or models directory")
    candidates = sorted(
        p for p in path.iterdir()
        if p.is_dir() and not p.name.startswith(TMP_PREFIX) and (p / "manifest.json").is_file()
    )
    if not candidates:
        raise BundleError(f"{path}: contains no model bundle (run `trainer fit` first)")
    return candidates[-1]


def verify_bundle(path: str | os.PathLike[str]) -> dict:
    """Check format and the sha256 of every file; return the manifest or raise BundleError."""
    path = Path(path)
    try:
        manifest = read_json(path / "manifest.json")
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable manifest.json ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise BundleError(f"{path}: manifest.json 'files' must map file names to sha256 strings, got {type(files).__name__}")
    if not isinstance(manifest.get("version"), str) or not manifest["version"]:
        raise BundleError(f"{path}: manifest.json has no 'version' string")
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise BundleError(f"{path}: manifest lists no {missing}")
    problems = check_hashes(path, files)
    if problems:
        raise BundleError(f"{path}: " + "; ".join(problems))
    return manifest


def _read_part(path: Path, name: str) -> dict:
    try:
        obj = read_json(path / name)
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BundleError(f"{path}: {name} is unreadable ({e})") from None
    if not isinstance(obj, dict):
        raise BundleError(f"{path}: {name} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _read_configs(path: Path) -> tuple[dict, ModelConfig, TowerEncoder, TowerEncoder]:
    """config.json and features.json parsed; every failure names the bundle and the file."""
    # A bundle can pass its checksums and still be wrong (written by a buggy or foreign tool, or
    # re-hashed after an edit): every failure below names the bundle and the file at fault.
    config, feats = _read_part(path, "config.json"), _read_part(path, "features.json")
    try:
        model_cfg = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: config.json: bad or missing 'model' section ({type(e).__name__}: {e})") from None
    try:
        user_enc, item_enc = TowerEncoder.from_json(feats["user"]), TowerEncoder.from_json(feats["item"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: features.json: bad or missing tower encoder ({type(e).__name__}: {e})") from None
    return config, model_cfg, user_enc, item_enc


def read_bundle_arrays(path: str | os.PathLike[str], verify: bool = True) -> BundleArrays:
    """Read a bundle (or the newest in a models dir) into numpy, without torch.

    The weights come from `model.safetensors` through `safetensors.numpy` (no pickle, no torch);
    whether they fit an architecture is for the reader of the arrays to check (the numpy tower
    refuses a layout it cannot run, naming what is missing).
    """
    from safetensors.numpy import load_file

    path = find_bundle(path)
    manifest = verify_bundle(path) if verify else read_json(path / "manifest.json")
    config, model_cfg, user_enc, item_enc = _read_configs(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors raises its own SafetensorError for damaged headers
        raise BundleError(f"{path}: model.safetensors is unreadable ({type(e).__name__}: {e})") from None
    bad = sorted(k for k, v in weights.items() if v.dtype != np.float32)
    if bad:
        raise BundleError(f"{path}: model.safetensors: tensors {bad[:5]} are not float32")
    return BundleArrays(
        path=path, manifest=manifest, config=config, model_config=model_cfg,
        user_encoder=user_enc, item_encoder=item_enc, weights=weights,
    )


def load_bundle(path: str | os.PathLike[str], verify: bool = True, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle (or the newest in a models dir) for inference, in eval mode."""
    from safetensors.torch import load_file

    from training.model import TwoTowerModel

    path = find_bundle(path)
    manifest = verify_bundle(path) if verify else read_json(path / "manifest.json")
    _, model_cfg, *encoders = _read_configs(path)
    try:
        model = TwoTowerModel(model_cfg, *encoders)
    except (TypeError, ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: config.json and features.json do not make a model ({type(e).__name__}: {e})") from None
    try:
        state = load_file(str(path / "model.safetensors"), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for damaged headers
        raise BundleError(f"{path}: model.safetensors is unreadable ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip())
        raise BundleError(f"{path}: model.safetensors does not match config.json: {detail[:500]}") from None
    model.to(device).eval()
    return Bundle(path=path, manifest=manifest, model=model)
