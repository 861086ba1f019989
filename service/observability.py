"""Structured JSON logs, per-request context, and the pure-ASGI middlewares.

The middlewares are plain ASGI callables, not Starlette's `BaseHTTPMiddleware`, which costs a
task and a memory stream per request; on a path whose whole budget is a millisecond or two,
that matters.

* `ObservabilityMiddleware`: latency histogram and request counter by route template, plus one
  JSON log line per request with status, latency and the version pair that answered it. Handlers
  add fields to the line through `request_context()` (a contextvar holding a dict).
* `BodyLimitMiddleware`: a 413 for a declared `Content-Length` over the limit before anything is
  read, and for a chunked body as soon as the running total passes it.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import ServiceMetrics

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("request_context", default=None)

access_log = logging.getLogger("service.access")


def request_context() -> dict[str, Any]:
    """The current request's log fields (a throwaway dict outside a request)."""
    ctx = _context.get()
    return ctx if ctx is not None else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


LOG_FORMATS = ("json", "plain")
PLAIN_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class PlainFormatter(logging.Formatter):
    """`time logger level message key=value ...`: the fields JSON lines carry, for reading by eye."""

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's naming
        fields = getattr(record, "fields", None)
        extra = "".join(f" {k}={v}" for k, v in fields.items()) if isinstance(fields, dict) else ""
        return super().formatMessage(record) + extra


def log_handler(fmt: str = "json") -> logging.Handler:
    """The process's one log handler: stderr, one JSON object per line (`json`) or
    `asctime name level message` (`plain`, for reading by eye)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    handler._service_handler = True  # type: ignore[attr-defined]
    return handler


# the server's own loggers, which gunicorn and uvicorn would give plain handlers of their own
SERVER_LOGGERS = ("gunicorn.error", "gunicorn.access", "uvicorn", "uvicorn.error", "uvicorn.access")


def logging_config(level: str, fmt: str = "json") -> dict[str, Any]:
    """`logging.config.dictConfig` for a whole server process (`python -m service.run` gives it
    to gunicorn as `logconfig_dict`; the forked workers inherit it): `log_handler(fmt)` on the
    root logger, and gunicorn's and uvicorn's loggers without handlers of their own,
    propagating to it. Every record is written once, in one format."""
    log_handler(fmt)  # a bad format fails here, not in each worker
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"service": {"()": log_handler, "fmt": fmt}},
        "root": {"handlers": ["service"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True} for name in SERVER_LOGGERS},
    }


def configure_logging(level: str, fmt: str = "json") -> None:
    """Level of the `service` loggers, and `log_handler(fmt)` on the root logger unless one is
    there already (idempotent: under `python -m service.run` `logging_config` installed it).

    One handler, on the root: a handler on `service` as well would write each of its records
    twice, once there and once more at the root's handler the record propagates to. Python
    warnings are logged through it too (`py.warnings`), so stderr stays one format.
    """
    logging.getLogger("service").setLevel(level)
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not any(getattr(h, "_service_handler", False) for h in root.handlers):
        root.addHandler(log_handler(fmt))


# Metric label values must come from a fixed set: the method is whatever token the client sent
# (h11 accepts any), so `XFOO /nope` from anyone would add series to /metrics, and memory,
# without bound. The endpoint label is already bounded (route templates, or "unmatched").
METRIC_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


def metric_method(method: str) -> str:
    """The method as a metric label: a standard one as is, anything else "other"."""
    return method if method in METRIC_METHODS else "other"


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class ObservabilityMiddleware:
    """Metrics and the access log for every HTTP request (see module docstring)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, log_requests: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests
        # labels() looks the child up under a lock on every call; keep the children
        self._latency: dict[tuple[str, str], Any] = {}
        self._count: dict[tuple[str, str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        ctx: dict[str, Any] = {}
        token = _context.set(ctx)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _context.reset(token)
            elapsed = time.perf_counter() - start
            endpoint = _route_template(scope)
            method = scope.get("method", "")
            key = (endpoint, metric_method(method))
            hist = self._latency.get(key)
            if hist is None:
                hist = self._latency[key] = self.metrics.request_latency.labels(*key)
            hist.observe(elapsed)
            ckey = (*key, status)
            counter = self._count.get(ckey)
            if counter is None:
                counter = self._count[ckey] = self.metrics.requests.labels(*key, str(status))
            counter.inc()
            if self.log_requests and access_log.isEnabledFor(logging.INFO):
                fields = {
                    "method": method,
                    "path": scope.get("path", ""),
                    "endpoint": endpoint,
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 3),
                }
                fields.update(ctx)
                access_log.info("request", extra={"fields": fields})


class BodyLimitMiddleware:
    """413 for request bodies over `max_bytes`, declared or streamed.

    A declared `Content-Length` over the limit is refused before anything is read. Otherwise the
    body is read here (it is needed in full anyway: JSON) and refused as soon as the running
    total passes the limit, so a chunked upload cannot bypass it; the app then receives the
    buffered body as one message.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body exceeds {self.max_bytes} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    await self._reject(send)
                    return
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that returns `messages` first, then defers to the real one (disconnects)."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
