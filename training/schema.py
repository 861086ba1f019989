"""The dataset's declared feature types (`schema.json`, INTERFACES.md §1), without pandas or torch.

`Schema` is read by the trainer from a dataset directory and travels in every bundle
(`config.json`, `features.json`), where the service reads it back: so this module depends on
nothing but the standard library.

The item section may also declare **attributes** (INTERFACES.md §4): columns of `items.csv` that
requests can filter on (`"item": {"features": {...}, "attributes": {"genres": {"type":
"multi_categorical", "separator": "|"}, "in_stock": {"type": "bool"}}}`). An attribute is not a
model input (a column may be both a feature and an attribute); the indexer stores them in the
index version (`indexer/attributes.py`), and a schema without attributes reads exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FEATURE_TYPES = ("categorical", "multi_categorical", "continuous")
ATTRIBUTE_TYPES = ("categorical", "multi_categorical", "continuous", "bool")
SECTION_KEYS = ("features",)
ITEM_SECTION_KEYS = ("features", "attributes")
FEATURE_KEYS = ("type", "separator")
# The literals a bool attribute cell may hold (any case, surrounding spaces ignored); '' = missing.
BOOL_TRUE = ("true", "1")
BOOL_FALSE = ("false", "0")


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names file, line and column."""


@dataclass(frozen=True)
class ColumnSpec:
    """One declared column: its name, type and (multi-categorical) separator."""

    name: str
    type: str
    separator: str = "|"

    def to_json(self) -> dict:
        out = {"type": self.type}
        if self.type == "multi_categorical":
            out["separator"] = self.separator
        return out


@dataclass(frozen=True)
class FeatureSpec(ColumnSpec):
    """One declared feature column."""


@dataclass(frozen=True)
class AttributeSpec(ColumnSpec):
    """One filterable item column (INTERFACES.md §4): its name, type and (multi) separator.

    `categorical`: one string value; `multi_categorical`: separator-joined values, a condition
    matches if any value matches; `continuous`: a finite number (range filters); `bool`:
    true/false/1/0 in any case. An empty cell is a missing value.
    """

    @classmethod
    def from_json(cls, name: str, decl: object, where: str) -> AttributeSpec:
        if not isinstance(decl, dict) or "type" not in decl:
            raise DatasetError(f"{where}: must be an object with a 'type'")
        _reject_unknown_keys(where, decl, FEATURE_KEYS)
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{where}: an attribute name must not be empty")
        if name == "item_id":
            raise DatasetError(f"{where}: item_id cannot be an attribute (use exclude_item_ids to drop items)")
        atype = decl["type"]
        if atype not in ATTRIBUTE_TYPES:
            raise DatasetError(f"{where}: unknown type {atype!r}; expected one of {list(ATTRIBUTE_TYPES)}")
        sep = decl.get("separator", "|")
        if atype == "multi_categorical" and (not isinstance(sep, str) or not sep):
            raise DatasetError(f"{where}: 'separator' must be a non-empty string")
        if atype != "multi_categorical" and "separator" in decl:
            raise DatasetError(f"{where}: 'separator' only applies to a multi_categorical attribute")
        return cls(name=name, type=atype, separator=sep)


@dataclass(frozen=True)
class Schema:
    """Feature declarations of both towers (ids are implicit and never declared), and the
    item attributes requests may filter on (empty: no filters)."""

    user: dict[str, FeatureSpec] = field(default_factory=dict)
    item: dict[str, FeatureSpec] = field(default_factory=dict)
    item_attributes: dict[str, AttributeSpec] = field(default_factory=dict)

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
            keys = ITEM_SECTION_KEYS if side == "item" else SECTION_KEYS
            _reject_unknown_keys(f"{source}: {side}", sec, keys)  # "feature": {...} is not ignored
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
        attributes = {}
        decls = obj["item"].get("attributes", {})
        if not isinstance(decls, dict):
            raise DatasetError(f"{source}: item.attributes must be an object mapping column -> {{'type': ...}}")
        for name, decl in decls.items():
            spec = AttributeSpec.from_json(name, decl, f"{source}: item.attributes.{name}")
            feat = sides["item"].get(name)
            if feat is not None and "multi_categorical" == feat.type == spec.type and feat.separator != spec.separator:
                # one column, one way to split it (parquet list cells are joined with it)
                raise DatasetError(
                    f"{source}: item.attributes.{name}: separator {spec.separator!r} differs from the feature's {feat.separator!r}"
                )
            attributes[name] = spec
        return cls(user=sides["user"], item=sides["item"], item_attributes=attributes)

    def to_json(self) -> dict:
        out = {
            side: {"features": {n: s.to_json() for n, s in getattr(self, side).items()}}
            for side in ("user", "item")
        }
        if self.item_attributes:  # absent when none: bundles of attribute-free schemas are unchanged
            out["item"]["attributes"] = {n: a.to_json() for n, a in self.item_attributes.items()}
        return out


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
