"""Run docker-compose.yml's services as plain processes (there is no Docker engine in CI).

The compose file is the single source of truth for the stack's commands; this module reads it,
applies compose's own variable interpolation, and turns each service into an argv plus an
environment that work on the host:

* the container paths of a service's volumes (``/data``, ``/models``, ``/index``) become
  directories of a sandbox, one per named volume, so services that share a volume share the
  directory exactly as containers would;
* ``redis:6379`` (a compose service address) becomes the loopback port of a real
  ``redis-server`` that the sandbox starts with the redis service's own command;
* ``/app`` (the image's WORKDIR, where docker/ scripts live) becomes the repository root.

Nothing here knows what the commands do; a command that is wrong in the compose file fails here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKER_DOC = REPO_ROOT / "docs" / "docker.md"
IMAGE_WORKDIR = "/app"


def load_checker() -> ModuleType:
    """Import ``.ci/check_docker.py`` (a script dir, not a package) as module ``check_docker``."""
    name = "check_docker"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / ".ci" / "check_docker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A currently free loopback TCP port (the OS picks it, so parallel runs do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """``depends_on`` in either compose form, as {dependency: condition}."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def startup_order(services: Mapping[str, Any]) -> list[str]:
    """Services in the order compose starts them: dependencies first, ties in file order."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ValueError(f"dependency cycle: {' -> '.join((*path, name))}")
        if name not in services:
            raise ValueError(f"{path[-1]} depends on unknown service {name}")
        state[name] = "visiting"
        for dep in depends_on(services[name]):
            visit(dep, (*path, name))
        state[name] = "done"
        order.append(name)

    for name in services:
        visit(name, ())
    return order


def argv_of(command: Any) -> list[str]:
    """A compose ``command``/healthcheck ``test`` (list or string) as an argv."""
    if isinstance(command, list):
        argv = [str(part) for part in command]
        return argv[1:] if argv and argv[0] in ("CMD", "CMD-SHELL") else argv
    return shlex.split(str(command))


def output_tail(path: Path, chars: int = 4000) -> str:
    """The end of a log file, for assertion messages."""
    if not path.exists():
        return "<no log>"
    return path.read_text(encoding="utf-8", errors="replace")[-chars:]


@dataclass
class Sandbox:
    """Host stand-ins for the stack's volumes and network, under one temporary directory."""

    root: Path
    compose: dict[str, Any]
    redis_port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def services(self) -> dict[str, Any]:
        return self.compose["services"]

    def volume_dir(self, name: str) -> Path:
        """The directory standing in for named volume ``name`` (shared by every service)."""
        path = self.root / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mounts(self, service: str) -> dict[str, Path]:
        """{container path: host directory} for a service's ``volumes`` entries."""
        mapping: dict[str, Path] = {}
        for entry in self.services[service].get("volumes") or []:
            if isinstance(entry, dict):
                source, target = str(entry.get("source", "")), str(entry["target"])
            else:
                parts = str(entry).split(":")
                source, target = parts[0], parts[1]
            if source.startswith(("/", ".", "~")):
                host = Path(os.path.expanduser(source))
                host = host if host.is_absolute() else COMPOSE_FILE.parent / host
            else:
                host = self.volume_dir(source)
            mapping[target] = host
        mapping.setdefault(IMAGE_WORKDIR, REPO_ROOT)
        return mapping

    def remap(self, text: str, service: str) -> str:
        """Rewrite container paths and compose service addresses in one string."""
        for target, host in sorted(self.mounts(service).items(), key=lambda kv: -len(kv[0])):
            text = re.sub(rf"(?<![\w./-]){re.escape(target)}(?![\w.-])", str(host), text)

        def address(match: re.Match[str]) -> str:
            host, port = match.group(1), match.group(2)
            if host != "redis" or port != "6379":
                raise AssertionError(f"{service}: no stand-in for compose address {host}:{port}")
            return f"127.0.0.1:{self.redis_port}"

        names = "|".join(re.escape(n) for n in self.services)
        return re.sub(rf"(?<=//)({names}):(\d+)\b", address, text)

    def command(self, service: str) -> list[str]:
        """The service's compose ``command``, remapped for the host."""
        command = self.services[service].get("command")
        if command is None:
            raise AssertionError(f"service {service} has no command in docker-compose.yml")
        return [self.remap(part, service) for part in argv_of(command)]

    def environment(self, service: str) -> dict[str, str]:
        """The host environment plus the service's compose ``environment`` (remapped).

        ``SERVICE_*`` variables of the caller are dropped so that only the compose file
        configures the API (CI may export its own for other tests). The interpreter running
        the tests is first on PATH, so ``trainer``/``indexer``/``uvicorn`` are this checkout's.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        declared = self.services[service].get("environment") or {}
        if isinstance(declared, list):
            declared = dict(item.split("=", 1) if "=" in item else (item, None) for item in declared)
        for key, value in declared.items():
            if value is None:
                continue  # compose passes these through from the caller's environment
            env[str(key)] = self.remap(str(value), service)
        return env

    def workdir(self, service: str) -> Path:
        """A scratch working directory per service (the image's WORKDIR holds no source)."""
        path = self.root / "work" / service
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, service: str, suffix: str = "") -> Path:
        return self.root / f"{service}{suffix}.log"

    def run_job(self, service: str, timeout: float, suffix: str = "") -> tuple[int, str]:
        """Run a one-shot service to completion; (exit status, combined output)."""
        log = self.log(service, suffix)
        with log.open("wb") as out:
            result = subprocess.run(
                self.command(service),
                env=self.environment(service),
                cwd=self.workdir(service),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        return result.returncode, output_tail(log, 20000)

    def start(self, service: str, argv: list[str] | None = None, suffix: str = "") -> subprocess.Popen[bytes]:
        """Start a long-running service in its own process group; stopped by :meth:`close`."""
        log = self.log(service, suffix)
        out = log.open("wb")
        proc = subprocess.Popen(
            argv if argv is not None else self.command(service),
            env=self.environment(service),
            cwd=self.workdir(service),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.processes.append(proc)
        return proc

    def start_redis(self, timeout: float = 20.0) -> subprocess.Popen[bytes]:
        """The redis service's own command, bound to loopback on the sandbox's port."""
        argv = self.command("redis") + [
            "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(self.workdir("redis")),
        ]
        proc = self.start("redis", argv)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"redis-server exited {proc.returncode}:\n{output_tail(self.log('redis'))}")
            if self.redis_healthy():
                return proc
            time.sleep(0.1)
        raise AssertionError(f"redis never passed its healthcheck:\n{output_tail(self.log('redis'))}")

    def redis_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.redis_port), *args],
            capture_output=True, text=True, timeout=10, check=False,
        )

    def redis_healthy(self) -> bool:
        """The redis service's compose healthcheck, pointed at the sandbox's port."""
        test = argv_of(self.services["redis"]["healthcheck"]["test"])
        argv = [test[0], "-h", "127.0.0.1", "-p", str(self.redis_port), *test[1:]]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return result.returncode == 0 and result.stdout.strip() == "PONG"

    def close(self) -> None:
        """Stop every started process group: SIGTERM, then SIGKILL after a grace period."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.processes.clear()


def with_port(argv: list[str], host: str, port: int) -> list[str]:
    """Replace the values of ``--host`` and ``--port`` in a uvicorn argv (both must be present)."""
    out = list(argv)
    for flag, value in (("--host", host), ("--port", str(port))):
        if flag not in out:
            raise AssertionError(f"{flag} missing from the api command {argv}")
        out[out.index(flag) + 1] = value
    return out


@dataclass
class CurlRequest:
    """The HTTP request a documented ``curl`` command line sends."""

    method: str
    url: str
    headers: dict[str, str]
    body: str | None
    text: str


def documented_curls(markdown: str) -> list[CurlRequest]:
    """Every ``curl`` command inside fenced code blocks of a Markdown text, parsed."""
    requests: list[CurlRequest] = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", markdown, flags=re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("$ "):
                stripped = stripped[2:]
            if stripped.startswith("curl "):
                requests.append(parse_curl(stripped))
    return requests


def parse_curl(command: str) -> CurlRequest:
    """The method, URL, headers and body of one ``curl`` command line (pipes ignored)."""
    words = shlex.split(command.split(" | ")[0])
    method, url, body = None, None, None
    headers: dict[str, str] = {}
    i = 1
    while i < len(words):
        word = words[i]
        if word in ("-X", "--request"):
            method = words[i + 1]
            i += 1
        elif word in ("-H", "--header"):
            key, _, value = words[i + 1].partition(":")
            headers[key.strip()] = value.strip()
            i += 1
        elif word in ("-d", "--data", "--data-raw", "--json"):
            body = words[i + 1]
            if word == "--json":
                headers.setdefault("Content-Type", "application/json")
            i += 1
        elif not word.startswith("-"):
            url = word
        i += 1
    if url is None:
        raise ValueError(f"no URL in {command!r}")
    if "://" not in url:
        url = "http://" + url
    return CurlRequest(method or ("POST" if body is not None else "GET"), url, headers, body, command)
