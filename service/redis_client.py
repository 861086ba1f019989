"""A minimal asyncio Redis client for the cache's three commands (GET, MGET, SET EX).

Why not redis-py on the request path: its asyncio client spends ~55 µs of CPU per command
(connection pool, retry and event machinery), measured against ~15 µs for this client; a cache
miss issues two commands, and the whole miss budget is a few hundred µs. redis-py stays the
fallback for what this client does not speak (`rediss://`, `unix://`; see `make_cache`).

Still paying (re-measured): `python -m bench.serve --items 20000 --in-process --ef-search k20
--requests 1000 --rounds 5`, with and without `--env SERVICE_REDIS_CLIENT=redis-py`, four runs
each, interleaved, on 2 cores shared with other jobs (load average 7-9, so every figure is
~3-4x a quiet machine's). CPU µs per request, server (fastest round) + redis-server, median of
the four runs: cache miss 1445 with this client, 2620 with redis-py; cache hit 1144 against
1779; `/healthz` in the same runs 549 and 610. In units of `/healthz`: miss 2.64 against 3.69,
hit 2.22 against 2.70. No run of one overlapped any run of the other.

Design: one TCP connection per process, shared by all requests and pipelined: a request appends
its reply future(s) to a FIFO and its command(s) to the write buffer in the same synchronous step,
so replies (which Redis sends in order) are matched to futures in order. The buffer is written
once per event-loop iteration (`loop.call_soon`): the commands of all requests that ran in that
iteration leave in one `send`, and Redis reads them in one `read` and answers in one `write`
(under load, several requests' GETs or SETs share each system call; alone, a command waits
for nothing but the end of the current callback). There are no retries.

Deadlines: a reply that has not arrived `timeout_s` after its command was written closes the
connection — after a timeout the reply order can no longer be trusted — and fails every pending
command on it with TimeoutError; the next request reconnects (within the connect timeout). Since
replies arrive in order, one watchdog timer per connection (armed on the oldest pending command)
enforces every command's deadline: no timer per call, which at thousands of calls per second
kept a heap of ~1000 timers whose upkeep was a visible share of a request's CPU.

`set_many_nowait` is the request path's write: the SETs are queued like any command, but nobody
awaits them; the returned future carries the outcome (to the cache's breaker and metrics).

RESP2 only; `AUTH` and `SELECT` are sent on connect when the URL has a password or a database
number.


Redis Cluster URLs (`redis+cluster://`) are served by redis-py (`service.cache.ClusterRedis`).
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
    """One pipelined connection: a FIFO of reply futures, a write buffer and a reply watchdog."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future] = deque()  # written commands first, then queued ones
        self.sent_at: deque[float] = deque()  # loop time each written, unanswered command left
        self.buf = bytearray()
        self.out: list[bytes] = []  # commands not yet written (see flush)
        self.flush_scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.closed = False
        self.loop = asyncio.get_running_loop()

    def send(self, commands: Sequence[bytes]) -> list[asyncio.Future]:
        """Queue `commands` and one reply future each; written by the next `flush`.

        A reply that has not arrived `timeout_s` after its command was written fails the future
        with TimeoutError and closes the connection (see `_check`), whether anyone awaits it or not.
        """
        loop = self.loop
        futures = [loop.create_future() for _ in commands]
        self.pending.extend(futures)
        self.out.extend(commands)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self.flush)
        return futures

    def flush(self) -> None:
        """Write everything queued since the last flush in one `transport.write`.

        The reply deadline starts here, not when a command was queued: on a busy loop the flush
        can come milliseconds later, and that wait is ours, not Redis's.
        """
        self.flush_scheduled = False
        out = self.out
        if not out:
            return
        self.out = []
        if self.closed or self.transport is None:  # their futures were failed by abort()
            return
        now = self.loop.time()
        self.sent_at.extend([now] * len(out))
        if self.watchdog is None:
            self.watchdog = self.loop.call_at(now + self.timeout_s, self._check)
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _check(self) -> None:
        """The deadline of every pending reply, with one timer per connection.

        Replies come in order, so only the oldest written command can be the first one late:
        if it is, the connection is abandoned (its reply order can no longer be trusted) and
        every pending future fails with TimeoutError; otherwise the next check is due when the
        now oldest command's deadline passes.
        """
        self.watchdog = None
        if self.closed or not self.sent_at:
            return
        due = self.sent_at[0] + self.timeout_s
        if self.loop.time() >= due:
            self.abort(asyncio.TimeoutError(f"redis did not answer within {self.timeout_s * 1000:g} ms"))
        else:
            self.watchdog = self.loop.call_at(due, self._check)

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
        pending = self.pending
        try:
            while pending and pos < len(buf):
                try:
                    value, pos = _parse(buf, pos)
                except _Incomplete:
                    break
                fut = pending.popleft()
                self.sent_at.popleft()
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
        if not pending and buf:  # a reply nobody asked for: out of sync
            self.abort(RedisConnectionLost("unexpected data from the server"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_all(RedisConnectionLost(f"connection lost: {exc}" if exc else "connection closed"))

    def _fail_all(self, exc: Exception) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.sent_at.clear()
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def abort(self, exc: Exception) -> None:
        self.closed = True
        self.out = []  # never written: their futures are in `pending` and fail below
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
        self._background: set[asyncio.Future] = set()  # writes that had to connect first

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
        """A connected, authenticated protocol on the configured database.

        Any failure after the TCP connection exists — an error reply to AUTH or SELECT (a wrong
        password, a bad db number), the connect deadline, a cancellation — aborts that
        connection before re-raising. Otherwise every failed attempt (one per breaker probe)
        left an open socket behind, in this process and in Redis's client list.
        """
        loop = asyncio.get_running_loop()
        proto: _Protocol | None = None
        try:
            async with deadline(self.connect_timeout_s):
                _, proto = await loop.create_connection(lambda: _Protocol(self.timeout_s), self.host, self.port)
                if self.password is not None:
                    auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                    await _replies(proto.send([encode_command(*auth)]))
                if self.db:
                    await _replies(proto.send([encode_command("SELECT", self.db)]))
        except BaseException as e:
            if proto is not None:
                proto.abort(RedisConnectionLost(f"connection setup failed: {e!r}"))
            raise
        self._proto = proto
        return proto

    async def execute(self, commands: Sequence[bytes]) -> list[object]:
        """Send pre-encoded commands in one write; their replies, in order.

        Raises TimeoutError (the connection is then closed), RedisConnectionLost, OSError or
        RedisReplyError; callers treat all of them as a cache failure.
        """
        proto = self._proto
        if proto is None or proto.closed:
            proto = await self._connection()
        return await _replies(proto.send(commands))

    async def get(self, key: str) -> bytes | None:
        proto = self._proto
        if proto is None or proto.closed:
            proto = await self._connection()
        (reply,) = proto.send([encode_get(key)])
        return await reply  # type: ignore[no-any-return]

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        (values,) = await self.execute([encode_command("MGET", *keys)])
        return values  # type: ignore[return-value]

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
        await self.execute([encode_set(key, value, ttl_s) for key, value in items])

    def set_many_nowait(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> asyncio.Future:
        """Queue the SETs without waiting for Redis: a future of the outcome (None or the error).

        On a live connection the commands join the write buffer at once — so a GET issued
        afterwards by any request is answered after them — under the same reply deadline as
        any command. Without a live connection, a background task connects and sends them.
        """
        proto = self._proto
        if proto is None or proto.closed:
            task = asyncio.ensure_future(self.set_many(items, ttl_s))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return task
        futures = proto.send([encode_set(key, value, ttl_s) for key, value in items])
        return futures[0] if len(futures) == 1 else asyncio.gather(*futures)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.flush()  # queued writes (the last requests' SETs) still go out
            proto.closed = True
            proto.transport.close()  # after the transport's buffer is written
        self._proto = None


async def _replies(futures: list[asyncio.Future]) -> list[object]:
    return list(await asyncio.gather(*futures)) if len(futures) > 1 else [await futures[0]]


def encode_get(key: str) -> bytes:
    """`encode_command("GET", key)`, without the generic loop (the hot path's read)."""
    k = key.encode("utf-8")
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k)


def encode_set(key: str, value: bytes, ttl_s: int) -> bytes:
    """`encode_command("SET", key, value, "EX", ttl_s)`, without the generic loop."""
    k = key.encode("utf-8")
    t = b"%d" % ttl_s
    return b"*5\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$2\r\nEX\r\n$%d\r\n%s\r\n" % (
        len(k), k, len(value), value, len(t), t,
    )
