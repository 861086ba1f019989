"""`python -m service.run`: the API under gunicorn, N uvicorn workers, each with its own socket.

Why not `uvicorn --workers N`. There the supervisor binds one socket and every worker accepts
from it; asyncio accepts *every* pending connection on each wake-up, so when a client opens its
keep-alive connections at once (a load balancer, a connection pool, a load generator) the first
worker to wake takes most or all of them and keeps them. With gunicorn's `reuse_port` each
worker binds its own socket into one `SO_REUSEPORT` group (Linux) after the fork, and the kernel
spreads new connections over the workers by a hash of the connection's addresses and ports.

Why gunicorn and not our own supervisor (this module was one, multiprocessing-based, with a
socket per worker): it spreads connections as evenly. Worker CPU split, largest first, measured
with `python -m bench.serve --items 20000 --supervisor S --workers 2 --connections 16
--duration 6 --warmup 2 --scenarios healthz,retrieve_hit,retrieve_miss
--env SERVICE_REDIS_TIMEOUT_S=0.2` (2 shared cores, load average 8-9):

| supervisor | healthz | retrieve_hit | retrieve_miss |
|---|---|---|---|
| the former service.run (own SO_REUSEPORT sockets) | 52/48 (54/46) | 51/49 (51/49) | 51/49 (50/50) |
| gunicorn --reuse-port, uvicorn workers | 50/50 | 50/50 | 50/50 |
| uvicorn --workers 2 | 52/48 (99/1) | 99/1 (99/1) | 99/1 (52/48) |

(in brackets: a first run without the `--env`). gunicorn also brings what we would otherwise
keep writing: worker restart, graceful stop, timeouts of hung workers.

    python -m service.run --host 0.0.0.0 --port 8000 --workers 2

is the same as `gunicorn service.app:app --reuse-port --workers 2 --keep-alive 75` with the
worker class of `worker_class` and the logging of `logging_config`; this module adds the checks
of `parse_args`, the keep-alive default, one log format and the restart limit. `--workers`
defaults to `$WEB_CONCURRENCY` (as gunicorn's and uvicorn's do), else 1. gunicorn restarts a
worker that dies (more than `MAX_RESTARTS` deaths a minute stop everything with status 1,
rather than spinning; gunicorn stops by itself on a worker that cannot boot) and, on
SIGTERM/SIGINT, lets the workers finish their requests, then exits 0. The workers are forked
before the app is imported, so no torch/FAISS state is shared; each hot-reloads index versions
on its own (see service/state.py).

Logging: every process writes through one handler on the root logger, in one format
(`--log-format`, default `$SERVICE_LOG_FORMAT` or json; service.observability.logging_config),
gunicorn's and uvicorn's own lines included, and no record twice.

Accepted connections get TCP_NODELAY from the listening socket, on which gunicorn sets it (see
service/http.py for what goes wrong without it).
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from service.observability import LOG_FORMATS, logging_config

log = logging.getLogger("service.run")

MAX_RESTARTS = 5          # worker deaths tolerated within RESTART_WINDOW_S
RESTART_WINDOW_S = 60.0
# Idle keep-alive connections are closed after this long. Longer than the idle timeouts of the
# proxies and connection pools in front of us (AWS ALB 60 s, nginx upstream keepalive 60 s), so
# that the client side closes an idle connection first. With uvicorn's 5 s, a pooled connection
# reused just as the server closes it gets a reset ("Connection reset by peer", a 502 at a load
# balancer): the HTTP/1.1 keep-alive race, which a POST cannot safely retry.
KEEP_ALIVE_S = 75
# gunicorn kills a worker that has not checked in for this long, booting included: importing
# torch and FAISS took 16 s on 2 loaded cores, and gunicorn's default of 30 s would kill slow
# boots. A running worker checks in from its event loop every half of it (uvicorn_worker).
BOOT_AND_HANG_TIMEOUT_S = 120


def reuseport_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket bound to (host, port) as a member of a SO_REUSEPORT group, as each
    gunicorn worker binds it: `main` opens and closes one first, to fail in the foreground."""
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
    """What each worker's uvicorn gets (`uvicorn.Config` keywords)."""
    return {
        "http": args.http, "loop": args.loop, "log_level": args.log_level, "access_log": args.access_log,
        "timeout_keep_alive": args.timeout_keep_alive, "backlog": args.backlog,
    }


def gunicorn_settings(args: argparse.Namespace) -> dict[str, Any]:
    """gunicorn's settings for `args`: `reuse_port` makes each worker bind its own SO_REUSEPORT
    socket after the fork (gunicorn >= 19.8 does so when the option is on), the keep-alive,
    backlog and log level of `uvicorn_options`, and `logging_config` as the whole logging setup."""
    options = uvicorn_options(args)
    host = f"[{args.host}]" if ":" in args.host else args.host
    return {
        "bind": [f"{host}:{args.port}"], "workers": args.workers, "worker_class": worker_class(options),
        "reuse_port": True, "keepalive": options["timeout_keep_alive"], "backlog": options["backlog"],
        "graceful_timeout": 30, "timeout": BOOT_AND_HANG_TIMEOUT_S, "loglevel": args.log_level, "proc_name": "service.run",
        "logconfig_dict": logging_config(args.log_level, args.log_format), "child_exit": _child_exit,
        # gunicorn 25+'s control socket ($HOME/.gunicorn/gunicorn.ctl, shared by every instance
        # of the user): nothing here uses it
        "control_socket_disable": True,
    }


def worker_class(options: dict[str, Any]) -> type:
    """uvicorn's gunicorn worker, with our uvicorn options, and uvicorn's loggers left to the
    root handler (`UvicornWorker` points them at gunicorn's handlers, which have none here)."""
    from uvicorn_worker import UvicornWorker

    class Worker(UvicornWorker):
        CONFIG_KWARGS = {k: options[k] for k in ("http", "loop", "log_level", "access_log")}

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # uvicorn's access log stays off unless asked for: the service writes its own line
            for name in ("uvicorn.error", "uvicorn.access") if options["access_log"] else ("uvicorn.error",):
                logging.getLogger(name).handlers = []
                logging.getLogger(name).propagate = True

    return Worker


_deaths: deque[float] = deque()


def _child_exit(arbiter: Any, worker: Any) -> None:
    """gunicorn hook, in the master, after a worker exited: gunicorn starts a new one; more than
    MAX_RESTARTS deaths within RESTART_WINDOW_S stop everything with status 1 instead of
    spinning (gunicorn itself halts only on a worker that fails to boot)."""
    if getattr(arbiter, "stopping", False):
        return
    from gunicorn.errors import HaltServer

    now = time.monotonic()
    _deaths.append(now)
    while _deaths and now - _deaths[0] > RESTART_WINDOW_S:
        _deaths.popleft()
    if len(_deaths) > MAX_RESTARTS:
        log.error("%d worker deaths within %.0fs (last: pid %s): giving up", len(_deaths), RESTART_WINDOW_S, worker.pid)
        raise HaltServer("too many worker deaths", 1)
    log.warning("worker pid %s exited: restarting it", worker.pid)


def serve(args: argparse.Namespace) -> int:
    """Run gunicorn with `gunicorn_settings(args)` until SIGTERM/SIGINT (then 0) or a halt."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    class StoppableArbiter(Arbiter):
        stopping = False  # worker exits from here on are the shutdown, not deaths

        def stop(self, graceful: bool = True) -> None:
            self.stopping = True
            super().stop(graceful)

    class Application(BaseApplication):
        def load_config(self) -> None:
            for key, value in gunicorn_settings(args).items():
                self.cfg.set(key, value)

        def load(self) -> Any:  # in each worker, after the fork: the master never imports torch
            from service.app import app

            return app

        def run(self) -> None:
            StoppableArbiter(self).run()

    Application().run()
    return 0


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
    logging.config.dictConfig(logging_config(args.log_level, args.log_format))
    if args.port != 0:
        # Fail here, in the foreground, with the reason, if the port is taken or SO_REUSEPORT is
        # missing (gunicorn's workers would retry, fail to boot and halt it with less to go on);
        # the probe is closed before the workers start: a member of the group that never
        # accepts would be handed its share of connections and leave them hanging.
        reuseport_socket(args.host, args.port, 1).close()
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
