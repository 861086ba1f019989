"""`python -m service.run`: the API in N worker processes, each with its own listening socket.

Why not `uvicorn --workers N`. There the supervisor binds one socket and every worker accepts
from it; asyncio accepts *every* pending connection on each wake-up, so when a client opens its
keep-alive connections at once (a load balancer, a connection pool, a load generator) the first
worker to wake takes most or all of them and keeps them. Measured with `bench/serve.py`
(2 workers, 16 wrk connections): in 7 of 9 scenarios one worker did 100 % of the CPU work, the
other idled, and throughput was one core's. Here each worker binds its own socket into one
`SO_REUSEPORT` group (Linux) and the kernel spreads new connections over the workers by a hash
of the connection's addresses and ports.

    python -m service.run --host 0.0.0.0 --port 8000 --workers 2

`--workers` defaults to `$WEB_CONCURRENCY` (as uvicorn's does), else 1; one worker is plain
`uvicorn.run`. The supervisor restarts a worker that dies (at most `MAX_RESTARTS` per minute,
then it stops everything and exits 1, rather than spinning), and forwards SIGTERM/SIGINT: the
workers finish their requests and exit, then it does. Each worker hot-reloads index versions on
its own (see service/state.py), as under uvicorn's supervisor.

Logging: every process (supervisor and workers) writes through one handler on the root logger,
in one format (`--log-format`, default `$SERVICE_LOG_FORMAT` or json; see
service.observability.logging_config), which uvicorn gets as its `log_config`, so uvicorn's own
lines are in that format too and no record is written twice.

The listening sockets are created with `IPPROTO_TCP`, so asyncio turns on TCP_NODELAY for every
accepted connection (see service/http.py for what goes wrong without it).
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from service.observability import LOG_FORMATS, logging_config

log = logging.getLogger("service.run")

APP = "service.app:app"
MAX_RESTARTS = 5          # worker deaths tolerated within RESTART_WINDOW_S
RESTART_WINDOW_S = 60.0
# Idle keep-alive connections are closed after this long. Longer than the idle timeouts of the
# proxies and connection pools in front of us (AWS ALB 60 s, nginx upstream keepalive 60 s), so
# that the client side closes an idle connection first. With uvicorn's 5 s, a pooled connection
# reused just as the server closes it gets a reset ("Connection reset by peer", a 502 at a load
# balancer): the HTTP/1.1 keep-alive race, which a POST cannot safely retry.
KEEP_ALIVE_S = 75


def reuseport_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket bound to (host, port) as a member of a SO_REUSEPORT group."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise RuntimeError("SO_REUSEPORT is not available on this platform: use `uvicorn --workers N` instead")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port} with SO_REUSEPORT: {exc.strerror}") from exc
    return sock


def uvicorn_options(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn.Config keywords. `log_config` replaces uvicorn's own logging setup in every
    process with ours (service.observability.logging_config): one handler, one format."""
    return {
        "http": args.http, "loop": args.loop, "log_level": args.log_level, "access_log": args.access_log,
        "timeout_keep_alive": args.timeout_keep_alive, "backlog": args.backlog,
        "log_config": logging_config(args.log_level, args.log_format),
    }


def _worker(host: str, port: int, options: dict[str, Any]) -> None:  # pragma: no cover - runs in a child
    import uvicorn

    logging.config.dictConfig(options["log_config"])
    logging.captureWarnings(True)
    try:
        sock = reuseport_socket(host, port, options["backlog"])
        uvicorn.Server(uvicorn.Config(APP, **options)).run(sockets=[sock])
    except Exception:
        # logged in the process's format rather than multiprocessing's plain traceback on stderr
        log.exception("worker failed")
        raise SystemExit(1) from None


class Supervisor:
    """Starts `workers` processes of `_worker`, restarts one that dies, stops them all on a signal."""

    def __init__(self, workers: int, host: str, port: int, options: dict[str, Any]) -> None:
        self.n, self.host, self.port, self.options = workers, host, port, options
        self.ctx = multiprocessing.get_context("spawn")  # no torch/FAISS state forked from the parent
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.stopping = threading.Event()
        self.deaths: deque[float] = deque()

    def _spawn(self) -> multiprocessing.process.BaseProcess:
        p = self.ctx.Process(target=_worker, args=(self.host, self.port, self.options), name="service-worker")
        p.start()
        log.info("started worker pid %s", p.pid)
        return p

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("received %s: stopping %d workers", signal.Signals(signum).name, len(self.procs))
        self.stopping.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.procs = [self._spawn() for _ in range(self.n)]
        status = 0
        while not self.stopping.wait(0.2):
            for i, p in enumerate(self.procs):
                if p.is_alive():
                    continue
                now = time.monotonic()
                self.deaths.append(now)
                while self.deaths and now - self.deaths[0] > RESTART_WINDOW_S:
                    self.deaths.popleft()
                if len(self.deaths) > MAX_RESTARTS:
                    log.error("%d worker deaths within %.0fs (last: pid %s, exit %s): giving up",
                              len(self.deaths), RESTART_WINDOW_S, p.pid, p.exitcode)
                    status = 1
                    self.stopping.set()
                    break
                log.warning("worker pid %s exited with %s: restarting it", p.pid, p.exitcode)
                self.procs[i] = self._spawn()
        self._stop_all()
        return status

    def _stop_all(self, timeout: float = 30.0) -> None:
        for p in self.procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)  # uvicorn: stop accepting, finish in-flight requests
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("worker pid %s did not stop within %.0fs: killing it", p.pid, timeout)
                p.kill()
                p.join()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: $WEB_CONCURRENCY or 1)")
    p.add_argument("--http", default="auto", help="uvicorn --http (e.g. service.http:H11Protocol)")
    p.add_argument("--loop", default="auto", help="uvicorn --loop")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", default=os.environ.get("SERVICE_LOG_FORMAT", "json"),
                   help="json (default; $SERVICE_LOG_FORMAT, as the app reads it) or plain: the format of "
                   "every log line of the supervisor, the workers and uvicorn")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="uvicorn's own access log (the service writes structured request logs itself)")
    p.add_argument("--timeout-keep-alive", type=int, default=KEEP_ALIVE_S,
                   help=f"seconds an idle keep-alive connection is kept (default {KEEP_ALIVE_S}; see KEEP_ALIVE_S)")
    p.add_argument("--backlog", type=int, default=2048)
    args = p.parse_args(argv)
    if args.workers is None:
        env = os.environ.get("WEB_CONCURRENCY", "1")
        try:
            args.workers = int(env)
        except ValueError:
            p.error(f"WEB_CONCURRENCY must be an integer, got {env!r}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in 0..65535, got {args.port}")
    if args.workers > 1 and args.port == 0:
        p.error("--port 0 with --workers > 1 would give every worker a different port: pick a port")
    if args.backlog < 1:
        p.error(f"--backlog must be >= 1, got {args.backlog}")
    if args.log_format not in LOG_FORMATS:
        p.error(f"--log-format / SERVICE_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {args.log_format!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = uvicorn_options(args)
    logging.config.dictConfig(options["log_config"])
    logging.captureWarnings(True)
    if args.workers == 1:
        import uvicorn

        uvicorn.run(APP, host=args.host, port=args.port, **options)
        return 0
    # Fail here, in the foreground, if the port is taken or SO_REUSEPORT is missing; the probe
    # socket is closed before the workers start (a member of the group that never accepts
    # would be handed its share of connections and leave them hanging).
    reuseport_socket(args.host, args.port, 1).close()
    return Supervisor(args.workers, args.host, args.port, options).run()


if __name__ == "__main__":
    sys.exit(main())
