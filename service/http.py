"""uvicorn HTTP protocol that always sets TCP_NODELAY (use with `--workers N`).

With `--workers` > 1, uvicorn creates the listening socket itself as `socket.socket(family)`,
whose `proto` is 0; asyncio only sets TCP_NODELAY on accepted sockets whose `proto` is
IPPROTO_TCP, so every connection keeps Nagle's algorithm on. uvicorn writes a response's
headers and body separately, the body then waits for the client's delayed ACK, and every
keep-alive request costs ~40 ms (measured: 350 req/s instead of thousands, a bare ASGI app
included). A single-worker uvicorn is not affected.

    uvicorn service.app:app --workers 2 --http service.http:H11Protocol

`H11Protocol` is uvicorn's h11 implementation plus `setsockopt(TCP_NODELAY)` per connection;
`HttpToolsProtocol` the same for httptools (only if httptools is installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol as _H11Protocol

__all__ = ["H11Protocol", "set_nodelay"]


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class H11Protocol(_H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        set_nodelay(transport)
        super().connection_made(transport)


try:  # optional: uvicorn[standard]
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools not installed
    pass
else:

    class HttpToolsProtocol(_HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            set_nodelay(transport)
            super().connection_made(transport)

    __all__.append("HttpToolsProtocol")
