"""The service container and the `Annotated` dependencies routes declare.

`Service` holds the process-wide pieces (settings, metrics, cache, the version holder and its
reloader); the app stores it on `app.state.service`. `served_for` (the `ServedDep` dependency,
and called directly by `service.jsonroute.JSONBodyRoute`) checks the API key and reads the served
version reference exactly once per request, so a handler and everything it calls see one
`(model_version, index_version)`.

Dependencies are `async def` although none awaits: FastAPI runs a plain `def` dependency in the
threadpool, and a thread hop per request costs more than the whole retrieval.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from indexer.version import ServedVersion
from service.cache import VectorCache
from service.errors import NotReadyError
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.state import Reloader, VersionHolder

API_KEY_HEADER = "X-API-Key"


@dataclass
class Service:
    settings: Settings
    metrics: ServiceMetrics
    holder: VersionHolder
    reloader: Reloader
    cache: VectorCache | None = None  # created in the lifespan (it binds to the event loop)


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]

_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="Required on POST endpoints only when SERVICE_API_KEY is set.",
)


def check_api_key(settings: Settings, key: str | None) -> None:
    """Constant-time check of X-API-Key when SERVICE_API_KEY is configured (off by default)."""
    expected = settings.api_key
    if expected is None:
        return
    given = (key or "").encode("utf-8", "surrogateescape")
    if not secrets.compare_digest(given, expected.get_secret_value().encode("utf-8")) or not key:
        raise HTTPException(status_code=401, detail=f"missing or invalid {API_KEY_HEADER} header")


@dataclass(frozen=True)
class Served:
    """What a retrieval request works with: one version (read once), the cache, the settings."""

    version: ServedVersion
    cache: VectorCache
    settings: Settings
    metrics: ServiceMetrics | None = None


def served_for(svc: Service, key: str | None) -> Served:
    """API key check, then the one read of the served version reference for this request."""
    check_api_key(svc.settings, key)
    version = svc.holder.current  # the one read of the reference for this request
    if version is None:
        reason = svc.reloader.last_error or "the first index version is still loading"
        raise NotReadyError(f"no verified index version is loaded: {reason}")
    if svc.cache is None:  # pragma: no cover - only outside the lifespan
        raise NotReadyError("the cache is not initialized (lifespan not started)")
    return Served(version, svc.cache, svc.settings, svc.metrics)


async def get_served(request: Request, key: Annotated[str | None, Security(_api_key_header)]) -> Served:
    """`served_for` as a dependency. Routes declared with `service.jsonroute.JSONBodyRoute` call
    `served_for` directly; the declaration still documents the API key in the OpenAPI schema.
    """
    return served_for(request.app.state.service, key)


ServedDep = Annotated[Served, Depends(get_served)]
