"""Builders of index version directories for the service tests and the serving benchmark.

They write the layout of docs/design.md ("Index version") directly — manifest, checksums, a
copy of the model bundle, `embeddings.npy`, `item_ids.txt`, `index.faiss` — so that a test can
also write versions that `indexer rebuild` never would: a corrupt file, a manifest naming another
model version, vectors of the wrong dimension. What the service accepts is checked by
`indexer.version.load_version`, the same loader production uses. The layout itself is written by
`indexer.version.write_files`, the indexer's own writer.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import faiss
import numpy as np

from indexer import store
from indexer.attributes import AttributeTable
from indexer.version import write_files
from training.artifacts import atomic_directory, sha256_file


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """`n` random L2-normalized float32 rows (a synthetic catalog)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def build_index(embeddings: np.ndarray, factory: str = "Flat", ef_construction: int = 40) -> tuple[faiss.Index, dict]:
    """A FAISS inner-product index over `embeddings` and its manifest `index` entry."""
    d = embeddings.shape[1]
    if factory == "Flat":
        index = faiss.IndexFlatIP(d)
        params: dict = {}
    elif factory.startswith("HNSW"):
        m = int(factory[4:].split(",")[0])
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        params = {"efSearch": 64}
        index.hnsw.efSearch = 64
    else:  # pragma: no cover - tests only use the two above
        raise ValueError(factory)
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index, {"factory": factory, "search_params": params}


def write_version(
    root: Path,
    bundle_path: Path,
    embeddings: np.ndarray,
    item_ids: list[str],
    *,
    name: str | None = None,
    factory: str = "Flat",
    index: faiss.Index | None = None,
    model_version: str | None = None,
    switch: bool = True,
    attributes: AttributeTable | None = None,
) -> Path:
    """Write `root/<name>/` in the design.md layout (`indexer.version.write_files`, published by
    `training.artifacts.atomic_directory`) without the acceptance check; optionally point
    `root/current` at it. `model_version` overrides what the manifest claims (default: the
    bundle's own version). `attributes`: the version's filterable attribute table.
    """
    root = Path(root)
    bundle_manifest = json.loads((Path(bundle_path) / "manifest.json").read_text())
    now = dt.datetime.now(dt.timezone.utc)
    name = name or f"{now:%Y%m%dT%H%M%S%f}Z-{os.urandom(3).hex()}"
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if index is None:
        index, index_entry = build_index(emb, factory)
    else:
        index_entry = {"factory": factory, "search_params": {}}
    with atomic_directory(root / name) as tmp:
        write_files(
            tmp, index=index, embeddings=emb, item_ids=item_ids, bundle_path=bundle_path, attributes=attributes,
            manifest={"index_version": name, "model_version": model_version or bundle_manifest["version"],
                      "created_at": now.isoformat(timespec="seconds"), "index": index_entry, "recall": None},
        )
    if switch:
        switch_current(root, name)
    return root / name


def switch_current(root: Path, name: str) -> None:
    """Point `root/current` at `name` atomically (temp symlink + os.replace)."""
    store.switch_current(root, name)


def item_embeddings(bundle_path: Path, items_csv: Path) -> tuple[np.ndarray, list[str]]:
    """The real item vectors of a trained bundle for a dataset's items.csv."""
    import pandas as pd

    from training.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    items = pd.read_csv(items_csv, dtype=str, keep_default_na=False)
    return bundle.model.embed_items(items), items["item_id"].astype(str).tolist()


def _write_manifest(version_dir: Path, manifest: dict) -> None:
    (Path(version_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def read_manifest(version_dir: Path) -> dict:
    return json.loads((Path(version_dir) / "manifest.json").read_text())


def replace_file(version_dir: Path, relpath: str, data: bytes, *, rehash: bool) -> None:
    """Overwrite one file of an (unswitched) version; `rehash` keeps its checksum consistent."""
    path = Path(version_dir) / relpath
    path.write_bytes(data)
    if rehash:
        manifest = read_manifest(version_dir)
        manifest["files"][relpath] = sha256_file(path)
        _write_manifest(version_dir, manifest)


def edit_manifest(version_dir: Path, **changes: object) -> None:
    manifest = read_manifest(version_dir)
    manifest.update(changes)
    _write_manifest(version_dir, manifest)


def copy_version(src: Path, root: Path, name: str) -> Path:
    """A copy of version `src` under a new index_version (not switched to)."""
    dst = Path(root) / name
    shutil.copytree(src, dst)
    edit_manifest(dst, index_version=name)
    return dst


def replace_bundle_file(version_dir: Path, name: str, data: bytes) -> None:
    """Overwrite `model/<name>` and re-sign it in both the bundle's and the index's manifest."""
    version_dir = Path(version_dir)
    (version_dir / "model" / name).write_bytes(data)
    bundle_manifest = read_manifest(version_dir / "model")
    bundle_manifest["files"][name] = sha256_file(version_dir / "model" / name)
    _write_manifest(version_dir / "model", bundle_manifest)
    manifest = read_manifest(version_dir)
    for rel in (f"model/{name}", "model/manifest.json"):
        manifest["files"][rel] = sha256_file(version_dir / rel)
    _write_manifest(version_dir, manifest)
