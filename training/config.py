"""Model and training configuration: strict pydantic models, checked before any data is read.

A JSON config is typed by hand: "3" for 3, "false" for false (a truthy string that silently turned
a feature on), 0 for a batch size (a ZeroDivisionError an hour into a run). Every field here is
declared with its type and its range (`Field(ge=...)`), cross-field rules are validators, and the
models are strict (no coercion: `"3"` is not an integer, `1` is not `true`, NaN is not a number)
and frozen (a config is a value: what was validated is what trains). A bad value is one
`ValueError` naming the key, the value and what is expected, e.g.
`model.temperature=0 must be > 0` (`config_error` turns pydantic's report into that line).

`ModelConfig` travels in every bundle (`config.json`), so this module imports neither torch nor
pandas: loading a bundle's architecture needs neither. The choices of `objective`,
`negative_sampler` and `ssl_augmentation` belong to the modules that implement them
(`training.task`, `training.samplers`, `training.ssl`, all torch): they are looked up there when a
`TrainConfig` is validated, which only training does, so adding an objective is one file's change.
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Annotated, Any, ClassVar, TypeVar

import annotated_types as at
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

# recency weights learned when the history length is unbounded: distances beyond share the last one
RECENCY_POSITIONS = 100

__all__ = ["ConfigError", "HistoryConfig", "ModelConfig", "StrictConfig", "TrainConfig", "config_error"]


DEVICE_TYPES = ("cpu", "cuda", "mps")
_DEVICE = re.compile(r"^(auto|(cpu|cuda|mps)(:\d+)?)$")

# Mixed negative sampling (Yang et al. 2020) with the in-batch softmax: uniform catalog items
# added to every step's candidates. In-batch negatives are drawn by clicks, so rarely-clicked
# items almost never appear as negatives; the uniform ones reach them. Chosen on the nested
# validation (docs/results/ml100k.md): tail_recall@100 +0.017, recall@20 +0.004 over 3 seeds.
DEFAULT_MIXED_NEGATIVES = 1024


class ConfigError(ValueError):
    """A config value is of the wrong type, out of range or inconsistent; the message names the key.

    `keyed`: the message starts with `<key>=` (a nested config's message gets its parent's prefix).
    """

    def __init__(self, message: str, *, keyed: bool = False) -> None:
        super().__init__(message)
        self.keyed = keyed


C = TypeVar("C", bound="StrictConfig")

Rate = Annotated[float, Field(ge=0, lt=1)]
Probability = Annotated[float, Field(ge=0, le=1)]
Width = Annotated[int, Field(ge=1)]


class StrictConfig(BaseModel):
    """Base of the configs: strict types, unknown keys rejected, finite numbers, immutable.

    `RULES` gives the words for a field whose valid values are not just its declared range
    (a list's elements, a choice): `hidden=[0] must be a list of layer widths >= 1`.
    """

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)
    RULES: ClassVar[dict[str, str]] = {}
    LABEL: ClassVar[str] = "config"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise config_error(type(self), data, e) from None

    @classmethod
    def from_dict(cls: type[C], d: object, prefix: str = "") -> C:
        """Validate a parsed JSON object; `ConfigError` (a ValueError) naming the first problem."""
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.LABEL} config must be an object, got {type(d).__name__}")
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise config_error(cls, d, e, prefix) from None

    def to_dict(self) -> dict:
        """Plain JSON types (what config.json stores and `from_dict` reads back)."""
        return self.model_dump(mode="json")


class HistoryConfig(StrictConfig):
    """How the user tower pools a click history (`training.model.HistoryPooling`), as a bundle
    records it. Derived by the trainer from `TrainConfig`'s `user_history` / `history_*` fields
    (`TrainConfig.model_config_with_history`), never set by hand: one place to configure it."""

    LABEL: ClassVar[str] = "history"

    max_len: Width | None = None       # the most recent clicks pooled (None: all of them)
    alpha: Probability = 1.0           # pooled = weighted sum / n^alpha (1: a mean)
    encoder: typing.Literal["mean", "recency"] = "mean"  # recency: a learned weight per distance from the newest
                                       # (max_len of them; without max_len RECENCY_POSITIONS, the last shared by older clicks)
    free_id: bool = False              # known users keep a free id row next to their history
    # after the tower: u' = normalize(u + fold_in_weight * m / (m + fold_in_half) * normalize(sum_j w_j v_j)),
    # v_j the catalog vectors of the m history items pooled, w_j = fold_in_recency ** (distance from the
    # newest); 0 = off (training.numpy_tower.HistoryFoldIn, applied by the service and trainer evaluate alike)
    fold_in_weight: Annotated[float, Field(ge=0)] = 0.0
    fold_in_half: Annotated[float, Field(ge=0)] = 0.0
    fold_in_recency: Annotated[float, Field(gt=0, le=1)] = 1.0


class ModelConfig(StrictConfig):
    """Architecture hyper-parameters (stored in the bundle's config.json)."""

    LABEL: ClassVar[str] = "model"
    RULES: ClassVar[dict[str, str]] = {"hidden": "a list of layer widths >= 1"}

    embedding_dim: Width = 64          # output (cosine) space
    id_dim: Width = 64                 # id embedding width
    feature_dim: Width = 16            # width of each categorical / multi / bucket embedding
    hidden: list[Width] = Field(default_factory=lambda: [256])
    # dropout rates of 1 or more drop everything; temperature 0 divides by zero (a NaN model)
    dropout: Rate = 0.0
    user_id_dropout: Rate = 0.3
    item_id_dropout: Rate = 0.1
    temperature: Annotated[float, Field(gt=0)] = 0.03  # training only: logits = cos / temperature (docs/results)
    # request-time history input of the user tower; None: the bundle has none (history baked only).
    # Written by the trainer from TrainConfig (user_history, history_*), see HistoryConfig.
    history: HistoryConfig | None = None


class TrainConfig(StrictConfig):
    """Training hyper-parameters; a JSON file passed with --config overrides any of them."""

    LABEL: ClassVar[str] = "training"
    RULES: ClassVar[dict[str, str]] = {
        "hard_rank_band": "[lo, hi] with 0 <= lo < hi",
        "device": f"'auto' or a torch device of type {list(DEVICE_TYPES)} (e.g. 'cpu', 'cuda:0')",
    }

    seed: Annotated[int, Field(ge=0)] = 0
    epochs: Width = 40                 # maximum epochs (early stopping usually ends sooner)
    patience: Width = 4                # epochs without validation improvement before stopping
    full_epochs: Width | None = 10     # epochs for --full (no validation split to stop on); None: `epochs`
    batch_size: Width = 1024
    lr: Annotated[float, Field(gt=0)] = 3e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    ema_decay: Rate = 0.99             # validate and keep an exponential moving average of the weights (0 = off)
    logq: bool = True
    logq_weight: Annotated[float, Field(ge=0)] = 1.0
    cold_logq_weight: Annotated[float, Field(ge=0)] | None = 3.0  # logQ weight of rows whose user id was dropped (None: logq_weight)
    mask_user_positives: bool = True   # also mask in-batch items the user clicked elsewhere
    mixed_negatives: Annotated[int, Field(ge=0)] | None = None  # in-batch softmax: + this many uniform catalog negatives per step (MNS);
                                       # None: min(DEFAULT_MIXED_NEGATIVES, catalog size) with the in-batch softmax, 0 with sampled objectives
    min_count: Annotated[int, Field(ge=0)] = 2  # rarer categorical values share the OOV row (as unseen ones do at serving)
    n_buckets: Width = 10
    max_multi_len: Width = 16
    item_popularity_feature: bool = False  # item tower input: log1p(training clicks); 0 for fresh items
    eval_max_users: Width | None = 5000  # validation users sampled per epoch (big datasets)
    user_history: bool = True          # user id vector += pooled embeddings of the user's clicked items
    history_alpha: Probability = 1.0   # pooled = sum / n^alpha (1: mean, 0.5: FISM's usual choice)
    history_max_len: Width | None = 50  # pool each row's / request's most recent clicks only (EVAL.md warm_fresh sends 50)
    history_free_id: bool = False      # with user_history: also learn a free per-user embedding
    history_encoder: typing.Literal["mean", "recency"] = "recency"  # learned weight per distance from the newest click ; chosen on the nested validation over mean (docs/bench/history.md)
    cold_row_weight: Annotated[float, Field(gt=0)] = 1.0  # loss weight of id-dropped rows (new users: features + first clicks) vs 1 + recency of the others
    history_fold_in_weight: Annotated[float, Field(ge=0)] = 1.0  # chosen on the nested validation (docs/bench/history.md); request histories: + this x the pooled catalog vectors of the clicks, after the tower (HistoryConfig.fold_in_*)
    history_fold_in_half: Annotated[float, Field(ge=0)] = 1.0  # ... times m / (m + this) for m pooled clicks
    history_fold_in_recency: Annotated[float, Field(gt=0, le=1)] = 0.8  # ... each click weighted this ** (distance from the newest)
    history_cold_max_len: Annotated[int, Field(ge=0)] = 10  # id-dropped rows pool their user's first l clicks, l ~ U{0..min(this, earlier clicks)} (0: none)
    device: str = "auto"
    sparse_tables: bool | None = None  # id / history tables: sparse gradients + SparseAdam (null: tables >= 16,384 rows when weight_decay is 0; training/optim.py)
    deterministic: bool = True         # torch deterministic algorithms during fit (same seed, same model)
    refit: bool = True                 # after early stopping: retrain on fit + val for the chosen epoch count
    cold_calibration_steps: Annotated[int, Field(ge=0)] = 300  # after training: fit the OOV id row, each user counting once (0 = off)
    cold_calibration_temperature: Annotated[float, Field(gt=0)] = 0.2  # its softmax temperature (chosen on pseudo-cold users, docs/results)
    model: ModelConfig = Field(default_factory=ModelConfig)
    # objective, negatives, positives, SSL (training/task.py, samplers.py, frequency.py, ssl.py)
    objective: str = "in_batch_softmax"  # | pointwise | triplet_hinge | triplet_logistic | listwise
    num_negatives: Width = 3             # sampled negatives per positive (pointwise: the 1:3 ratio)
    negative_sampler: str = "popularity"  # sampled objectives: uniform | popularity | in_batch | hard | mixture
    popularity_alpha: Annotated[float, Field(ge=0)] = 0.75  # popularity sampler: q ∝ clicks^α
    hard_rank_band: list[int] = Field(default_factory=lambda: [20, 100])  # model ranks [lo, hi) mined per epoch
    mixture_hard_fraction: Probability = 0.5  # mixture: share of hard negatives, rest from `mixture_easy`
    mixture_easy: typing.Literal["uniform", "popularity", "in_batch"] = "popularity"
    triplet_margin: Annotated[float, Field(ge=0)] = 0.2  # triplet_hinge margin m
    logistic_sigma: Annotated[float, Field(gt=0)] = 10.0  # triplet_logistic scale σ
    frequency: typing.Literal["exact", "streaming"] = "exact"  # in-batch logQ from exact counts | streamed (Yi et al. 2019)
    stream_buckets: Width = 1 << 16
    stream_hashes: Width = 2
    stream_alpha: Annotated[float, Field(gt=0, le=1)] = 0.01
    positive_beta: Annotated[float, Field(ge=0)] = 0.0  # positive re-weighting ∝ count^−β (0 = off)
    recency_boost: Annotated[float, Field(ge=0)] = 10.0  # row weight 1 + boost·(position in the user's clicks by time, 0..1); id-kept rows
    positive_keep_t: Annotated[float, Field(ge=0)] = 0.0  # head sub-sampling: keep a click w.p. min(1, sqrt(t/f)) (0 = off)
    ssl_weight: Annotated[float, Field(ge=0)] = 0.0  # α of L_main + α·L_self (0 = no SSL)
    ssl_augmentation: str = "correlated"  # random | multi_dropout | complementary | correlated
    ssl_rate: Rate = 0.5                 # masking / token-dropout probability (random, multi_dropout)
    ssl_batch_size: Width = 256          # m items drawn uniformly from the catalog per step
    ssl_temperature: Annotated[float, Field(gt=0)] = 0.1

    @classmethod
    def from_dict(cls, d: object, prefix: str = "") -> TrainConfig:
        if isinstance(d, dict) and "model" in d and not isinstance(d["model"], (dict, ModelConfig)):
            raise ConfigError(f"model={d['model']!r} must be an object of model settings, e.g. {{\"temperature\": 0.05}}")
        return super().from_dict(d, prefix)

    @classmethod
    def from_file(cls, path: str | None) -> TrainConfig:
        """The default config, or the JSON file at `path` over it; ConfigError naming the file."""
        if path is None:
            return cls()
        import json
        from pathlib import Path

        from training.dataset import first_invalid_utf8

        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            line, byte = first_invalid_utf8(Path(path)) or (0, 0)
            raise ConfigError(f"config {path}: not valid UTF-8: byte 0x{byte:02x} at line {line} ({e.reason})") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"config {path}: {e}") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"config {path}: top level must be a JSON object")
        try:
            return cls.from_dict(obj)
        except ValueError as e:
            raise ConfigError(f"config {path}: {e}") from None

    # ---- choices that belong to the modules implementing them -------------------------------
    @field_validator("objective", "negative_sampler", "ssl_augmentation")
    @classmethod
    def _implemented(cls, v: str, info: ValidationInfo) -> str:
        """One of the names the implementing module registers (`training.task.OBJECTIVES`, ...)."""
        from training import samplers, ssl, task

        choices = {"objective": task.OBJECTIVES, "negative_sampler": samplers.SAMPLERS, "ssl_augmentation": ssl.AUGMENTATIONS}
        return _one_of(v, tuple(choices[info.field_name]))

    @field_validator("hard_rank_band")
    @classmethod
    def _band(cls, v: list[int]) -> list[int]:
        if not (len(v) == 2 and 0 <= v[0] < v[1]):
            raise ValueError(cls.RULES["hard_rank_band"])
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(cls.RULES["device"])
        return v

    # ---- cross-field rules --------------------------------------------------------------
    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        """Fields that only mean something together: a value the run would silently ignore, or
        one that fails only deep inside training, is an error here. The objective's own rules
        are its module's (`training.task`)."""
        from training.task import OBJECTIVES

        OBJECTIVES[self.objective].check_config(self)
        if self.sparse_tables and self.weight_decay > 0:
            raise ValueError(f"sparse_tables=true with weight_decay={self.weight_decay}: SparseAdam has no weight decay (use null or false)")
        if self.history_free_id and not self.user_history:
            raise ValueError("history_free_id=true only applies with user_history=true")
        if self.model.history is not None:
            raise ValueError("model.history is written by the trainer from user_history / history_*; set those instead")
        return self

    def model_config_with_history(self) -> ModelConfig:
        """The model config a bundle records: `model` plus the history input from the history_* fields."""
        if not self.user_history:
            return self.model
        history = HistoryConfig(max_len=self.history_max_len, alpha=self.history_alpha, encoder=self.history_encoder,
                                free_id=self.history_free_id, fold_in_weight=self.history_fold_in_weight,
                                fold_in_half=self.history_fold_in_half, fold_in_recency=self.history_fold_in_recency)
        return self.model.model_copy(update={"history": history})


def _one_of(value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"one of {list(choices)}")
    return value


# ---- pydantic's report → one line naming the key ----------------------------------------------


def config_error(cls: type[StrictConfig], data: dict, error: ValidationError, prefix: str = "") -> ConfigError:
    """The first problem of `error` as `ConfigError("<key>=<value> must be <what>")`.

    Unknown keys come first (a misspelled key would otherwise surface as some other field's
    default), then problems in field order. Type problems name the declared type ("an integer",
    "true or false", "a finite number"), range problems the declared range ("in [0, 1)") or the
    field's rule in words.
    """
    errors = error.errors(include_url=False)
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        loc = extra[0]["loc"][:-1]
        owner = _owner(cls, loc)
        keys = sorted(str(e["loc"][-1]) for e in extra if e["loc"][:-1] == loc)
        return ConfigError(f"unknown {owner.LABEL} config key(s) {keys}; known: {sorted(owner.model_fields)}")
    e = errors[0]
    loc = e["loc"]
    inner = e.get("ctx", {}).get("error") if e["type"] == "value_error" else None
    if isinstance(inner, ConfigError):  # a nested config's own report (its custom __init__ ran)
        where = prefix + "".join(f"{part}." for part in loc)
        return ConfigError(f"{where}{inner}" if inner.keyed else str(inner), keyed=inner.keyed)
    if e["type"] == "value_error" and not loc:  # a model validator: its message says it all
        return ConfigError(str(inner) if inner is not None else e["msg"])
    # descend to the field (a list element's problem is its list's)
    owner, value, path = cls, data, []
    for part in loc:
        if not isinstance(part, str) or part not in owner.model_fields:
            break
        path.append(part)
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        ann = owner.model_fields[part].annotation
        sub = _config_class(ann)
        if sub is None or part == loc[-1]:
            field = owner.model_fields[part]
            return ConfigError(f"{prefix}{'.'.join(path)}={value!r} must be {_expected(owner, part, field, e)}", keyed=True)
        if not isinstance(value, dict):
            return ConfigError(f"{prefix}{'.'.join(path)}={value!r} must be an object of {sub.LABEL} settings", keyed=True)
        owner = sub
    return ConfigError(f"{prefix}{'.'.join(map(str, loc))}: {e['msg']}")


def _owner(cls: type[StrictConfig], loc: tuple) -> type[StrictConfig]:
    owner = cls
    for part in loc:
        sub = _config_class(owner.model_fields[part].annotation) if part in owner.model_fields else None
        if sub is None:
            break
        owner = sub
    return owner


def _config_class(tp: object) -> type[StrictConfig] | None:
    return tp if isinstance(tp, type) and issubclass(tp, StrictConfig) else None


TYPE_ERRORS = {
    "int_type", "int_from_float", "int_parsing", "bool_type", "bool_parsing", "float_type", "float_parsing",
    "finite_number", "string_type", "list_type", "model_type", "dataclass_type", "none_required",
}


def _expected(owner: type[StrictConfig], name: str, field: FieldInfo, e: dict) -> str:
    if e["type"] in TYPE_ERRORS:
        return describe_type(field.annotation)
    if name in owner.RULES:
        return owner.RULES[name]
    if e["type"] == "value_error":
        return str(e["ctx"]["error"]) if "ctx" in e else e["msg"]
    if e["type"] == "literal_error":
        return f"one of {list(typing.get_args(field.annotation))}"
    rng = describe_range(_bounds(field))
    return rng or e["msg"]


def _bounds(field: FieldInfo) -> dict[str, float]:
    """ge / gt / le / lt of a field (on the field, or on the non-None member of an Optional)."""
    metadata = list(field.metadata)
    tp = field.annotation
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is Annotated:
                metadata += list(arg.__metadata__)
    out: dict[str, float] = {}
    for m in metadata:
        for key, kind in (("ge", at.Ge), ("gt", at.Gt), ("le", at.Le), ("lt", at.Lt)):
            if isinstance(m, kind):
                out[key] = getattr(m, key)
        if isinstance(m, FieldInfo):
            out |= _bounds(m)
    return out


def describe_range(b: dict[str, float]) -> str:
    """'>= 1', '> 0', 'in [0, 1)', 'in (0, 1]' from a field's bounds."""
    lo = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    hi = ("]", b["le"]) if "le" in b else (")", b["lt"]) if "lt" in b else None
    if lo and hi:
        return f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return ""


def _num(v: float) -> str:
    return str(int(v)) if isinstance(v, (int, float)) and math.isfinite(v) and float(v).is_integer() else str(v)


def describe_type(tp: Any) -> str:
    """A declared type in words, for the error message."""
    if typing.get_origin(tp) is Annotated:
        return describe_type(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        inner = describe_type(typing.get_args(tp)[0])
        return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s"
    if typing.get_origin(tp) is typing.Literal:
        return f"one of {list(typing.get_args(tp))}"
    if _config_class(tp) is not None:
        return f"an object of {tp.LABEL} settings"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))
