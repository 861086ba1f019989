"""Request and response models of the HTTP API (INTERFACES.md §3), separate from each other.

Requests are strict: unknown fields are rejected, values are not coerced (`"k": "3"` is a 422),
every list and string is bounded, and a feature
value must be a string, a finite number, a list of strings or null. Whether a value has the
right type *for that feature* depends on the loaded model's schema, which changes on hot reload,
so that part is checked per request (`training.numpy_tower.UserTower.validate`); the checks here are
the ones that hold for any model.

The bounds that are configurable (`max_k`, `max_exclude`, `max_batch`, ...) are applied by
`request_models(settings)`, which derives subclasses with the configured limits so that
validation and the OpenAPI document state the same numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
)
from pydantic_core import PydanticCustomError

from indexer.attributes import DEFAULT_MAX_VALUES, FilterError, parse_condition
from service.settings import Settings

_FEATURE_VALUE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "number"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "null"},
    ],
    "description": "categorical: a string; multi_categorical: a list of strings or a "
    "separator-joined string; continuous: a finite number; null = missing.",
}


def _check_feature_value(value: Any) -> Any:
    """Accept the JSON shapes a feature can take; everything else is a 422 on this feature.

    NaN and ±infinity are rejected here (Python's JSON parser accepts `NaN`, `Infinity` and
    `1e999`), so a non-finite number never reaches the model. Messages never include the value.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise PydanticCustomError("feature_type", "expected a string, a number or a list of strings, got a boolean")
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            raise PydanticCustomError("finite_number", "number out of range") from None
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PydanticCustomError("finite_number", "must be a finite number (NaN and infinity are not allowed)")
        return value
    if isinstance(value, list):
        if all(isinstance(t, str) for t in value):
            return value
        raise PydanticCustomError("feature_type", "a list feature must contain only strings")
    raise PydanticCustomError(
        "feature_type", "expected a string, a number or a list of strings, got {kind}", {"kind": type(value).__name__}
    )


FeatureValue = Annotated[Any, BeforeValidator(_check_feature_value), WithJsonSchema(_FEATURE_VALUE_SCHEMA)]


def _check_id(value: str) -> str:
    """Refuse an id holding a control character (Unicode category Cc: NUL, newline, escape, DEL,
    the C1 range).

    Ids end up in Redis cache keys, in the JSON log lines and in the client's own logs; a NUL or a
    newline there is never a real id but a client bug or log injection, so it is a 422 naming the
    field and the character's position (not the value itself) instead of a silent 200.
    """
    found = _CONTROL.search(value)  # one C-level scan: a request may carry 10,000 excluded + history ids
    if found is not None:
        raise PydanticCustomError(
            "control_character",
            "ids must not contain control characters (found U+{code} at position {pos})",
            {"code": f"{ord(found.group()):04X}", "pos": found.start()},
        )
    return value


# Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F (tests/service/test_history.py
# holds the pattern to unicodedata over the whole code space)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def id_string(max_length: int) -> Any:
    """The type of every id in a request (user, item, excluded item): a bounded string without
    control characters."""
    return Annotated[str, Field(max_length=max_length), AfterValidator(_check_id)]


_Id = id_string(512)

HISTORY_DESCRIPTION = (
    "The user's recent clicks, oldest first (INTERFACES.md §4): the user tower pools the most recent ones up to "
    "the model's history length in place of the training-time history; ids unknown to the served version are "
    "ignored; [] is an empty history. Absent: the user as trained (a known user's training history)."
)

_SCALAR_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
_VALUES_SCHEMA: dict[str, Any] = {"type": "array", "items": _SCALAR_SCHEMA, "minItems": 1}
_CONDITION_SCHEMA: dict[str, Any] = {
    "anyOf": [
        _SCALAR_SCHEMA,
        {"type": "object", "properties": {"in": _VALUES_SCHEMA}, "required": ["in"], "additionalProperties": False},
        {"type": "object", "properties": {"not_in": _VALUES_SCHEMA}, "required": ["not_in"], "additionalProperties": False},
        {"type": "object", "properties": {"gte": {"type": "number"}, "lte": {"type": "number"}},
         "minProperties": 1, "additionalProperties": False},
        {"type": "object", "properties": {"exists": {"type": "boolean"}}, "required": ["exists"], "additionalProperties": False},
        {"type": "object", "properties": {"any": _VALUES_SCHEMA}, "required": ["any"], "additionalProperties": False},
        {"type": "object", "properties": {"all": _VALUES_SCHEMA}, "required": ["all"], "additionalProperties": False},
    ],
    "description": "A scalar (equals); {in: [...]}, {not_in: [...]}; {gte: x, lte: y} (either bound); "
    "{exists: true|false}; for multi_categorical attributes also {any: [...]} / {all: [...]}. "
    "An item missing the attribute matches nothing but {exists: false}.",
}
FILTER_DESCRIPTION = (
    "Attribute conditions, all ANDed (attributes: the index version's `item.attributes` of schema.json). "
    "The response holds exactly min(k, |allowed - excluded|) items, all satisfying the filter."
)


def condition_validator(max_values: int) -> BeforeValidator:
    """Parse one filter condition (`indexer.attributes.parse_condition`) into a `Condition`; a
    malformed one is a 422 at `filter.<attribute>`. Whether the attribute exists and has that
    type is the served version's business (checked per request, like feature types)."""

    def check(value: Any) -> Any:
        try:
            return parse_condition(value, max_values=max_values)
        except FilterError as e:
            raise PydanticCustomError("filter_error", e.message.replace("{", "(").replace("}", ")")) from None

    return BeforeValidator(check)


FilterCondition = Annotated[Any, condition_validator(DEFAULT_MAX_VALUES), WithJsonSchema(_CONDITION_SCHEMA)]


class _Strict(BaseModel):
    """Base of the request models: unknown fields rejected, and no type coercion.

    `strict=True`: lax mode turned `"k": true` into 1 and `"k": "3"` into 3 — a client bug the
    service silently answered. Now a value must already have the field's JSON type (a JSON
    integer for `k`; `3.0` is refused too), else a 422 names the field. Feature values are
    `Any` with their own validator, so strictness does not change what they accept.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class EmbedRequest(_Strict):
    """The user: an optional id and optional features (missing ones are out-of-vocabulary)."""

    user_id: _Id | None = Field(
        None,
        description="Unknown or absent ids use the out-of-vocabulary id embedding.",
        examples=["196"],
    )
    features: dict[str, FeatureValue] = Field(
        default_factory=dict,
        max_length=256,
        description="User features by name (see the dataset's schema.json); any may be omitted.",
        examples=[{"age": 49, "gender": "M", "occupation": "writer", "zip": "55105"}],
    )
    history: list[_Id] | None = Field(
        None,
        max_length=100,
        description=HISTORY_DESCRIPTION,
        examples=[["242", "302", "377"]],
    )


class RetrieveRequest(EmbedRequest):
    """A user plus how many items to return and which ones never to return."""

    k: int = Field(20, ge=1, le=1000, description="Number of items to return.")
    exclude_item_ids: list[_Id] = Field(
        default_factory=list,
        max_length=10_000,
        description="Items that must not appear (e.g. already seen); the response still has "
        "min(k, catalog size - excluded) items.",
    )
    filter: dict[str, FilterCondition] | None = Field(None, max_length=32, description=FILTER_DESCRIPTION)


class SimilarRequest(_Strict):
    """An item of the served version, and how many of its nearest items to return."""

    item_id: _Id = Field(description="An item of the served index version.", examples=["50"])
    k: int = Field(20, ge=1, le=1000, description="Number of items to return.")
    exclude_item_ids: list[_Id] = Field(
        default_factory=list,
        max_length=10_000,
        description="Items that must not appear; the item itself never does.",
    )
    filter: dict[str, FilterCondition] | None = Field(None, max_length=32, description=FILTER_DESCRIPTION)


class BatchRetrieveRequest(_Strict):
    """Several retrieve requests answered by one model/index version and one cache round trip."""

    requests: list[RetrieveRequest] = Field(min_length=1, max_length=64)


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="Cosine between the user vector and the item vector.")


class RetrieveResponse(BaseModel):
    items: list[ScoredItem] = Field(description="Highest score first.")
    model_version: str
    index_version: str
    cached: bool = Field(description="True when the user vector came from the cache.")


class BatchRetrieveResponse(BaseModel):
    results: list[RetrieveResponse] = Field(description="One result per request, in order.")
    model_version: str
    index_version: str


class EmbedResponse(BaseModel):
    vector: list[float] = Field(description="The L2-normalized user vector /retrieve uses.")
    model_version: str
    cached: bool = False


class HealthResponse(BaseModel):
    status: str = "ok"


class ReadyResponse(BaseModel):
    status: str = Field(description="`ready` or `not ready`.")
    model_version: str | None = None
    index_version: str | None = None
    reason: str | None = Field(None, description="Why the service is not ready.")


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where the problem is, e.g. ['body', 'features', 'age'].")
    field: str = Field(description="The same location as a dotted path, e.g. `features.age`.")
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    detail: list[ErrorItem]


class ErrorResponse(BaseModel):
    detail: str


@dataclass(frozen=True)
class RequestModels:
    """The request models with the configured bounds (see the module docstring)."""

    embed: type[EmbedRequest]
    retrieve: type[RetrieveRequest]
    batch: type[BatchRetrieveRequest]
    similar: type[SimilarRequest]


def request_models(settings: Settings) -> RequestModels:
    """Subclass the request models with the limits of `settings`, keeping names and docs."""
    id_str = id_string(settings.max_id_length)
    user_id = (
        id_str | None,
        Field(None, description=EmbedRequest.model_fields["user_id"].description, examples=["196"]),
    )
    features = (
        dict[str, FeatureValue],
        Field(
            default_factory=dict,
            max_length=settings.max_features,
            description=EmbedRequest.model_fields["features"].description,
            examples=EmbedRequest.model_fields["features"].examples,
        ),
    )
    condition = Annotated[Any, condition_validator(settings.max_filter_values), WithJsonSchema(_CONDITION_SCHEMA)]
    filter_ = (
        dict[str, condition] | None,  # type: ignore[valid-type]
        Field(None, max_length=settings.max_filter_attributes, description=FILTER_DESCRIPTION),
    )
    k = (int, Field(20, ge=1, le=settings.max_k, description="Number of items to return."))
    history = (
        list[id_str] | None,  # type: ignore[valid-type]
        Field(None, max_length=settings.max_history, description=HISTORY_DESCRIPTION,
              examples=EmbedRequest.model_fields["history"].examples),
    )
    embed = create_model(
        "EmbedRequest", __base__=EmbedRequest, __doc__=EmbedRequest.__doc__, user_id=user_id, features=features,
        history=history,
    )
    def exclude_ids(model: type[BaseModel]) -> tuple:
        return (
            list[id_str],
            Field(
                default_factory=list,
                max_length=settings.max_exclude,
                description=model.model_fields["exclude_item_ids"].description,
            ),
        )

    retrieve = create_model(
        "RetrieveRequest",
        __base__=RetrieveRequest,
        __doc__=RetrieveRequest.__doc__,
        user_id=user_id,
        features=features,
        history=history,
        k=k,
        exclude_item_ids=exclude_ids(RetrieveRequest),
        filter=filter_,
    )
    similar = create_model(
        "SimilarRequest",
        __base__=SimilarRequest,
        __doc__=SimilarRequest.__doc__,
        item_id=(id_str, Field(description=SimilarRequest.model_fields["item_id"].description, examples=["50"])),
        k=k,
        exclude_item_ids=exclude_ids(SimilarRequest),
        filter=filter_,
    )
    batch = create_model(
        "BatchRetrieveRequest",
        __base__=BatchRetrieveRequest,
        __doc__=BatchRetrieveRequest.__doc__,
        requests=(list[retrieve], Field(min_length=1, max_length=settings.max_batch)),  # type: ignore[valid-type]
    )
    return RequestModels(embed=embed, retrieve=retrieve, batch=batch, similar=similar)
