"""Model bundles: the trained towers plus everything needed to run them, as one directory.

Layout (docs/design.md): `model.safetensors` (weights, never a pickle), `config.json` (model
config, training config, dataset schema), `features.json` (vocabularies and statistics),
`item_counts.json` (training clicks per item: the logQ input, which serving never reads) and
`manifest.json` (version, creation time, data fingerprint, metrics, sha256 of every file).

A bundle is written into a temp directory, fsynced and renamed, so `MODELS_DIR/<version>/`
either exists complete or not at all.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.artifacts import (
    TMP_PREFIX,
    atomic_directory,
    check_hashes,
    file_hashes,
    read_json,
    remove_stale_temps,
    write_json,
)
from training.features import TowerEncoder
from training.model import ModelConfig, TwoTowerModel

FORMAT = "twotower-bundle/1"
REQUIRED_FILES = ("model.safetensors", "config.json", "features.json", "item_counts.json")


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
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(models_dir)
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
    files = manifest.get("files", {})
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise BundleError(f"{path}: manifest lists no {missing}")
    problems = check_hashes(path, files)
    if problems:
        raise BundleError(f"{path}: " + "; ".join(problems))
    return manifest


def load_bundle(path: str | os.PathLike[str], verify: bool = True, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle (or the newest in a models dir) for inference, in eval mode."""
    path = find_bundle(path)
    manifest = verify_bundle(path) if verify else read_json(path / "manifest.json")
    config = read_json(path / "config.json")
    feats = read_json(path / "features.json")
    model = TwoTowerModel(
        ModelConfig.from_dict(config["model"]),
        TowerEncoder.from_json(feats["user"]),
        TowerEncoder.from_json(feats["item"]),
    )
    state = load_file(str(path / "model.safetensors"), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{path}: weights do not match config: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return Bundle(path=path, manifest=manifest, model=model)
