"""The service container and the `Annotated` dependencies routes declare.

`Service` holds the process-wide pieces (settings, metrics, cache, the version holder and its
reloader); the app stores it on `app.state.service`. `get_version` reads the served version
reference exactly once per request — FastAPI caches a dependency's value within a request — so
a handler and everything it calls see one `(model_version, index_version)`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from service.cache import VectorCache
from service.errors import NotReadyError
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.state import Reloader, ServingVersion, VersionHolder

API_KEY_HEADER = "X-API-Key"


@dataclass
class Service:
    settings: Settings
    metrics: ServiceMetrics
    holder: VersionHolder
    reloader: Reloader
    cache: VectorCache | None = None  # created in the lifespan (it binds to the event loop)


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def get_version(svc: ServiceDep) -> ServingVersion:
    version = svc.holder.current  # the one read of the reference for this request
    if version is None:
        reason = svc.reloader.last_error or "the first index version is still loading"
        raise NotReadyError(f"no verified index version is loaded: {reason}")
    return version


VersionDep = Annotated[ServingVersion, Depends(get_version)]


def get_cache(svc: ServiceDep) -> VectorCache:
    if svc.cache is None:  # pragma: no cover - only outside the lifespan
        raise NotReadyError("the cache is not initialized (lifespan not started)")
    return svc.cache


CacheDep = Annotated[VectorCache, Depends(get_cache)]

_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="Required on POST endpoints only when SERVICE_API_KEY is set.",
)


def require_api_key(svc: ServiceDep, key: Annotated[str | None, Security(_api_key_header)]) -> None:
    """Constant-time check of X-API-Key when SERVICE_API_KEY is configured (off by default)."""
    expected = svc.settings.api_key
    if expected is None:
        return
    given = (key or "").encode("utf-8", "surrogateescape")
    if not secrets.compare_digest(given, expected.get_secret_value().encode("utf-8")) or not key:
        raise HTTPException(status_code=401, detail=f"missing or invalid {API_KEY_HEADER} header")
