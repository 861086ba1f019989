"""The cache's client on a Redis Cluster (service.cache.ClusterRedis), against a real
one-node cluster: a cluster refuses a cross-slot MGET even on one node, which is what the
slot-aware read has to get around."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.cache import ClusterRedis, make_redis_client
from service.redis_client import FastRedis, RedisReplyError
from service.settings import Settings
from tests.service.conftest import RedisServer, free_port

# different users' keys hash to different slots (the fixture asks the server's CLUSTER KEYSLOT)
KEYS = [f"tt:m1:user:{i}" for i in range(20)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A one-node Redis Cluster owning all 16384 slots, on a free loopback port."""
    d: Path = tmp_path_factory.mktemp("cluster")
    # the cluster bus listens on --cluster-port, by default port + 10000: a free ephemeral port above
    # 55535 would leave it out of range and redis-server refuses to start, so name a free one
    server = RedisServer(d, extra=["--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                                   "--cluster-port", str(free_port())])
    server.start()
    admin = server.client()
    try:
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                pytest.fail("one-node cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        slots = {int(admin.execute_command("CLUSTER", "KEYSLOT", k)) for k in KEYS}
        assert len(slots) > 1  # the keys really are spread over slots
        yield server.port
    finally:
        admin.close()
        server.stop()


def _settings(url: str) -> Settings:
    return Settings(index_root="/nonexistent", redis_url=url, redis_timeout_s=2.0, redis_connect_timeout_s=2.0)


def test_a_plain_mget_is_refused_by_the_cluster(cluster):
    """The negative control: the single-node client's MGET fails with CROSSSLOT."""

    async def run() -> None:
        client = FastRedis(f"redis://127.0.0.1:{cluster}", connect_timeout_s=2.0, timeout_s=2.0)
        try:
            with pytest.raises(RedisReplyError, match="CROSSSLOT"):
                await client.mget(KEYS[:5])
        finally:
            await client.close()

    asyncio.run(run())


def test_cluster_client_reads_and_writes_across_slots(cluster):
    async def run() -> None:
        client = make_redis_client(f"redis+cluster://127.0.0.1:{cluster}", _settings(f"redis+cluster://127.0.0.1:{cluster}"))
        assert isinstance(client, ClusterRedis)
        try:
            written = {k: f"v{i}".encode() for i, k in enumerate(KEYS) if i % 3}
            await client.set_many(list(written.items()), 60)
            assert await client.mget(KEYS) == [written.get(k) for k in KEYS]  # key order, None for a miss
            assert await client.get(KEYS[1]) == written[KEYS[1]] and await client.get(KEYS[0]) is None
            assert await client.set_many_nowait([(KEYS[0], b"late")], 60) is None
            assert (await client.mget([KEYS[0], KEYS[3]]))[0] == b"late"
        finally:
            await client.close()

    asyncio.run(run())


def test_cluster_url_is_checked():
    with pytest.raises(ValueError, match="only database 0"):
        ClusterRedis("redis+cluster://127.0.0.1:7000/3", connect_timeout_s=1, timeout_s=1, max_connections=2)
    with pytest.raises(ValueError, match="redis\\+cluster://host:port"):
        ClusterRedis("redis://127.0.0.1:7000", connect_timeout_s=1, timeout_s=1, max_connections=2)
