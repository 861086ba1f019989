"""A lean request path for the hot JSON POST endpoints, documented by FastAPI as usual.

For `async def retrieve(body: RetrieveBody, served: ServedDep)` FastAPI's generic handler, per
request: builds a `Request`, opens two `AsyncExitStack`s, reads the body, sniffs the content type
through `email.message`, parses it with `json.loads`, walks the dependency tree (the `Security`
header and `get_served`), validates the parsed object through a field wrapper, and collects
errors: ~100 µs of CPU per request (measured in process: a cache miss went from ~520 to ~410 µs),
none of which `/healthz` pays.

Still paying (re-measured): `python -m bench.serve --items 20000 --in-process --ef-search k20
--requests 1000 --rounds 5`, with and without `--routes fastapi` (the same routes registered as
plain FastAPI routes), four runs each, interleaved, on 2 cores shared with other jobs (load
average 7-9, so every figure is ~3-4x a quiet machine's). CPU µs per request, server (fastest
round) + redis-server, median of the four runs: cache miss 1445 with this route class, 1816
without; cache hit 1144 against 1585; `/healthz` in the same runs 549 and 553. In units of
`/healthz`: miss 2.64 against 3.19, hit 2.22 against 2.87. No run of one overlapped any run of
the other.

`JSONBodyRoute` keeps the route's declaration — FastAPI still builds the OpenAPI operation
(request body schema, the API-key security scheme, responses) from the endpoint's signature —
and replaces only what runs per request:

1. the body, already buffered and size-checked by `BodyLimitMiddleware` (413 happens there);
2. `deps.served_for` — the same API-key check and one read of the served version that the
   `ServedDep` dependency does (401 / 503 take precedence over a 422, as with FastAPI);
3. `Model.model_validate_json(raw)`: pydantic-core parses and validates in one pass, with the
   model's own validators (bounds, `extra="forbid"`, NaN/±inf rejected per feature). Errors are
   raised as `RequestValidationError` with `body`-prefixed locations, so the app's 422 handler
   (names the field, never echoes the input) formats them exactly as before;
4. the endpoint itself, called with `body=` and `served=`; its `Response` is sent as is.

What differs from FastAPI's handler, on invalid input only: a body that is not JSON (bad UTF-8,
a lone surrogate, a number beyond float range, nesting deeper than 200) is a 422 `json_invalid`
at `body` instead of FastAPI's 400 (or a 500 for a lone surrogate in a feature value).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.deps import API_KEY_HEADER, Service, get_served, served_for

_API_KEY = API_KEY_HEADER.lower().encode("latin-1")

NOT_JSON = {
    "type": "content_type",
    "loc": ("body",),
    "msg": "expected a JSON body (Content-Type: application/json)",
}
MISSING = {"type": "missing", "loc": ("body",), "msg": "Field required"}


def is_json_content_type(value: bytes) -> bool:
    """`application/json` or `application/<anything>+json`, parameters (charset) ignored."""
    media = value.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away."""
    message = await receive()
    if message["type"] != "http.request":
        return None
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def validation_error(exc: ValidationError) -> RequestValidationError:
    """pydantic's errors located under `body`, without the input (never echoed) or context."""
    return RequestValidationError(
        [
            {"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"]}
            for e in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
    )


class JSONBodyRoute(APIRoute):
    """An `APIRoute` for `async def endpoint(body: Model, served: ServedDep) -> Response`.

    The signature is checked when the route is created (a TypeError names what is wrong), so a
    route that this class cannot run faithfully never gets registered.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        dependant = self.dependant
        body_params = dependant.body_params
        model = body_params[0].field_info.annotation if len(body_params) == 1 else None
        deps = [d.call for d in dependant.dependencies]
        if (
            not inspect.iscoroutinefunction(endpoint)
            or not (isinstance(model, type) and issubclass(model, BaseModel))
            or body_params[0].name != "body"
            or deps != [get_served]
            or dependant.dependencies[0].name != "served"
            or dependant.query_params
            or dependant.header_params
            or dependant.path_params
            or dependant.cookie_params
        ):
            raise TypeError(
                f"{path}: JSONBodyRoute needs `async def f(body: <pydantic model>, served: ServedDep)`"
            )
        self.body_model: type[BaseModel] = model
        self._call: Callable[..., Awaitable[Response]] = endpoint
        self.app = self.handle_request

    async def handle_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = api_key = None
        for name, value in scope["headers"]:  # the first of repeated headers, as Starlette's
            if name == b"content-type":
                if content_type is None:
                    content_type = value
            elif name == _API_KEY and api_key is None:
                api_key = value
        raw = await read_body(receive)
        if raw is None:  # the client disconnected: nobody to answer
            return
        svc: Service = scope["app"].state.service
        served = served_for(svc, None if api_key is None else api_key.decode("latin-1"))
        if not raw:
            raise RequestValidationError([MISSING])
        if content_type is None or not is_json_content_type(content_type):
            raise RequestValidationError([NOT_JSON])
        try:
            body = self.body_model.model_validate_json(raw)
        except ValidationError as e:
            raise validation_error(e) from None
        response = await self._call(body=body, served=served)
        await response(scope, receive, send)
