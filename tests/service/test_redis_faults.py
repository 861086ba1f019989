"""Redis as an accelerator, through the API: faults never become 5xx or slow requests."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.service.conftest import FEATURES, BlackHole, RedisServer, serve, wait_for


def metric(client, name: str, **labels: str) -> float:  # noqa: ANN001
    value = client.app.state.service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_redis_cache_through_the_api(index_root: Path, redis_server: RedisServer) -> None:
    """The response does not wait for the SET (written in the background), but the next request
    on the same process sees it: commands share one ordered connection."""
    body = {"user_id": "u2", "features": FEATURES, "k": 25}
    with serve(index_root, redis_url=redis_server.url, cache_ttl_s=120) as c:
        first = c.post("/retrieve", json=body).json()
        second = c.post("/retrieve", json=body).json()
        assert (first["cached"], second["cached"]) == (False, True)
        assert first["items"] == second["items"]
        (key,) = redis_server.client().keys("*")  # the hit proves the SET was processed
        assert first["model_version"] in key.decode()
        assert key.decode().endswith(":uu2")
        assert len(redis_server.client().get(key)) == 16 * 4  # raw float32
        assert 0 < redis_server.client().ttl(key) <= 120
        batch = c.post("/retrieve/batch", json={"requests": [body, {**body, "user_id": "u3"}]}).json()
        assert [r["cached"] for r in batch["results"]] == [True, False]
        assert batch["results"][0]["items"] == first["items"]
        wait_for(lambda: len(redis_server.client().keys("*")) == 2, timeout=5, what="the batch's SET")
        assert metric(c, "service_cache_hits_total", backend="redis") == 2


def test_garbage_and_wrong_length_values_are_misses(index_root: Path, redis_server: RedisServer) -> None:
    body = {"user_id": "u4", "features": FEATURES, "k": 10}
    raw = redis_server.client()
    with serve(index_root, redis_url=redis_server.url) as c:
        truth = c.post("/retrieve", json=body).json()
        wait_for(lambda: len(raw.keys("*")) == 1, timeout=5, what="the background SET")
        (key,) = raw.keys("*")
        good = raw.get(key)
        bad_values = [
            b"not a vector",
            good[:-4],  # one float short
            good + good,  # twice the length
            np.full(16, np.nan, "<f4").tobytes(),  # right length, NaN
            (np.frombuffer(good, "<f4") * 2).astype("<f4").tobytes(),  # right length, not unit
        ]
        for value in bad_values:
            raw.set(key, value)
            r = c.post("/retrieve", json=body)
            assert r.status_code == 200
            assert r.json()["cached"] is False
            assert r.json()["items"] == truth["items"]
            # the computed vector replaces the bad one (written after the response)
            wait_for(lambda: raw.get(key) == good, timeout=5, what="the corrected value")
        assert c.post("/retrieve", json=body).json()["cached"] is True
        assert metric(c, "service_cache_errors_total", backend="redis", reason="malformed") == len(bad_values)


@pytest.mark.parametrize("client", ["builtin", "redis-py"])
def test_redis_stopped_mid_traffic_and_restarted(index_root: Path, redis_server: RedisServer, client: str) -> None:
    """Two threads send requests non-stop while Redis is killed and, later, started again.

    Requests are classified by when they were sent and answered, not by when their answer was
    logged: a request sent before the kill may legitimately be answered from the cache after it
    (on a loaded machine, tens of milliseconds later).
    """
    bodies = [{"user_id": f"u{i}", "features": FEATURES, "k": 10} for i in range(5)]
    log: list[tuple[float, float, int, bool | None]] = []  # (sent, answered, status, cached)
    wrong: list[str] = []  # users whose answer differed from the one before the fault
    stop = threading.Event()
    with serve(index_root, redis_url=redis_server.url, redis_client=client, breaker_cooldown_s=0.2,
               raise_server_exceptions=False) as c:
        truth = {b["user_id"]: c.post("/retrieve", json=b).json()["items"] for b in bodies}

        def traffic(offset: int) -> None:
            i = offset
            while not stop.is_set():
                b = bodies[i % len(bodies)]
                sent = time.monotonic()
                r = c.post("/retrieve", json=b)
                ok = r.status_code == 200
                log.append((sent, time.monotonic(), r.status_code, r.json()["cached"] if ok else None))
                if ok and r.json()["items"] != truth[b["user_id"]]:
                    wrong.append(b["user_id"])
                i += 1

        threads = [threading.Thread(target=traffic, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            redis_server.stop()  # returns once the process has exited
            t_down = time.monotonic()
            time.sleep(0.6)
            t_restart = time.monotonic()
            redis_server.start()  # same port, empty: the service reconnects by itself
            t_up = time.monotonic()
            wait_for(lambda: any(sent > t_up and cached for sent, _, _, cached in log[-20:]), timeout=10,
                     what="the cache to work again after the restart")
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert metric(c, "service_cache_breaker_open") == 0
        assert metric(c, "service_cache_errors_total", backend="redis", reason="connection") >= 1
    assert {status for _, _, status, _ in log} == {200}
    assert wrong == []
    down = [cached for sent, answered, _, cached in log if t_down < sent and answered < t_restart]
    assert down and not any(down)  # served, uncached, while Redis was gone
    assert any(cached for _, answered, _, cached in log if answered < t_down)


@pytest.mark.parametrize("client", ["builtin", "redis-py"])
def test_hung_redis_keeps_requests_within_the_timeout_budget(index_root: Path, black_hole: BlackHole, client: str) -> None:
    body = {"user_id": "u1", "features": FEATURES}
    with serve(index_root, redis_url=black_hole.url, redis_client=client, redis_timeout_s=0.02,
               redis_connect_timeout_s=0.05, breaker_cooldown_s=0.3) as c:
        latencies = []
        for _ in range(40):
            t0 = time.perf_counter()
            r = c.post("/retrieve", json=body)
            latencies.append(time.perf_counter() - t0)
            assert r.status_code == 200 and r.json()["cached"] is False
            time.sleep(0.01)
        # Each Redis call is cut at connect + read timeout (70 ms); a request makes at most a
        # read and a write, and an open breaker skips Redis entirely. redis-py's default would
        # have hung each request for seconds.
        assert max(latencies) < 0.4, max(latencies)
        assert float(np.median(latencies)) < 0.05
        assert metric(c, "service_cache_errors_total", backend="redis", reason="timeout") >= 3
        assert metric(c, "service_cache_bypassed_total", backend="redis") > 0


def _peer_closed(conn) -> bool:  # noqa: ANN001 - socket.socket
    """Whether the client side of an accepted connection has been closed (EOF or reset)."""
    conn.setblocking(False)
    try:
        while conn.recv(4096):  # what the client sent (its AUTH) comes first
            pass
    except BlockingIOError:
        return False
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize("failure", ["wrong password", "bad database", "connect deadline"])
def test_failed_connection_setup_closes_the_connection(tmp_path: Path, black_hole: BlackHole, failure: str) -> None:
    """Every failed connect (one per breaker probe) must close its socket, not leak it."""
    import asyncio

    from service.redis_client import FastRedis, RedisReplyError

    attempts = 25
    server = None
    if failure == "connect deadline":
        # the AUTH a password makes the client send is never answered: the deadline fires
        url, expected = f"redis://:s3cret@127.0.0.1:{black_hole.port}/0", TimeoutError
    else:
        server = RedisServer(tmp_path, extra=["--requirepass", "s3cret", "--databases", "16"])
        server.start()
        host = f"127.0.0.1:{server.port}"
        url = f"redis://:wrong@{host}/0" if failure == "wrong password" else f"redis://:s3cret@{host}/99"
        expected = RedisReplyError
    try:
        async def probe() -> None:
            # a reply timeout far beyond the connect deadline: its watchdog must not be what
            # closes the connection
            r = FastRedis(url, connect_timeout_s=0.05, timeout_s=30.0)
            for _ in range(attempts):
                with pytest.raises(expected):
                    await r.get("k")
            await asyncio.sleep(0.01)  # let the loop run the aborted transports' callbacks
            # checked while the loop (which would keep a leaked transport alive) still runs
            if server is not None:
                clients = server.client(password="s3cret").info("clients")["connected_clients"]
                assert clients <= 2, f"{clients} connections open after {attempts} failed connects"
            else:
                wait_for(lambda: len(black_hole.conns) >= attempts, what="all connects accepted")
                open_ = [c for c in black_hole.conns if not _peer_closed(c)]
                assert not open_, f"{len(open_)} of {len(black_hole.conns)} connections left open"
            await r.close()

        asyncio.run(probe())
    finally:
        if server is not None:
            server.stop()
