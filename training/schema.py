"""The dataset's declared feature types (`schema.json`, INTERFACES.md §1), without pandas or torch.

`Schema` is read by the trainer from a dataset directory and travels in every bundle
(`config.json`, `features.json`), where the service reads it back: so this module depends on
nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FEATURE_TYPES = ("categorical", "multi_categorical", "continuous")
SECTION_KEYS = ("features",)
FEATURE_KEYS = ("type", "separator")


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names file, line and column."""


@dataclass(frozen=True)
class FeatureSpec:
    """One declared feature column: its name, type and (multi-categorical) separator."""

    name: str
    type: str
    separator: str = "|"

    def to_json(self) -> dict:
        out = {"type": self.type}
        if self.type == "multi_categorical":
            out["separator"] = self.separator
        return out


@dataclass(frozen=True)
class Schema:
    """Feature declarations of both towers (ids are implicit and never declared)."""

    user: dict[str, FeatureSpec] = field(default_factory=dict)
    item: dict[str, FeatureSpec] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: object, source: str = "schema.json") -> Schema:
        if not isinstance(obj, dict):
            raise DatasetError(f"{source}: top level must be an object with 'user' and 'item'")
        unknown = set(obj) - {"user", "item"}
        if unknown:
            raise DatasetError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected 'user' and 'item'")
        sides = {}
        for side in ("user", "item"):
            sec = obj.get(side, {"features": {}})
            if side == "item" and side not in obj:
                raise DatasetError(f"{source}: missing required section 'item'")
            if not isinstance(sec, dict) or not isinstance(sec.get("features", {}), dict):
                raise DatasetError(f"{source}: '{side}' must be an object with a 'features' object")
            _reject_unknown_keys(f"{source}: {side}", sec, SECTION_KEYS)  # "feature": {...} is not ignored
            feats = {}
            for name, decl in sec.get("features", {}).items():
                where = f"{source}: {side}.features.{name}"
                if not isinstance(decl, dict) or "type" not in decl:
                    raise DatasetError(f"{where}: must be an object with a 'type'")
                _reject_unknown_keys(where, decl, FEATURE_KEYS)  # a misspelled "seperator" is not ignored
                _check_feature_name(where, name)
                ftype = decl["type"]
                if ftype not in FEATURE_TYPES:
                    raise DatasetError(f"{where}: unknown type {ftype!r}; expected one of {list(FEATURE_TYPES)}")
                if name in ("user_id", "item_id"):
                    raise DatasetError(f"{where}: the id is always a feature and must not be declared")
                sep = decl.get("separator", "|")
                if ftype == "multi_categorical" and (not isinstance(sep, str) or not sep):
                    raise DatasetError(f"{where}: 'separator' must be a non-empty string")
                feats[name] = FeatureSpec(name=name, type=ftype, separator=sep)
            sides[side] = feats
        return cls(user=sides["user"], item=sides["item"])

    def to_json(self) -> dict:
        return {
            side: {"features": {n: s.to_json() for n, s in getattr(self, side).items()}}
            for side in ("user", "item")
        }


def _reject_unknown_keys(where: str, obj: dict, known: tuple[str, ...]) -> None:
    """A misspelled key would otherwise be ignored and its default used in silence."""
    for key in obj:
        if key not in known:
            raise DatasetError(f"{where}: unknown key {key!r}; expected {' / '.join(repr(k) for k in known)}")


def _check_feature_name(where: str, name: str) -> None:
    """Each feature becomes a key of a torch ModuleDict (training/model.py), which refuses '',
    names with '.' and names of existing Module attributes ('type', 'float', 'items', ...). Caught
    here, it is a schema error before any data is read, not a KeyError after it."""
    from torch import nn  # lazy: reading a dataset needs no torch otherwise

    if not name.strip():
        raise DatasetError(f"{where}: a feature name must not be empty")
    if "." in name:
        raise DatasetError(f"{where}: feature name {name!r} must not contain '.'")
    if hasattr(nn.ModuleDict(), name):
        raise DatasetError(f"{where}: feature name {name!r} is reserved (a torch Module attribute); rename the column")
