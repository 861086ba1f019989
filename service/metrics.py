"""Prometheus metrics of one service process (`GET /metrics`).

Each app owns its own `CollectorRegistry`, so that several apps in one process (the test suite)
never share counters. With `uvicorn --workers N` every worker is its own process with its own
registry; scrape each worker (or run one worker per container, the usual deployment).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

# Retrieval latencies live between ~0.5 ms (cache hit, small k) and tens of ms (exact
# fallback on a big catalog); the buckets are dense where the SLO (p99 <= 15 ms) is decided.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.03,
    0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)


def labelled_counter(name: str, doc: str, label: str, values: tuple[str, ...], registry: CollectorRegistry) -> Counter:
    """A counter with one label whose every value is exported from the start (at 0): a rate
    query over a series that appears only at its first event misses that event."""
    counter = Counter(name, doc, [label], registry=registry)
    for value in values:
        counter.labels(value)
    return counter


class ServiceMetrics:
    """All metrics of the service, registered in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_latency = Histogram(
            "service_request_duration_seconds",
            "Request latency by endpoint (route template), from first byte in to response sent.",
            ["endpoint", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "service_requests", "Requests by endpoint and status code.", ["endpoint", "method", "status"], registry=r
        )
        self.cache_hits = Counter("service_cache_hits", "User vectors served from the cache.", ["backend"], registry=r)
        self.cache_misses = Counter(
            "service_cache_misses", "User vectors computed by the tower (not in cache, cache skipped or failed).",
            ["backend"], registry=r,
        )
        self.cache_errors = Counter(
            "service_cache_errors",
            "Cache failures, each also counted as a miss: timeout, connection, malformed value, other.",
            ["backend", "reason"],
            registry=r,
        )
        self.cache_bypassed = Counter(
            "service_cache_bypassed", "Cache operations skipped because the circuit breaker is open.",
            ["backend"], registry=r,
        )
        self.breaker_open = Gauge(
            "service_cache_breaker_open", "1 while the Redis circuit breaker is open (Redis skipped).", registry=r
        )
        self.loaded_version = Gauge(
            "service_loaded_version_info",
            "The (model_version, index_version) pair being served; value 1.",
            ["model_version", "index_version"],
            registry=r,
        )
        self.filtered_queries = labelled_counter(
            "service_filtered_queries",
            "Filtered retrievals by the strategy that answered them: exact (scan of the allowed rows), "
            "ann (index search with an id selector), fallback (an ANN answer came back short; exact scan).",
            "strategy", ("exact", "ann", "fallback"), r,
        )
        self.history_ids = labelled_counter(
            "service_history_ids",
            "Item ids received in request histories, by outcome: used (pooled by the user tower), ignored "
            "(unknown to the served version, e.g. fresh since training; never an error), beyond (older than the "
            "model's history length).",
            "outcome", ("used", "ignored", "beyond"), r,
        )
        self.index_items = Gauge("service_index_items", "Items in the served index.", registry=r)
        self.ready = Gauge("service_ready", "1 while a verified version is loaded.", registry=r)
        self.reloads = labelled_counter(
            "service_reloads", "Attempts to load a new index version, by result (success/failure).", "result",
            ("success", "failure"), r,
        )
        self.last_reload = Gauge(
            "service_last_reload_timestamp_seconds", "Unix time of the last successful swap.", registry=r
        )

    def set_version(self, model_version: str, index_version: str, items: int, when: float) -> None:
        """Publish a freshly swapped-in version (replacing the previous pair's series)."""
        self.loaded_version.clear()
        self.loaded_version.labels(model_version, index_version).set(1)
        self.index_items.set(items)
        self.ready.set(1)
        self.last_reload.set(when)

    def render(self) -> bytes:
        return generate_latest(self.registry)
