"""`python -m service.run` (gunicorn + uvicorn workers): per-worker SO_REUSEPORT listeners, argument checks,
restart and stop, one log format."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service import observability, run
from tests.service.conftest import FEATURES, RedisServer, free_port, terminate, wait_for

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--workers", "0"], {}, "--workers must be >= 1, got 0"),
        (["--workers", "2", "--port", "0"], {}, "--port 0 with --workers > 1"),
        (["--port", "70000"], {}, "--port must be in 0..65535, got 70000"),
        (["--backlog", "0"], {}, "--backlog must be >= 1, got 0"),
        ([], {"WEB_CONCURRENCY": "two"}, "WEB_CONCURRENCY must be an integer, got 'two'"),
        ([], {"SERVICE_LOG_FORMAT": "xml"}, "SERVICE_LOG_FORMAT must be one of json, plain, got 'xml'"),
    ],
)
def test_bad_arguments_name_the_problem(
    argv: list[str], env: dict, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.delenv("SERVICE_LOG_FORMAT", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        run.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_workers_default_to_web_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    assert run.parse_args([]).workers == 1
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    assert run.parse_args(["--port", "9000"]).workers == 3
    assert run.parse_args(["--workers", "2"]).workers == 2  # the flag wins


def test_plain_log_format_keeps_a_records_fields() -> None:
    """SERVICE_LOG_FORMAT=plain: one readable line, with the fields a JSON line would carry."""
    record = logging.LogRecord("service.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"path": "/x", "status": 404}
    assert observability.log_handler("plain").format(record).endswith(" service.access INFO request path=/x status=404")
    assert json.loads(observability.log_handler("json").format(record))["status"] == 404
    with pytest.raises(ValueError, match="log format must be one of"):
        observability.log_handler("xml")


def test_idle_connections_outlive_a_load_balancers_idle_timeout() -> None:
    """The server must not close an idle keep-alive connection before the proxy in front does.

    AWS ALB and nginx drop idle upstream connections after 60 s; a server that closes first (as
    uvicorn's 5 s default does) races the proxy reusing the connection, and loses requests.
    """
    assert run.parse_args([]).timeout_keep_alive > 60
    assert run.uvicorn_options(run.parse_args([]))["timeout_keep_alive"] == run.KEEP_ALIVE_S
    assert run.parse_args(["--timeout-keep-alive", "5"]).timeout_keep_alive == 5


def test_reuseport_sockets_share_a_port_and_are_tcp() -> None:
    a = run.reuseport_socket("127.0.0.1", 0)
    try:
        port = a.getsockname()[1]
        b = run.reuseport_socket("127.0.0.1", port)
        try:
            assert b.getsockname()[1] == port
            for s in (a, b):
                # proto TCP is what makes asyncio set TCP_NODELAY on accepted connections
                assert s.proto == socket.IPPROTO_TCP
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        finally:
            b.close()
    finally:
        a.close()


def test_a_port_held_without_reuseport_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen(1)
        port = plain.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{port} with SO_REUSEPORT"):
            run.reuseport_socket("127.0.0.1", port)


# ---- the real thing ------------------------------------------------------------------------


def _workers(supervisor: int) -> list[int]:
    """Pids of the supervisor's worker processes (gunicorn forks them: its only children)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == supervisor:
            out.append(int(entry))
    return sorted(out)


def _established_on(port: int) -> set[int]:
    """Socket inodes of every ESTABLISHED server-side IPv4 connection whose local port is `port`."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and f[3] == "01":
            inodes.add(int(f[9]))
    return inodes


def _connections_of(pid: int, inodes: set[int]) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            n += 1
    return n


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_two_workers_share_connections_restart_and_stop(
    index_root: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_") and k != "WEB_CONCURRENCY"}
    env.update(SERVICE_INDEX_ROOT=str(index_root), SERVICE_REDIS_URL=redis_server.url, PYTHONUNBUFFERED="1")
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.run", "--port", str(port), "--workers", "2", "--log-level", "info"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"service.run exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(base + "/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout=90, what="service.run readiness")
        wait_for(lambda: len(_workers(proc.pid)) == 2, timeout=30, what="two workers")
        first = _workers(proc.pid)
        # 32 keep-alive connections opened at once, as a connection pool would: both workers get some
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(32)]
        try:
            for s in socks:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            for s in socks:
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
            inodes = _established_on(port)
            per_worker = [_connections_of(pid, inodes) for pid in first]
            assert sum(per_worker) == 32 and min(per_worker) >= 1, per_worker
        finally:
            for s in socks:
                s.close()
        with httpx.Client(base_url=base, timeout=10) as c:
            body = {"user_id": "196", "features": FEATURES, "k": 5}
            assert len(c.post("/retrieve", json=body).json()["items"]) == 5

            # a worker that dies is replaced, and the service keeps answering meanwhile
            os.kill(first[0], signal.SIGKILL)
            wait_for(lambda: len(w := _workers(proc.pid)) == 2 and first[0] not in w, timeout=60,
                     what="the killed worker's replacement")
            wait_for(ready, timeout=60, what="readiness after the restart")
            # a new connection: `c`'s idled through the restart, and a request on an idle
            # connection can race the server's keep-alive timeout (see service/run.py)
            assert httpx.get(base + "/healthz", timeout=10).status_code == 200
        assert "restarting it" in log.read_text()
    finally:
        terminate(proc, timeout=40)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert _workers(proc.pid) == []


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_every_output_line_is_json_and_each_request_is_logged_once(
    workers: int, index_root: Path, tmp_path: Path
) -> None:
    """The image's command writes one JSON object per line, each record once.

    Regression: a plain `asctime name level` handler on the root logger (logging.basicConfig)
    beside the JSON handler of the `service` logger, which propagates to the root, wrote every
    service record twice, once in each format; uvicorn's own lines were plain text.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_") and k != "WEB_CONCURRENCY"}
    env.update(SERVICE_INDEX_ROOT=str(index_root), PYTHONUNBUFFERED="1")  # access log on (the default)
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.run", "--port", str(port), "--workers", str(workers)],
            cwd=REPO, env=env, stdout=out, stderr=err,
        )

    def loaded() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"service.run exited {proc.returncode}:\n{err_path.read_text()[-3000:]}")
        return err_path.read_text(errors="replace").count("serving new version") >= workers

    probes = [f"/probe-{os.getpid()}-{workers}-{i}" for i in range(6)]
    try:
        wait_for(loaded, timeout=90, what=f"{workers} worker(s) serving")
        base = f"http://127.0.0.1:{port}"
        for path in probes:  # a new connection each: with 2 workers both get some
            assert httpx.get(base + path, timeout=10).status_code == 404
        body = {"user_id": "196", "features": FEATURES}
        assert httpx.post(base + "/retrieve", json=body | {"k": 5}, timeout=10).status_code == 200
        assert httpx.post(base + "/embed", json=body, timeout=10).status_code == 200
    finally:
        terminate(proc, timeout=40)
    assert proc.returncode == 0, err_path.read_text()[-3000:]

    lines = [ln for ln in (out_path.read_text() + err_path.read_text()).splitlines() if ln.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    assert all(isinstance(r, dict) and {"ts", "level", "logger", "msg"} <= r.keys() for r in records), records
    access = [r for r in records if r["logger"] == "service.access"]
    for path in probes:
        assert [r["status"] for r in access if r["path"] == path] == [404], path
    assert [r["endpoint"] for r in access if r["method"] == "POST"] == ["/retrieve", "/embed"]
    assert not any(r["logger"] == "uvicorn.access" for r in records)  # off: the service writes its own
    assert sum(r["msg"] == "serving new version" for r in records) == workers
    # uvicorn's own lines come through the same handler, once each
    started = [r for r in records if r["logger"].startswith("uvicorn") and "Application startup complete" in r["msg"]]
    assert len(started) == workers, records
    assert sum(r["logger"] == "gunicorn.error" and r["msg"].startswith("Booting worker with pid") for r in records) == workers
