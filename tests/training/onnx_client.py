"""A standalone client of a `trainer export` directory: what a service in another language does.

It reads only `preprocessing.json` and the two `.onnx` files, imports nothing of the project
(only json, math, numpy and onnxruntime), encodes raw records by the rules written in
preprocessing.json and runs the towers. tests/training/test_export.py holds it to the expected
vectors of the reference set and to the project's own encoder, so the JSON really is enough.
"""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort


def _index(vocabulary: list[str], offset: int, oov: int) -> dict[str, int]:
    return {t: i + offset for i, t in enumerate(vocabulary)}


def _continuous(spec: dict, value: object) -> tuple[float, int]:
    if value is None or not math.isfinite(float(value)):
        return 0.0, 0
    v = float(value)
    lo, hi = spec["clip"]
    z = min(hi, max(lo, (v - spec["mean"]) / spec["std"]))
    return z, bisect.bisect_right(spec["boundaries"], v) + 1


class TowerClient:
    def __init__(self, export_dir: Path, side: str) -> None:
        pre = json.loads((Path(export_dir) / "preprocessing.json").read_text(encoding="utf-8"))
        self.spec = spec = pre["towers"][side]
        self.session = ort.InferenceSession(str(Path(export_dir) / spec["model"]), providers=["CPUExecutionProvider"])
        ids = spec["id"]
        self.ids = _index(ids["vocabulary"], ids["index_offset"], ids["oov_index"])
        self.vocab = {
            f["name"]: _index(f["vocabulary"], f["index_offset"], f["oov_index"])
            for f in spec["features"] if f["type"] != "continuous"
        }

    def encode(self, records: list[dict]) -> dict[str, np.ndarray]:
        spec = self.spec
        cols: dict[str, list] = {d["name"]: [] for d in spec["inputs"]}
        for rec in records:
            rid = rec.get(spec["record_id_key"])
            id_index = spec["id"]["oov_index"] if rid is None else self.ids.get(str(rid), spec["id"]["oov_index"])
            cols["id"].append(id_index)
            pop = spec["popularity"]
            if pop is not None:
                v = 0.0 if id_index == spec["id"]["oov_index"] else math.log1p(pop["id_counts"][id_index - 1])
                z, b = _continuous(pop, v)
                cols[pop["inputs"]["z"]].append(z)
                cols[pop["inputs"]["bucket"]].append(b)
            feats = rec.get("features") or {}
            for f in spec["features"]:
                value = feats.get(f["name"])
                if f["type"] == "categorical":
                    cols[f["input"]].append(f["oov_index"] if value is None else self.vocab[f["name"]].get(str(value), f["oov_index"]))
                elif f["type"] == "multi_categorical":
                    if value is None:
                        tokens = []
                    elif isinstance(value, str):
                        tokens = [t for t in value.split(f["separator"]) if t]
                    else:
                        tokens = [str(t) for t in value]
                    row = [self.vocab[f["name"]].get(t, f["oov_index"]) for t in tokens[: f["max_len"]]]
                    cols[f["input"]].append(row + [f["pad_index"]] * (f["max_len"] - len(row)))
                else:
                    z, b = _continuous(f, value)
                    cols[f["inputs"]["z"]].append(z)
                    cols[f["inputs"]["bucket"]].append(b)
        out = {}
        for d in spec["inputs"]:
            dtype = np.float32 if d["dtype"] == "float32" else np.int64
            arr = np.asarray(cols[d["name"]], dtype=np.float64 if dtype == np.float32 else np.int64)
            out[d["name"]] = arr.astype(dtype).reshape((len(records), *d["shape"][1:]))
        return out

    def embed(self, records: list[dict]) -> np.ndarray:
        return self.session.run([self.spec["output"]["name"]], self.encode(records))[0]
