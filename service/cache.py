"""User-vector cache: Redis when configured, an in-process LRU+TTL otherwise.

What is cached is the L2-normalized user vector, as raw little-endian float32 bytes, under a key
made of the model version, a hash of the canonicalized request features and the user id. The
model version in the key is what makes a hot reload safe: a vector computed by one model is never
served with another model's index (invariant 2), and old entries simply expire.

Redis is an accelerator, never a dependency. Every Redis call has a hard deadline of tens of
milliseconds (the connect timeout, then a reply deadline: see service/redis_client.py; redis-py
gets an outer `asyncio.timeout`), is never retried, and goes through a circuit breaker: after
`threshold` consecutive failures Redis is skipped for `cooldown` seconds, then one request probes
it; success closes the breaker. Any failure, and any cached value that is not exactly `dim`
finite float32s of unit norm, is a miss: the tower computes the vector.

The request path reads with `get_many` (awaited: the answer decides hit or miss) and writes with
`set_many_nowait`: the response does not wait for the SET, whose outcome reaches the breaker and
the metrics when it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import urlsplit

import numpy as np
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.metrics import ServiceMetrics
from service.redis_client import FastRedis, RedisReplyError, deadline
from service.settings import Settings

log = logging.getLogger("service.cache")

VECTOR_DTYPE = np.dtype("<f4")
NORM_TOLERANCE = 1e-3
KEY_SCHEMA = "uv1"  # bump when the key layout or the value encoding changes


def features_digest(features: dict[str, object]) -> str:
    """A stable hash of canonicalized features (normalized values, sorted names, no nulls).

    The values are the ones `UserTower.validate` returns (str, float or list[str]), so `49` and
    `49.0`, or a key order change, give the same digest, while any change of value does not.
    """
    canon = json.dumps(
        {k: v for k, v in features.items() if v is not None},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.blake2b(canon.encode("utf-8"), digest_size=16).hexdigest()


def history_digest(history: Sequence[int] | None, vectors_version: str | None = None) -> str | None:
    """A hash of the history rows the tower *used* (`UserTower.encode_history`: unknown ids
    dropped, cut to the model's length), None without a history. Rows are the model version's
    own item codes; the key holds that version too, so equal digests mean equal inputs.

    `vectors_version`: the index version whose item vectors the history is folded in with
    (`HistoryFoldIn`), hashed in too: an `indexer update` re-embeds changed items under the same
    model version, so the same clicks can give another user vector in the next index version."""
    if history is None:
        return None
    h = hashlib.blake2b(np.asarray(history, dtype="<i8").tobytes(), digest_size=16)
    if vectors_version is not None:
        h.update(b"\0" + vectors_version.encode("utf-8"))
    return h.hexdigest()


def cache_key(
    prefix: str, model_version: str, user_id: str | None, features_hash: str, history_hash: str | None = None,
) -> str:
    """`prefix:uv1:<model_version>:<features hash>[:h<history hash>]:<u+id | ->`.

    The user id comes last so that the fixed-shape parts stay unambiguous whatever characters
    an id contains; an absent id (`-`) and the empty id (`u`) are distinct keys. A request with a
    history (even an empty one) gets the `h` part; one without keeps the key it had before, so
    a vector is never shared between two histories, or between a history and none.
    """
    uid = "-" if user_id is None else "u" + user_id
    hist = "" if history_hash is None else f"h{history_hash}:"
    return f"{prefix}:{KEY_SCHEMA}:{model_version}:{features_hash}:{hist}{uid}"


def encode_vector(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).tobytes()


def decode_vector(raw: object, dim: int) -> np.ndarray | None:
    """The cached vector, or None if `raw` is not `dim` finite float32s of (about) unit norm.

    A wrong length, garbage bytes or a vector from a different encoding must never reach FAISS:
    they would silently return wrong items, so they are treated as a miss.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) != dim * VECTOR_DTYPE.itemsize:
        return None
    vec = np.frombuffer(raw, dtype=VECTOR_DTYPE)
    if not np.isfinite(vec).all():
        return None
    if abs(float(np.dot(vec.astype(np.float64), vec.astype(np.float64))) - 1.0) > NORM_TOLERANCE:
        return None
    return vec.astype(np.float32, copy=True)


class VectorCache(Protocol):
    """What the request path needs from a cache. Nothing raises: a failed read is a miss, a
    failed write is counted and forgotten.

    `set_many_nowait` is the request path's write: it returns before the backend has answered
    (Redis: the SETs are queued on the shared connection, so any later read sees them), so
    a response never waits for a cache write. `set_many` waits for the outcome.
    """

    backend: str

    async def get_many(self, keys: Sequence[str], dim: int) -> list[np.ndarray | None]: ...

    async def set_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None: ...

    def set_many_nowait(self, items: Sequence[tuple[str, np.ndarray]]) -> None: ...

    async def close(self) -> None: ...


class LocalCache:
    """In-process LRU with a TTL (the default when no Redis URL is configured)."""

    backend = "local"

    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        metrics: ServiceMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._hits = metrics.cache_hits.labels(self.backend)
        self._misses = metrics.cache_misses.labels(self.backend)
        self._malformed = metrics.cache_errors.labels(self.backend, "malformed")

    def __len__(self) -> int:
        return len(self._data)

    def get_raw(self, key: str) -> bytes | None:
        now = self._clock()
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry[0] <= now:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return entry[1]

    def set_raw(self, key: str, value: bytes) -> None:
        if self._max <= 0:
            return
        with self._lock:
            self._data[key] = (self._clock() + self._ttl, value)
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    async def get_many(self, keys: Sequence[str], dim: int) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for key in keys:
            raw = self.get_raw(key)
            vec = None if raw is None else decode_vector(raw, dim)
            if vec is None:
                if raw is not None:
                    self._malformed.inc()
                self._misses.inc()
            else:
                self._hits.inc()
            out.append(vec)
        return out

    async def set_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        self.set_many_nowait(items)

    def set_many_nowait(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        for key, vec in items:
            self.set_raw(key, encode_vector(vec))

    async def close(self) -> None:
        with self._lock:
            self._data.clear()


class CircuitBreaker:
    """Closed → (threshold consecutive failures) → open → (cooldown) → half-open → one probe.

    While open, callers skip the protected resource entirely, so a dead Redis costs nothing per
    request. In half-open state exactly one caller is let through; its outcome closes or reopens
    the breaker. Single event loop: no locking needed, `allow` and `record` never await.
    """

    def __init__(self, threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        """True while callers are being turned away (open, or half-open with a probe in flight)."""
        return self._open_until is not None

    def allow(self) -> bool:
        if self._open_until is None:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._open_until = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self.threshold:
            self._open_until = self._clock() + self.cooldown_s
        self._probing = False


def _error_reason(exc: BaseException) -> str:
    if isinstance(exc, (RedisTimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, (RedisConnectionError, ConnectionError, OSError)):
        return "connection"
    return "other"


class RedisPyClient:
    """The same three commands through redis-py's asyncio client (for `rediss://`, `unix://`)."""

    def __init__(self, url: str, *, connect_timeout_s: float, timeout_s: float, max_connections: int) -> None:
        # redis-py applies its timeouts per socket operation; the outer deadline bounds the whole
        # call (a connect plus a round trip), whatever it does inside
        self._deadline = connect_timeout_s + timeout_s
        self._client = aredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
            max_connections=max_connections,
            health_check_interval=0,
        )
        self._background: set[asyncio.Future] = set()

    async def get(self, key: str) -> bytes | None:
        async with deadline(self._deadline):
            return await self._client.get(key)

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        async with deadline(self._deadline):
            return await self._client.mget(list(keys))

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value, ex=ttl_s)
        async with deadline(self._deadline):
            await pipe.execute()

    def set_many_nowait(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> asyncio.Future:
        """`set_many` in a background task (redis-py has no way to queue without awaiting).

        Unlike the built-in client's, this write is not ordered before later reads: it may go
        out on another pooled connection after them (a cache miss more, nothing worse).
        """
        task = asyncio.ensure_future(self.set_many(items, ttl_s))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        with contextlib.suppress(RedisError, OSError):  # best effort on shutdown
            await self._client.aclose()


CLUSTER_SCHEME = "redis+cluster"


class ClusterRedis(RedisPyClient):
    """The cache's commands on a Redis Cluster (`redis+cluster://[user:password@]host:port`, any
    one node): redis-py's `RedisCluster` (slot map discovery, `MOVED` / `ASK` redirects).

    A cluster refuses a multi-key command whose keys hash to different slots (`CROSSSLOT`), which
    different users' cache keys do, so the built-in one-connection client cannot serve it (its
    MGET goes to one node). Here the batch read is `mget_nonatomic` (the keys grouped by hash
    slot, one MGET per slot, pipelined per node, the values back in key order) and the writes
    are the base class's non-transactional pipeline of `SET EX`, routed per key by the cluster
    client. Putting every key under one `{hash tag}` would make a plain MGET legal again but
    send all traffic to one node.
    """

    def __init__(self, url: str, *, connect_timeout_s: float, timeout_s: float, max_connections: int) -> None:
        parts = urlsplit(url)
        if parts.scheme != CLUSTER_SCHEME:
            raise ValueError(f"ClusterRedis needs a {CLUSTER_SCHEME}://host:port URL, got {parts.scheme}://")
        if (parts.path or "/").strip("/") not in ("", "0"):
            raise ValueError(f"{url}: a Redis Cluster has only database 0")
        self._deadline = connect_timeout_s + timeout_s
        self._client = RedisCluster.from_url(  # type: ignore[assignment]
            "redis://" + parts.netloc, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s,
            max_connections=max_connections,
        )
        self._background = set()

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        async with deadline(self._deadline):
            return list(await self._client.mget_nonatomic(list(keys)))  # type: ignore[attr-defined]


class RedisClient(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None: ...

    def set_many_nowait(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> asyncio.Future: ...

    async def close(self) -> None: ...


class RedisCache:
    """Redis-backed cache: one GET / MGET per request or batch, SETs pipelined, all bounded."""

    backend = "redis"

    def __init__(
        self,
        client: RedisClient,
        *,
        ttl_s: int,
        breaker: CircuitBreaker,
        metrics: ServiceMetrics,
    ) -> None:
        self._client = client
        self._ttl = ttl_s
        self.breaker = breaker
        self._metrics = metrics
        self._hits = metrics.cache_hits.labels(self.backend)
        self._misses = metrics.cache_misses.labels(self.backend)
        self._bypassed = metrics.cache_bypassed.labels(self.backend)
        self._malformed = metrics.cache_errors.labels(self.backend, "malformed")
        self._closed = False

    def _allow(self) -> bool:
        if self.breaker.allow():
            return True
        self._bypassed.inc()
        return False

    def _succeeded(self, op: str) -> None:
        was_open = self.breaker.is_open
        self.breaker.record_success()
        # the gauge changes only when the breaker closes (`_failed` sets it on every failure):
        # a success while closed — every command of a healthy Redis — leaves it alone
        if was_open:
            log.info("redis circuit breaker closed", extra={"fields": {"op": op}})
            self._metrics.breaker_open.set(0)

    def _failed(self, op: str, exc: BaseException) -> None:
        reason = _error_reason(exc)
        self._metrics.cache_errors.labels(self.backend, reason).inc()
        was_open = self.breaker.is_open
        self.breaker.record_failure()
        if self.breaker.is_open and not was_open:
            log.warning("redis circuit breaker opened", extra={"fields": {"op": op, "reason": reason}})
        self._metrics.breaker_open.set(1 if self.breaker.is_open else 0)

    async def _call(self, op: str, fn: Callable[[], object]) -> tuple[bool, object]:
        """Run one Redis operation through the breaker with a hard deadline: (ok, result)."""
        if not self._allow():
            return False, None
        try:
            result = await fn()  # type: ignore[misc]  # each client enforces its own deadline
        except (RedisError, RedisClusterException, RedisReplyError, OSError, asyncio.TimeoutError) as exc:
            self._failed(op, exc)
            return False, None
        except asyncio.CancelledError:
            # The request went away mid-call; release a half-open probe slot without a verdict.
            if self.breaker.is_open:
                self.breaker.record_failure()
            raise
        self._succeeded(op)
        return True, result

    async def get_many(self, keys: Sequence[str], dim: int) -> list[np.ndarray | None]:
        if len(keys) == 1:
            ok, raw = await self._call("get", lambda: self._client.get(keys[0]))
            raws = [raw] if ok else None
        else:
            ok, raw = await self._call("mget", lambda: self._client.mget(list(keys)))
            raws = raw if ok and isinstance(raw, list) and len(raw) == len(keys) else None
        if raws is None:
            self._misses.inc(len(keys))
            return [None] * len(keys)
        out: list[np.ndarray | None] = []
        for raw_value in raws:
            vec = None if raw_value is None else decode_vector(raw_value, dim)
            if vec is None:
                if raw_value is not None:
                    self._malformed.inc()
                self._misses.inc()
            else:
                self._hits.inc()
            out.append(vec)
        return out

    async def set_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        if not items:
            return
        payload = [(key, encode_vector(vec)) for key, vec in items]
        await self._call("set", lambda: self._client.set_many(payload, self._ttl))

    def set_many_nowait(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """Queue the SETs through the breaker; their outcome is accounted when it arrives."""
        if not items or self._closed or not self._allow():
            return
        payload = [(key, encode_vector(vec)) for key, vec in items]
        self._client.set_many_nowait(payload, self._ttl).add_done_callback(self._set_done)

    def _set_done(self, outcome: asyncio.Future) -> None:
        if self._closed:  # shutting down: failures of the last writes are not Redis's health
            if not outcome.cancelled():
                outcome.exception()
            return
        if outcome.cancelled():
            if self.breaker.is_open:  # release a half-open probe slot without a verdict
                self.breaker.record_failure()
            return
        exc = outcome.exception()
        if exc is None:
            self._succeeded("set")
            return
        if not isinstance(exc, (RedisError, RedisReplyError, OSError, asyncio.TimeoutError)):
            log.error("unexpected error from a background redis write", exc_info=exc)
        self._failed("set", exc)

    async def close(self) -> None:
        self._closed = True
        await self._client.close()


def make_redis_client(url: str, settings: Settings) -> RedisClient:
    """The built-in client for `redis://` (unless SERVICE_REDIS_CLIENT=redis-py), else redis-py."""
    kind = settings.redis_client
    if urlsplit(url).scheme == CLUSTER_SCHEME:  # a cluster: slot-aware reads (ClusterRedis above)
        return ClusterRedis(url, connect_timeout_s=settings.redis_connect_timeout_s, timeout_s=settings.redis_timeout_s,
                            max_connections=settings.redis_max_connections)
    if kind == "builtin" or (kind == "auto" and urlsplit(url).scheme == "redis"):
        return FastRedis(url, connect_timeout_s=settings.redis_connect_timeout_s, timeout_s=settings.redis_timeout_s)
    return RedisPyClient(
        url,
        connect_timeout_s=settings.redis_connect_timeout_s,
        timeout_s=settings.redis_timeout_s,
        max_connections=settings.redis_max_connections,
    )


def make_cache(settings: Settings, metrics: ServiceMetrics) -> VectorCache:
    """Redis if `settings.redis_url` is set, else the in-process LRU."""
    if settings.redis_url:
        return RedisCache(
            make_redis_client(settings.redis_url, settings),
            ttl_s=settings.cache_ttl_s,
            breaker=CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s),
            metrics=metrics,
        )
    return LocalCache(settings.cache_max_entries, settings.cache_ttl_s, metrics)
