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
    RedisPyClient,
    cache_key,
    decode_vector,
    encode_vector,
    features_digest,
    history_digest,
)
from service.metrics import ServiceMetrics
from service.redis_client import (
    FastRedis,
    RedisReplyError,
    _Incomplete,
    _parse,
    encode_command,
    encode_get,
    encode_set,
)
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


def test_history_digest_separates_histories_and_the_vectors_they_fold_in_with() -> None:
    digests = [
        history_digest(None), history_digest([]), history_digest([3, 5]), history_digest([5, 3]),
        history_digest([3, 5], "v1"), history_digest([3, 5], "v2"),
    ]
    assert digests[0] is None and len(set(digests[1:])) == 5
    assert history_digest([3, 5], "v1") == history_digest(np.array([3, 5]), "v1")


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


CLIENTS = ["builtin", "redis-py"]


def make_redis_cache(
    url: str, m: ServiceMetrics, *, cooldown: float = 0.2, timeout: float = 0.02, client: str = "builtin"
) -> RedisCache:
    if client == "builtin":
        c = FastRedis(url, connect_timeout_s=0.05, timeout_s=timeout)
    else:
        c = RedisPyClient(url, connect_timeout_s=0.05, timeout_s=timeout, max_connections=8)
    return RedisCache(c, ttl_s=60, breaker=CircuitBreaker(3, cooldown), metrics=m)


@pytest.mark.parametrize("client", CLIENTS)
def test_redis_roundtrip_ttl_and_malformed_values(client: str, redis_server: RedisServer) -> None:
    m = ServiceMetrics()
    v = unit_rows(2, 16)
    raw = redis_server.client()

    async def run() -> None:
        cache = make_redis_cache(redis_server.url, m, client=client)
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


@pytest.mark.parametrize("client", CLIENTS)
def test_redis_down_opens_breaker_then_recovers_without_restart(client: str, redis_server: RedisServer) -> None:
    m = ServiceMetrics()
    v = unit_rows(1, 8)[0]

    async def run() -> None:
        cache = make_redis_cache(redis_server.url, m, cooldown=0.3, client=client)
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


@pytest.mark.parametrize("client", CLIENTS)
def test_hung_redis_costs_at_most_the_timeout_budget(client: str, black_hole: BlackHole) -> None:
    """A socket that accepts but never answers: each call ends within connect+read timeout."""
    m = ServiceMetrics()

    async def run() -> list[float]:
        cache = make_redis_cache(black_hole.url, m, cooldown=60, timeout=0.02, client=client)
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


@pytest.mark.parametrize("client", CLIENTS)
def test_unreachable_redis_is_a_miss(client: str) -> None:
    url = "redis://127.0.0.1:1/0"
    m = ServiceMetrics()

    async def run() -> None:
        cache = make_redis_cache(url, m, client=client)
        assert await cache.get_many(["a", "b"], 4) == [None, None]
        await cache.set_many([("a", unit_rows(1, 4)[0])])  # no exception either
        await cache.close()

    asyncio.run(run())
    assert metric(m, "service_cache_misses_total", backend="redis") == 2


# ---- the built-in client ------------------------------------------------------------------------


def test_resp_parser() -> None:
    buf = bytearray(b"$3\r\nabc\r\n$-1\r\n+OK\r\n:42\r\n-ERR bad\r\n*2\r\n$1\r\nx\r\n$-1\r\n")
    values = []
    pos = 0
    while pos < len(buf):
        v, pos = _parse(buf, pos)
        values.append(v)
    assert values[:4] == [b"abc", None, b"OK", 42]
    assert isinstance(values[4], RedisReplyError) and "bad" in str(values[4])
    assert values[5] == [b"x", None]
    for partial in (b"$3\r\nab", b"$3", b"*2\r\n$1\r\nx\r\n", b"$10\r\n" + b"\x00" * 10 + b"\r"):
        with pytest.raises(_Incomplete):
            _parse(bytearray(partial), 0)
    assert encode_command("SET", "k", b"\x00\r\n", "EX", 5) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n\x00\r\n\r\n$2\r\nEX\r\n$1\r\n5\r\n"
    )
    for key in ("k", "tt:uv1:m:0123:uü 😀", ""):  # the hot-path encoders are the generic one
        assert encode_get(key) == encode_command("GET", key)
        for value, ttl in ((b"", 1), (b"\x00\r\n$*" * 50, 3600)):
            assert encode_set(key, value, ttl) == encode_command("SET", key, value, "EX", ttl)


def test_builtin_client_pipelines_concurrent_requests(redis_server: RedisServer) -> None:
    """Many coroutines on one connection get their own replies, binary values intact."""
    values = {f"k{i}": bytes([i % 256]) * (i * 37 % 5000) + b"\r\n$" for i in range(300)}

    async def run() -> None:
        c = FastRedis(redis_server.url, connect_timeout_s=1, timeout_s=1)
        await c.set_many(list(values.items()), 60)
        got = await asyncio.gather(*(c.get(k) for k in values))
        assert got == list(values.values())
        assert await c.mget(["k1", "nope", "k2"]) == [values["k1"], None, values["k2"]]
        with pytest.raises(RedisReplyError):
            await c.execute([encode_command("NOSUCHCOMMAND")])
        assert await c.get("k3") == values["k3"]  # the connection survived the error reply
        await c.close()

    asyncio.run(run())


def test_builtin_client_auth_and_database(tmp_path) -> None:  # noqa: ANN001
    server = RedisServer(tmp_path, extra=["--requirepass", "p@ss:w/rd"])
    server.start()
    try:
        url = f"redis://:p%40ss%3Aw%2Frd@127.0.0.1:{server.port}/3"

        async def run() -> None:
            c = FastRedis(url, connect_timeout_s=1, timeout_s=1)
            await c.set_many([("k", b"v")], 60)
            assert await c.get("k") == b"v"
            await c.close()
            wrong = FastRedis(f"redis://:nope@127.0.0.1:{server.port}/0", connect_timeout_s=1, timeout_s=1)
            with pytest.raises(RedisReplyError):
                await wrong.get("k")

        asyncio.run(run())
        raw = server.client(password="p@ss:w/rd", db=3)
        assert raw.get("k") == b"v"
    finally:
        server.stop()


def test_builtin_client_writes_one_batch_per_loop_iteration(redis_server: RedisServer) -> None:
    """Commands issued in the same event-loop iteration leave in one write (one system call)."""

    async def run() -> None:
        c = FastRedis(redis_server.url, connect_timeout_s=1, timeout_s=1)
        await c.set_many([("k", b"v")], 60)  # connects
        transport = c._proto.transport
        writes: list[bytes] = []
        real_write = transport.write

        def counting_write(data: bytes) -> None:
            writes.append(bytes(data))
            real_write(data)

        transport.write = counting_write
        got = await asyncio.gather(*(c.get("k") for _ in range(50)), c.mget(["k", "nope"]))
        assert got == [b"v"] * 50 + [[b"v", None]]
        assert len(writes) == 1 and writes[0] == encode_get("k") * 50 + encode_command("MGET", "k", "nope")
        await c.close()

    asyncio.run(run())


def test_set_many_nowait_is_ordered_before_later_reads_and_accounted(redis_server: RedisServer) -> None:
    """The request path's write: returns at once, a later read on the same process sees it, and
    its outcome reaches the metrics without anyone awaiting it; close() still sends it."""
    m = ServiceMetrics()
    v = unit_rows(3, 8)
    raw = redis_server.client()

    async def run() -> None:
        cache = make_redis_cache(redis_server.url, m, timeout=1.0)
        await cache.set_many([("k0", v[0])])  # connects
        cache.set_many_nowait([("k1", v[1])])  # not a coroutine: nothing to await
        got = await cache.get_many(["k1"], 8)  # queued after the SET on the same connection
        np.testing.assert_array_equal(got[0], v[1])
        cache.set_many_nowait([("k2", v[2]), ("k0", v[2])])  # pipelined
        await cache.close()  # flushes what is queued

    asyncio.run(run())
    assert raw.get("k2") == raw.get("k0") == v[2].astype("<f4").tobytes()
    assert 0 < raw.ttl("k2") <= 60
    assert metric(m, "service_cache_hits_total", backend="redis") == 1
    assert sum(metric(m, "service_cache_errors_total", backend="redis", reason=r)
               for r in ("timeout", "connection", "other")) == 0


@pytest.mark.parametrize("client", CLIENTS)
def test_set_many_nowait_to_a_hung_redis_counts_timeouts_and_opens_the_breaker(
    client: str, black_hole: BlackHole
) -> None:
    m = ServiceMetrics()
    v = unit_rows(1, 8)[0]

    async def run() -> None:
        cache = make_redis_cache(black_hole.url, m, cooldown=60, timeout=0.02, client=client)
        for i in range(3):
            t0 = time.perf_counter()
            cache.set_many_nowait([(f"k{i}", v)])  # a plain call: it cannot wait for Redis
            while metric(m, "service_cache_errors_total", backend="redis", reason="timeout") < i + 1:
                assert time.perf_counter() - t0 < 5, "the write's deadline never fired"
                await asyncio.sleep(0.005)
        assert cache.breaker.is_open
        cache.set_many_nowait([("k", v)])  # skipped: the breaker is open
        await cache.close()

    asyncio.run(run())
    assert metric(m, "service_cache_errors_total", backend="redis", reason="timeout") == 3
    assert metric(m, "service_cache_bypassed_total", backend="redis") == 1
    assert metric(m, "service_cache_breaker_open") == 1


def test_builtin_client_deadline_fails_every_pending_command(black_hole: BlackHole) -> None:
    """One watchdog per connection enforces each command's deadline, awaited or not."""

    async def run() -> list[BaseException | object]:
        c = FastRedis(black_hole.url, connect_timeout_s=1, timeout_s=0.05)
        await c._connection()
        t0 = time.perf_counter()
        background = c.set_many_nowait([("a", b"1")], 60)
        results = await asyncio.gather(*(c.get(f"k{i}") for i in range(5)), background, return_exceptions=True)
        elapsed = time.perf_counter() - t0
        assert 0.05 <= elapsed < 1.0, elapsed  # not before the deadline, and not much after
        await c.close()
        return results

    results = asyncio.run(run())
    assert all(isinstance(r, asyncio.TimeoutError) for r in results), results


def test_builtin_client_deadline_counts_from_the_write(redis_server: RedisServer) -> None:
    """Time a command spends queued behind a busy event loop is not Redis being slow."""

    async def run() -> None:
        c = FastRedis(redis_server.url, connect_timeout_s=1, timeout_s=0.02)
        await c.set_many([("k", b"v")], 60)  # connects
        outcome = c.set_many_nowait([("k2", b"w")], 60)
        time.sleep(0.06)  # blocks the loop: the write leaves only after this callback, 60 ms on
        assert await outcome == b"OK"
        assert await c.get("k2") == b"w"
        await c.close()

    asyncio.run(run())
