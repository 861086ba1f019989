"""Error responses: every 4xx/5xx body is JSON, names the field, and never echoes input.

FastAPI's default 422 handler returns each pydantic error with its `input` (and `ctx`): that
echoes whatever the client sent back into the response and logs — and when the input is a NaN
(Python's JSON parser accepts `NaN`), serializing the echo fails and the 422 becomes a 500.
`validation_error_handler` keeps only the location, a dotted `field`, the message and the error
type. Client-supplied names that appear in a location (an unknown feature name, an unknown
body field) are truncated so that a 1 MB key cannot be reflected either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.retrieval import RequestFieldError

log = logging.getLogger("service.errors")

MAX_LOC_PART = 100


class NotReadyError(RuntimeError):
    """No verified version is loaded yet (or `current` has never been valid)."""


def _loc_part(part: Any) -> str | int:
    if isinstance(part, int) and not isinstance(part, bool):
        return part
    text = str(part)
    return text if len(text) <= MAX_LOC_PART else text[:MAX_LOC_PART] + "…"


def error_item(loc: Sequence[Any], msg: str, type_: str) -> dict[str, Any]:
    clean = [_loc_part(p) for p in loc]
    path = clean[1:] if clean and clean[0] == "body" else clean
    if type_ == "json_invalid":
        path = []
    field = ".".join(str(p) for p in path) or (str(clean[0]) if clean else "body")
    return {"loc": clean, "field": field, "msg": msg, "type": type_}


def sanitize(errors: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [error_item(e.get("loc", ()), str(e.get("msg", "invalid value")), str(e.get("type", "value_error"))) for e in errors]


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return JSONResponse({"detail": sanitize(errors)}, status_code=422)


async def field_error_handler(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestFieldError):
        return await unhandled_error_handler(request, exc)
    return JSONResponse({"detail": [error_item(exc.loc, exc.msg, exc.type)]}, status_code=422)


async def unknown_item_handler(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def not_ready_handler(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc) or "not ready"}, status_code=503, headers={"Retry-After": "1"})


async def vector_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.error("refusing to search with a bad user vector: %s", exc)
    return JSONResponse({"detail": f"internal error: {exc}"}, status_code=500)


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)
