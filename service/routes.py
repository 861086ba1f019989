"""HTTP routes (INTERFACES.md §3, §4's /similar, plus /retrieve/batch and /metrics): thin by design.

Each handler declares what it needs (`ServedDep`: the API-key check and the one read of the
served version; the request body model) and delegates to `service.retrieval`. The JSON POST
endpoints are registered with `post_json`: FastAPI documents them from these signatures as usual,
and `service.jsonroute.JSONBodyRoute` runs them on a lean request path (see there). Responses of
the hot endpoints are serialized by pydantic-core straight from plain dicts; `response_model`
still documents them in the OpenAPI schema, and tests validate real responses against it.

(No `from __future__ import annotations` here: the request models are built per app from its
settings and FastAPI must see the real classes in the signatures.)
"""

from collections.abc import Callable
from typing import Any, TypeVar

import pydantic_core
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from service import retrieval
from service.deps import ServedDep, ServiceDep
from service.jsonroute import JSONBodyRoute
from service.metrics import CONTENT_TYPE_LATEST
from service.schemas import (
    BatchRetrieveResponse,
    EmbedResponse,
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
    RequestModels,
    RetrieveResponse,
    ValidationErrorResponse,
)


class FastJSONResponse(Response):
    """JSON rendered by pydantic-core (5-10x faster than json.dumps for a list of items)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return pydantic_core.to_json(content)


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "SERVICE_API_KEY is set and X-API-Key is missing or wrong."},
    413: {"model": ErrorResponse, "description": "The body is larger than SERVICE_MAX_BODY_BYTES."},
    422: {
        "model": ValidationErrorResponse,
        "description": "Invalid request; `field` names the offending field (`body` when the body is "
        "not JSON: bad UTF-8, a number out of range, nesting deeper than 200, wrong Content-Type).",
    },
    503: {"model": ErrorResponse, "description": "No verified model/index version is loaded yet."},
}


F = TypeVar("F", bound=Callable[..., Any])


def post_json(app: FastAPI, path: str, **kwargs: Any) -> Callable[[F], F]:
    """`@app.post(path, ...)` served by `JSONBodyRoute` (the lean request path, same OpenAPI)."""

    def register(endpoint: F) -> F:
        app.router.add_api_route(path, endpoint, methods=["POST"], route_class_override=JSONBodyRoute, **kwargs)
        return endpoint

    return register


def register_routes(router: FastAPI, models: RequestModels) -> None:
    """Add the routes to `router` (the app itself: an included APIRouter costs a route-table walk
    per request in current FastAPI versions)."""
    EmbedBody = models.embed
    RetrieveBody = models.retrieve
    BatchBody = models.batch
    SimilarBody = models.similar

    @post_json(
        router,
        "/retrieve",
        response_model=RetrieveResponse,
        responses=_ERRORS,
        summary="Top-k items for a user",
    )
    async def retrieve(body: RetrieveBody, served: ServedDep) -> Response:  # type: ignore[valid-type]
        """The k items with the highest cosine to the user's vector, excluded items removed."""
        return FastJSONResponse(
            await retrieval.retrieve(served.version, served.cache, served.settings, body, served.metrics)
        )

    @post_json(
        router,
        "/retrieve/batch",
        response_model=BatchRetrieveResponse,
        responses=_ERRORS,
        summary="Several retrievals in one call",
    )
    async def retrieve_batch(body: BatchBody, served: ServedDep) -> Response:  # type: ignore[valid-type]
        """Up to SERVICE_MAX_BATCH retrievals answered by one version with one cache round trip."""
        return FastJSONResponse(
            await retrieval.retrieve_batch(served.version, served.cache, served.settings, body, served.metrics)
        )

    @post_json(
        router,
        "/similar",
        response_model=RetrieveResponse,
        responses={**_ERRORS, 404: {"model": ErrorResponse, "description": "The item is not in the served index version."}},
        summary="Items similar to an item",
    )
    async def similar(body: SimilarBody, served: ServedDep) -> Response:  # type: ignore[valid-type]
        """The k items closest by cosine to the item's vector (the item itself excluded), with the
        same filter, exclusions and exact-k guarantee as /retrieve; `cached` is always false."""
        return FastJSONResponse(await retrieval.similar(served.version, served.settings, body, served.metrics))

    @post_json(
        router,
        "/embed",
        response_model=EmbedResponse,
        responses=_ERRORS,
        summary="The user vector /retrieve uses",
    )
    async def embed(body: EmbedBody, served: ServedDep) -> Response:  # type: ignore[valid-type]
        """The L2-normalized user vector (same cache, same tower as /retrieve)."""
        return FastJSONResponse(await retrieval.embed(served.version, served.cache, served.settings, body, served.metrics))

    @router.get("/healthz", response_model=HealthResponse, summary="Liveness")
    async def healthz() -> Response:
        """200 while the process lives."""
        return FastJSONResponse({"status": "ok"})

    @router.get(
        "/readyz",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "No verified version loaded."}},
        summary="Readiness",
    )
    async def readyz(svc: ServiceDep) -> Response:
        """200 only while a complete, verified model + index pair is loaded."""
        version = svc.holder.current
        if version is None:
            reason = svc.reloader.last_error or "the first index version is still loading"
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return FastJSONResponse(
            {"status": "ready", "model_version": version.model_version, "index_version": version.index_version}
        )

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
        summary="Prometheus metrics of this process",
    )
    async def metrics(svc: ServiceDep) -> Response:
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)
