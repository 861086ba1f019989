"""`trainer export`: a bundle's towers as standard artifacts for services in other languages.

`export_onnx(bundle, out)` writes, atomically (a temp directory, fsynced, renamed)::

    user_tower.onnx  item_tower.onnx  preprocessing.json  manifest.json

The ONNX graphs take the *encoded* inputs, exactly the arrays `TowerEncoder.encode_records`
produces (`id`, `cat.<f>`, `multi.<f>`, `cont.<f>` + `bucket.<f>`, in the order
`preprocessing.json` lists them, batch dimension `batch` dynamic) and return `vector`: the
(batch, dim) float32 unit vectors the towers return (the score of a pair is their dot product,
a cosine). The encoding itself — vocabularies and the out-of-vocabulary rule, z-score statistics
and bucket edges, separators and maximum lengths of multi-valued features, the item tower's
popularity input — is data, written to `preprocessing.json` with the rules spelled out and a small
reference set of raw inputs with their encoded arrays and expected vectors, so a client in another
language can check its encoder against ours (tests/training/onnx_client.py is such a client in
~100 lines of numpy, without any project code).

Why encoded inputs: string lookups and the statistics are not tensor arithmetic (ONNX's string
ops are patchy across runtimes), and keeping them as data keeps the graph tiny and the
vocabularies inspectable. The history input (HistoryPooling) needs nothing here: it is baked into
the user id table at export from training, so the user tower has the ordinary format.

Exporter: `torch.onnx.export(..., dynamo=True)` (the torch.export-based exporter, the default
since PyTorch 2.9) at opset 18 with `Dim.DYNAMIC` on the batch axis and the weights inside the
file (`external_data=False`). The legacy TorchScript exporter (`dynamo=False`) works too but is
deprecated and announced for removal; with a named `Dim("batch")` the dynamo exporter specialized
the batch to the example's size, hence `Dim.DYNAMIC` and a rename of its symbol to `batch`.
Outputs are checked against torch before anything is published (`PARITY_TOLERANCE`).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.artifacts import atomic_directory, file_hashes, write_json
from training.features import MULTI_OOV, OOV, PAD, POPULARITY, TowerEncoder

if TYPE_CHECKING:
    import torch

    from training.model import Tower, TwoTowerModel

FORMAT = "twotower-export/1"
PREPROCESSING_FORMAT = "twotower-preprocessing/1"
OPSET = 18
OUTPUT = "vector"
BATCH = "batch"
Z_CLIP = 5.0
PARITY_TOLERANCE = 1e-5
FORMATS = ("onnx", "torchscript")

log = logging.getLogger("training.export")


class ExportError(ValueError):
    """An export cannot be made (unsupported format, output exists, parity check failed)."""


# ---- the encoded inputs -----------------------------------------------------------------------


def input_names(enc: TowerEncoder) -> list[str]:
    """The tower's ONNX inputs, in order: exactly the keys of `TowerEncoder.encode_records`."""
    names = ["id"]
    if enc.id_counts is not None:
        names += [f"cont.{POPULARITY}", f"bucket.{POPULARITY}"]
    for name, spec in enc.specs.items():
        if spec.type == "categorical":
            names.append(f"cat.{name}")
        elif spec.type == "multi_categorical":
            names.append(f"multi.{name}")
        else:
            names += [f"cont.{name}", f"bucket.{name}"]
    return names


def _input_decl(enc: TowerEncoder, name: str) -> dict:
    if name.startswith("multi."):
        return {"name": name, "dtype": "int64", "shape": [BATCH, enc.max_len[name.removeprefix("multi.")]]}
    return {"name": name, "dtype": "float32" if name.startswith("cont.") else "int64", "shape": [BATCH]}


def _continuous(stats: Any) -> dict:
    return {"mean": stats.mean, "std": stats.std, "clip": [-Z_CLIP, Z_CLIP], "boundaries": list(stats.boundaries)}


def tower_preprocessing(enc: TowerEncoder, model_file: str) -> dict:
    """Everything needed to encode one side's raw records, as JSON data."""
    features = []
    for name, spec in enc.specs.items():
        if spec.type == "categorical":
            features.append({
                "name": name, "type": "categorical", "input": f"cat.{name}",
                "vocabulary": list(enc.vocabs[name].tokens), "index_offset": 1, "oov_index": OOV,
            })
        elif spec.type == "multi_categorical":
            features.append({
                "name": name, "type": "multi_categorical", "input": f"multi.{name}", "separator": spec.separator,
                "max_len": enc.max_len[name], "vocabulary": list(enc.vocabs[name].tokens), "index_offset": 2,
                "oov_index": MULTI_OOV, "pad_index": PAD,
            })
        else:
            features.append({
                "name": name, "type": "continuous", "inputs": {"z": f"cont.{name}", "bucket": f"bucket.{name}"},
                **_continuous(enc.stats[name]),
            })
    popularity = None
    if enc.id_counts is not None:
        popularity = {
            "inputs": {"z": f"cont.{POPULARITY}", "bucket": f"bucket.{POPULARITY}"},
            "id_counts": list(enc.id_counts), **_continuous(enc.stats[POPULARITY]),
        }
    return {
        "model": model_file,
        "output": {"name": OUTPUT, "dtype": "float32", "shape": [BATCH, None]},
        "record_id_key": f"{enc.side}_id",
        "inputs": [_input_decl(enc, n) for n in input_names(enc)],
        "id": {"input": "id", "vocabulary": list(enc.ids.tokens), "index_offset": 1, "oov_index": OOV},
        "features": features,
        "popularity": popularity,
    }


RULES = {
    "record": "A raw record is {'<side>_id': string or null, 'features': {name: value}}; a feature absent, "
    "null, or not declared for the tower is missing. Every input is computed per record; a batch stacks them "
    "along the first axis.",
    "id": "index = position of the id in `vocabulary` + index_offset (1); an id not in the vocabulary, or no id, "
    "is oov_index (0).",
    "categorical": "the value as a string (integers are written in decimal); index = position in `vocabulary` + "
    "index_offset (1); unseen or missing: oov_index (0). int64.",
    "multi_categorical": "a string value is split on `separator` and empty tokens dropped; a list is taken as it is "
    "(items as strings). The first max_len tokens, each as position in `vocabulary` + index_offset (2), unseen "
    "tokens oov_index (1), padded with pad_index (0) to max_len: int64 (batch, max_len). The tower mean-pools the "
    "non-pad positions; no token (missing or empty) gives an all-pad row.",
    "continuous": "value v (a finite number) -> z = clip((v - mean) / std, clip[0], clip[1]) computed in float64, "
    "fed as float32; bucket = 1 + (number of boundaries <= v), i.e. searchsorted(boundaries, v, side='right') + 1. "
    "Missing (or non-finite): z = 0.0 and bucket = 0.",
    "popularity": "only when `popularity` is not null (the item tower): v = log1p(id_counts[index - 1]) for a known "
    "id, v = 0.0 for the out-of-vocabulary id, then encoded as a continuous feature with its own mean, std and "
    "boundaries (v is never missing).",
    "output": "`vector` (batch, dim) float32 unit vectors; the retrieval score of a (user, item) pair is the dot "
    "product of the two towers' vectors (a cosine); no temperature or logQ correction is applied at serving.",
}


# ---- reference inputs -------------------------------------------------------------------------


def reference_records(enc: TowerEncoder, n_known: int = 3) -> list[dict]:
    """Raw records that exercise every rule: no id and no features, known ids with typical
    values, unknown ids with unseen categories/tokens, a multi value as a joined string and over
    max_len tokens, extreme continuous values of both signs, explicit nulls."""
    key = f"{enc.side}_id"
    known = list(enc.ids.tokens[:n_known])
    out: list[dict] = [{key: None, "features": {}}]
    for i, rid in enumerate(known):
        feats: dict[str, Any] = {}
        for name, spec in enc.specs.items():
            if spec.type == "categorical":
                toks = enc.vocabs[name].tokens
                feats[name] = toks[i % len(toks)] if toks else "x"
            elif spec.type == "multi_categorical":
                toks = enc.vocabs[name].tokens
                pick = list(toks[i : i + 2]) or ["x"]
                feats[name] = spec.separator.join(pick) if i % 2 else pick
            else:
                st = enc.stats[name]
                feats[name] = round(float(st.mean) + (i - 1) * float(st.std), 3)
        out.append({key: rid, "features": feats})
    unseen: dict[str, Any] = {}
    extreme_neg: dict[str, Any] = {}
    for name, spec in enc.specs.items():
        if spec.type == "categorical":
            unseen[name] = "never-seen-category"
            extreme_neg[name] = None
        elif spec.type == "multi_categorical":
            toks = list(enc.vocabs[name].tokens)
            unseen[name] = ["never-seen-token", *toks[:1]]
            extreme_neg[name] = (toks * (enc.max_len[name] + 2))[: enc.max_len[name] + 2] or ["x"]
        else:
            unseen[name] = 1e12
            extreme_neg[name] = -1e12
    out.append({key: "never-seen-id", "features": unseen})
    out.append({key: known[0] if known else None, "features": extreme_neg})
    return out


# ---- the export -------------------------------------------------------------------------------


def _wrapper(tower: Tower, names: list[str]) -> torch.nn.Module:
    import torch

    class EncodedTower(torch.nn.Module):
        """The tower over positional encoded inputs (ONNX has no dict inputs)."""

        def __init__(self) -> None:
            super().__init__()
            self.tower = tower

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return self.tower(dict(zip(names, xs, strict=True)))

    return EncodedTower().eval()


def _torch_vectors(tower: Tower, arrays: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return tower({k: torch.from_numpy(v) for k, v in arrays.items()}).float().numpy()


def _export_tower(tower: Tower, enc: TowerEncoder, path: Path, side: str, model_version: str) -> None:
    import onnx
    import torch

    names = input_names(enc)
    example = enc.encode_records(reference_records(enc))
    args = tuple(torch.from_numpy(example[n]) for n in names)
    dim = torch.export.Dim.DYNAMIC
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            _wrapper(tower, names), args, input_names=names, output_names=[OUTPUT], opset_version=OPSET,
            dynamo=True, external_data=False, dynamic_shapes=(tuple({0: dim} for _ in names),), verbose=False,
        )
    proto = program.model_proto
    # name the dynamic batch axis: the exporter calls it after an internal symbol (s13, ...)
    symbols = {proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param}
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in symbols:
                d.dim_param = BATCH
    for inp in proto.graph.input:
        if inp.type.tensor_type.shape.dim[0].dim_param != BATCH:
            raise ExportError(f"{side} tower input {inp.name!r}: the batch axis is not dynamic after export")
    for k, v in {"twotower.side": side, "twotower.model_version": model_version}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())


def _check_parity(path: Path, tower: Tower, enc: TowerEncoder, records: list[dict]) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    arrays = enc.encode_records(records)
    got = sess.run([OUTPUT], {n: arrays[n] for n in input_names(enc)})[0]
    want = _torch_vectors(tower, arrays)
    diff = float(np.abs(got - want).max())
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(f"{path.name}: onnxruntime differs from torch by {diff:.2e} (> {PARITY_TOLERANCE:.0e})")
    return diff


def _json_vector(v: np.ndarray) -> list[float]:
    return [float(x) for x in v]


def export_onnx(model: TwoTowerModel, manifest: dict, out: str | os.PathLike[str]) -> Path:
    """Write the export directory `out` (which must not exist) for a loaded bundle; return it."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs the `train` extra (onnx, onnxscript): {e}") from None
    model.eval()
    version = str(manifest["version"])
    sides = {"user": (model.user_tower, model.user_encoder), "item": (model.item_tower, model.item_encoder)}
    with atomic_directory(out) as tmp:
        pre: dict[str, Any] = {
            "format": PREPROCESSING_FORMAT, "model_version": version, "embedding_dim": int(model.embedding_dim),
            "rules": RULES, "towers": {}, "reference": {},
        }
        diffs = {}
        for side, (tower, enc) in sides.items():
            file = f"{side}_tower.onnx"
            _export_tower(tower, enc, tmp / file, side, version)
            refs = reference_records(enc)
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                log.warning("onnxruntime is not installed: the export is not checked against torch")
            else:
                diffs[side] = _check_parity(tmp / file, tower, enc, refs)
            arrays = enc.encode_records(refs)
            vectors = _torch_vectors(tower, arrays)
            pre["towers"][side] = tower_preprocessing(enc, file)
            pre["reference"][side] = [
                {
                    "record": rec,
                    "encoded": {k: v[i].tolist() for k, v in arrays.items()},
                    "vector": _json_vector(vectors[i]),
                }
                for i, rec in enumerate(refs)
            ]
        write_json(tmp / "preprocessing.json", _finite_json(pre))
        import torch

        write_json(tmp / "manifest.json", {
            "format": FORMAT,
            "model_version": version,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "exporter": {"torch": torch.__version__, "opset": OPSET, "dynamo": True},
            "parity_max_abs_diff": diffs,
            "bundle": {"embedding_dim": int(model.embedding_dim), "data_fingerprint": manifest.get("data_fingerprint")},
            "files": file_hashes(tmp),
        })
    return Path(out)


def _finite_json(obj: Any) -> Any:
    """Refuse NaN/infinity anywhere (JSON has no such numbers; other parsers reject them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ExportError(f"non-finite number {obj} in preprocessing.json (bad feature statistics in the bundle?)")
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_json(v) for v in obj]
    return obj


def export_bundle(model_path: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str]) -> Path:
    """`trainer export`: load (and verify) a bundle, write its export in `fmt` to `out`."""
    from training.bundle import load_bundle

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; supported: onnx")
    if fmt == "torchscript":
        raise ExportError(
            "--format torchscript is not supported: TorchScript is deprecated in PyTorch; "
            "use --format onnx (any ONNX runtime, or onnxruntime from Java/Go/C++)"
        )
    if Path(out).exists():
        raise FileExistsError(f"export output {out} already exists (choose a new directory)")
    bundle = load_bundle(model_path)
    return export_onnx(bundle.model, bundle.manifest, out)
