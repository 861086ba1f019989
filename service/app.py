"""The FastAPI application: `uvicorn service.app:app` (configuration: `SERVICE_*`, see settings).

`create_app(settings)` builds an app; the module attribute `app` is created on first access from
the environment, so importing this module (tests, tools) needs no `SERVICE_INDEX_ROOT`.

Startup does not wait for the index: the reloader thread loads the version `INDEX_ROOT/current`
points at while the server already answers `/healthz` (and 503 on `/readyz` and the retrieval
endpoints until a verified version is in place), then keeps polling for new versions.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import faiss
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from service import errors
from service.cache import make_cache
from service.deps import Service
from service.metrics import ServiceMetrics
from service.observability import BodyLimitMiddleware, ObservabilityMiddleware, configure_logging
from service.retrieval import NonFiniteVectorError, RequestFieldError, UnknownItemError
from service.routes import register_routes
from service.schemas import request_models
from service.settings import Settings, get_settings
from service.state import Reloader, VersionHolder

log = logging.getLogger("service.app")


def configure_threads(settings: Settings) -> None:
    """One process = one core is the fast layout for millisecond requests: no OpenMP/intra-op
    fan-out (which costs more than it saves on a single query), parallelism via workers.

    The request path runs the user tower in numpy (no torch on the service's import graph);
    `torch_threads` applies only where torch is loaded anyway (a process that also trains).
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(settings.torch_threads)
    faiss.omp_set_num_threads(settings.faiss_threads)


def create_app(settings: Settings | None = None, *, start_reloader: bool = True) -> FastAPI:
    """Build the app. `start_reloader=False` (tests) loads nothing until `reloader.check_once()`."""
    settings = settings or get_settings()
    metrics = ServiceMetrics()
    holder = VersionHolder()
    reloader = Reloader(
        settings.index_root,
        holder,
        metrics,
        interval_s=settings.reload_interval_s,
        ef_search_override=settings.hnsw_ef_search,
        exact_fallback_max_items=settings.exact_fallback_max_items,
        freeze_gc=settings.gc_freeze,
    )
    service = Service(settings=settings, metrics=metrics, holder=holder, reloader=reloader)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level, settings.log_format)
        configure_threads(settings)
        service.cache = make_cache(settings, metrics)
        metrics.ready.set(0)
        if start_reloader:
            reloader.start()
        log.info(
            "service starting",
            extra={
                "fields": {
                    "index_root": str(settings.index_root),
                    "cache": service.cache.backend,
                    "api_key": settings.api_key is not None,
                }
            },
        )
        try:
            yield
        finally:
            reloader.stop()
            await service.cache.close()

    app = FastAPI(
        title="Two-tower retrieval service",
        version="1.0",
        description="Top-k candidate retrieval: user tower + FAISS index, hot-reloaded versions.",
        lifespan=lifespan,
    )
    app.state.service = service
    register_routes(app, request_models(settings))
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(RequestFieldError, errors.field_error_handler)
    app.add_exception_handler(UnknownItemError, errors.unknown_item_handler)
    app.add_exception_handler(errors.NotReadyError, errors.not_ready_handler)
    app.add_exception_handler(NonFiniteVectorError, errors.vector_error_handler)
    app.add_exception_handler(Exception, errors.unhandled_error_handler)
    # add_middleware wraps: the last added is the outermost (timing includes the 413s).
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, log_requests=settings.access_log)
    return app


def __getattr__(name: str) -> FastAPI:
    """`service.app.app`, built from the environment on first access (PEP 562)."""
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
