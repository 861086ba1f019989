"""A minimal asyncio Redis client for the cache's three commands (GET, MGET, SET EX).

Why not redis-py on the request path: its asyncio client spends ~55 µs of CPU per command
(connection pool, retry and event machinery), measured against ~15 µs for this client; a cache
miss issues two commands, and the whole miss budget is a few hundred µs. redis-py stays the
fallback for what this client does not speak (`rediss://`, `unix://`; see `make_cache`).

Design: one TCP connection per process, shared by all requests and pipelined: a request appends
its reply future(s) to a FIFO and writes its command(s) in the same synchronous step, so replies
(which Redis sends in order) are matched to futures in order. There are no retries. A request
whose reply does not arrive within the deadline closes the connection — after a timeout the
reply order can no longer be trusted — which fails every other in-flight request on it; the next
request reconnects (within the connect timeout). RESP2 only; `AUTH` and `SELECT` are sent on
connect when the URL has a password or a database number.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

try:  # Python >= 3.11
    from asyncio import timeout as deadline
except ImportError:  # pragma: no cover - Python 3.10 (async-timeout comes with redis-py there)
    from async_timeout import timeout as deadline  # type: ignore[no-redef]

__all__ = ["FastRedis", "RedisConnectionLost", "RedisReplyError", "deadline", "encode_command"]


class RedisReplyError(Exception):
    """Redis answered with an error reply (`-ERR ...`)."""


class RedisConnectionLost(ConnectionError):
    """The connection closed or was reset while a reply was pending."""


class _Incomplete(Exception):
    pass


def _parse(buf: bytearray, pos: int) -> tuple[object, int]:
    """One RESP2 value from `buf[pos:]`: (value, next position) or _Incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 0x24:  # $ bulk string
        n = int(buf[pos + 1 : end])
        if n < 0:
            return None, end + 2
        stop = end + 2 + n
        if len(buf) < stop + 2:
            raise _Incomplete
        return bytes(buf[end + 2 : stop]), stop + 2
    if kind == 0x2B:  # + simple string
        return bytes(buf[pos + 1 : end]), end + 2
    if kind == 0x3A:  # : integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 0x2D:  # - error
        return RedisReplyError(bytes(buf[pos + 1 : end]).decode("utf-8", "replace")), end + 2
    if kind == 0x2A:  # * array
        n = int(buf[pos + 1 : end])
        if n < 0:
            return None, end + 2
        items = []
        p = end + 2
        for _ in range(n):
            item, p = _parse(buf, p)
            items.append(item)
        return items, p
    raise ValueError(f"unexpected RESP type byte {kind!r}")


def encode_command(*args: bytes | str | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future] = deque()
        self.buf = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf.extend(data)
        pos = 0
        try:
            while self.pending and pos < len(buf):
                try:
                    value, pos = _parse(buf, pos)
                except _Incomplete:
                    break
                fut = self.pending.popleft()
                if not fut.done():
                    if isinstance(value, RedisReplyError):
                        fut.set_exception(value)
                    else:
                        fut.set_result(value)
        except (ValueError, IndexError) as e:  # garbage on the wire: this connection is done
            self.abort(RedisConnectionLost(f"protocol error: {e}"))
            return
        if pos:
            del buf[:pos]
        if not self.pending and buf:  # a reply nobody asked for: out of sync
            self.abort(RedisConnectionLost("unexpected data from the server"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_all(RedisConnectionLost(f"connection lost: {exc}" if exc else "connection closed"))

    def _fail_all(self, exc: Exception) -> None:
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def abort(self, exc: Exception) -> None:
        self.closed = True
        self._fail_all(exc)
        if self.transport is not None:
            self.transport.abort()


class FastRedis:
    """`redis://[user:password@]host[:port][/db]` client (see module docstring)."""

    def __init__(self, url: str, *, connect_timeout_s: float, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"FastRedis speaks redis:// only, got {parts.scheme}://")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        path = (parts.path or "/").strip("/")
        self.db = int(path) if path else 0
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future | None = None

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.closed:
            return proto
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        async with deadline(self.connect_timeout_s):
            _, proto = await loop.create_connection(_Protocol, self.host, self.port)
            if self.password is not None:
                auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                await self._send(proto, [encode_command(*auth)])
            if self.db:
                await self._send(proto, [encode_command("SELECT", self.db)])
        self._proto = proto
        return proto

    @staticmethod
    async def _send(proto: _Protocol, commands: Sequence[bytes]) -> list[object]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        proto.pending.extend(futures)
        if proto.transport is None:  # pragma: no cover - connection_made always ran
            raise RedisConnectionLost("not connected")
        proto.transport.write(b"".join(commands) if len(commands) > 1 else commands[0])
        return list(await asyncio.gather(*futures)) if len(futures) > 1 else [await futures[0]]

    async def execute(self, commands: Sequence[bytes]) -> list[object]:
        """Send pre-encoded commands in one write; their replies, in order.

        Raises TimeoutError (after closing the connection), RedisConnectionLost, OSError or
        RedisReplyError; callers treat all of them as a cache failure.
        """
        proto = await self._connection()
        try:
            async with deadline(self.timeout_s):
                return await self._send(proto, commands)
        except asyncio.TimeoutError:
            proto.abort(RedisConnectionLost("an earlier command timed out"))
            raise

    async def get(self, key: str) -> bytes | None:
        (value,) = await self.execute([encode_command("GET", key)])
        return value  # type: ignore[return-value]

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        (values,) = await self.execute([encode_command("MGET", *keys)])
        return values  # type: ignore[return-value]

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
        await self.execute([encode_command("SET", key, value, "EX", ttl_s) for key, value in items])

    async def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.closed = True
            self._proto.transport.close()
        self._proto = None
