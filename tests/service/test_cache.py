"""The cache on its own: keys, value decoding, LRU+TTL, the circuit breaker, real Redis faults."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.cache import (
    CircuitBreaker,
    LocalCache,
    RedisCache,
    cache_key,
    decode_vector,
    encode_vector,
    features_digest,
)
from service.metrics import ServiceMetrics
from tests.service.conftest import BlackHole, RedisServer
from tests.service.helpers import unit_rows


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def metric(m: ServiceMetrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ---- keys and values ---------------------------------------------------------------------------


def test_features_digest_is_canonical() -> None:
    a = features_digest({"age": 49.0, "gender": "M", "tags": ["a", "b"]})
    assert a == features_digest({"tags": ["a", "b"], "gender": "M", "age": 49.0})  # key order
    assert a == features_digest({"tags": ["a", "b"], "gender": "M", "age": 49.0, "zip": None})  # null = absent
    assert a != features_digest({"age": 49.5, "gender": "M", "tags": ["a", "b"]})
    assert a != features_digest({"age": 49.0, "gender": "M", "tags": ["b", "a"]})


def test_cache_key_separates_model_versions_and_ids() -> None:
    h = features_digest({})
    keys = {
        cache_key("tt", "m1", None, h),
        cache_key("tt", "m1", "", h),
        cache_key("tt", "m1", "42", h),
        cache_key("tt", "m2", "42", h),
        cache_key("tt", "m1", "42", features_digest({"age": 1.0})),
    }
    assert len(keys) == 5
    assert "m2" in cache_key("tt", "m2", "42", h)


def test_decode_vector_rejects_anything_but_a_unit_float32_vector() -> None:
    v = unit_rows(1, 16)[0]
    raw = encode_vector(v)
    assert len(raw) == 16 * 4
    np.testing.assert_array_equal(decode_vector(raw, 16), v)
    assert decode_vector(raw, 8) is None  # wrong length
    assert decode_vector(raw[:-1], 16) is None
    assert decode_vector(b"garbage!" * 8, 16) is None
    assert decode_vector(encode_vector(np.full(16, np.nan, np.float32)), 16) is None
    assert decode_vector(encode_vector(v * 3), 16) is None  # not unit norm
    assert decode_vector("text", 16) is None


# ---- in-process LRU --------------------------------------------------------------------------


def test_local_cache_lru_and_ttl() -> None:
    clock = FakeClock()
    m = ServiceMetrics()
    cache = LocalCache(max_entries=2, ttl_s=10, metrics=m, clock=clock)
    v = unit_rows(3, 4)

    async def run() -> None:
        await cache.set_many([("a", v[0]), ("b", v[1])])
        got = await cache.get_many(["a"], 4)  # touches a: b is now least recent
        np.testing.assert_array_equal(got[0], v[0])
        await cache.set_many([("c", v[2])])
        assert (await cache.get_many(["b"], 4))[0] is None  # evicted
        assert (await cache.get_many(["c"], 4))[0] is not None
        clock.t += 11
        assert (await cache.get_many(["a", "c"], 4)) == [None, None]  # expired
        cache.set_raw("bad", b"xx")
        assert (await cache.get_many(["bad"], 4)) == [None]

    asyncio.run(run())
    assert metric(m, "service_cache_hits_total", backend="local") == 2
    assert metric(m, "service_cache_misses_total", backend="local") == 4
    assert metric(m, "service_cache_errors_total", backend="local", reason="malformed") == 1


# ---- circuit breaker -------------------------------------------------------------------------


def test_circuit_breaker_opens_cools_down_and_probes_once() -> None:
    clock = FakeClock()
    b = CircuitBreaker(threshold=3, cooldown_s=5, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert not b.is_open
    b.allow()
    b.record_failure()
    assert b.is_open and not b.allow()
    clock.t += 5
    assert b.allow()  # the probe
    assert not b.allow()  # only one probe at a time
    b.record_failure()  # probe failed: open again for a full cooldown
    assert not b.allow()
    clock.t += 5
    assert b.allow()
    b.record_success()
    assert not b.is_open and b.allow() and b.allow()


def test_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(threshold=2, cooldown_s=5, clock=FakeClock())
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert not b.is_open


# ---- real Redis --------------------------------------------------------------------------------


def make_redis_cache(url: str, m: ServiceMetrics, *, cooldown: float = 0.2, timeout: float = 0.02) -> RedisCache:
    return RedisCache(
        url,
        ttl_s=60,
        connect_timeout_s=0.05,
        timeout_s=timeout,
        max_connections=8,
        breaker=CircuitBreaker(3, cooldown),
        metrics=m,
    )


def test_redis_roundtrip_ttl_and_malformed_values(redis_server: RedisServer) -> None:
    m = ServiceMetrics()
    v = unit_rows(2, 16)
    raw = redis_server.client()

    async def run() -> None:
        cache = make_redis_cache(redis_server.url, m)
        await cache.set_many([("k1", v[0])])
        await cache.set_many([("k2", v[1]), ("k3", v[0])])  # pipelined
        assert raw.get("k1") == v[0].astype("<f4").tobytes()  # raw float32 bytes
        assert 0 < raw.ttl("k1") <= 60
        got = await cache.get_many(["k1", "k2", "nope"], 16)  # one MGET
        np.testing.assert_array_equal(got[0], v[0])
        np.testing.assert_array_equal(got[1], v[1])
        assert got[2] is None
        raw.set("k1", b"garbage")
        raw.set("k2", v[1].astype("<f4").tobytes()[:-4])  # wrong length
        raw.set("k3", np.full(16, np.inf, "<f4").tobytes())  # right length, not finite
        assert await cache.get_many(["k1", "k2", "k3"], 16) == [None, None, None]
        await cache.close()

    asyncio.run(run())
    assert metric(m, "service_cache_hits_total", backend="redis") == 2
    assert metric(m, "service_cache_errors_total", backend="redis", reason="malformed") == 3


def test_redis_down_opens_breaker_then_recovers_without_restart(redis_server: RedisServer) -> None:
    m = ServiceMetrics()
    v = unit_rows(1, 8)[0]

    async def run() -> None:
        cache = make_redis_cache(redis_server.url, m, cooldown=0.3)
        await cache.set_many([("k", v)])
        assert (await cache.get_many(["k"], 8))[0] is not None
        redis_server.stop()
        t0 = time.perf_counter()
        for _ in range(20):
            assert (await cache.get_many(["k"], 8)) == [None]
        assert time.perf_counter() - t0 < 1.0  # refused connections fail fast, then skipped
        assert cache.breaker.is_open
        assert metric(m, "service_cache_bypassed_total", backend="redis") >= 17
        assert metric(m, "service_cache_breaker_open") == 1
        redis_server.start()
        await cache.set_many([("k", v)])  # may be bypassed: breaker still cooling down
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            await cache.set_many([("k", v)])
            if (await cache.get_many(["k"], 8))[0] is not None:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("cache never recovered after Redis came back")
        assert not cache.breaker.is_open
        assert metric(m, "service_cache_breaker_open") == 0
        await cache.close()

    asyncio.run(run())
    assert metric(m, "service_cache_errors_total", backend="redis", reason="connection") >= 3


def test_hung_redis_costs_at_most_the_timeout_budget(black_hole: BlackHole) -> None:
    """A socket that accepts but never answers: each call ends within connect+read timeout."""
    m = ServiceMetrics()

    async def run() -> list[float]:
        cache = make_redis_cache(black_hole.url, m, cooldown=60, timeout=0.02)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            assert (await cache.get_many(["k"], 8)) == [None]
            times.append(time.perf_counter() - t0)
        # concurrent callers while the breaker is open cost nothing
        await asyncio.gather(*(cache.get_many(["k"], 8) for _ in range(50)))
        await cache.close()
        return times

    times = asyncio.run(run())
    assert max(times[:3]) < 0.2, times  # 70 ms budget + scheduling slack on a loaded machine
    assert max(times[3:]) < 0.01, times  # breaker open: Redis not touched
    assert metric(m, "service_cache_errors_total", backend="redis", reason="timeout") == 3
    assert metric(m, "service_cache_bypassed_total", backend="redis") == 57


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0"])
def test_unreachable_redis_is_a_miss(url: str) -> None:
    m = ServiceMetrics()

    async def run() -> None:
        cache = make_redis_cache(url, m)
        assert await cache.get_many(["a", "b"], 4) == [None, None]
        await cache.set_many([("a", unit_rows(1, 4)[0])])  # no exception either
        await cache.close()

    asyncio.run(run())
    assert metric(m, "service_cache_misses_total", backend="redis") == 2
