"""Fixtures of the service tests: served versions, in-process apps, real Redis, a dead socket.

Index versions are built from the shared tiny trained bundle (`tests/conftest.py`) with the
helpers in `tests/service/helpers.py`. Apps are created with `start_reloader=False` unless a test
exercises the background reloader, and load their version synchronously with
`reloader.check_once()`, so no test sleeps waiting for a poll.

Redis tests start their own `redis-server` on a free loopback port (they stop and restart it);
they are skipped only if the binary is missing (`.ci/run` and `make test` install it).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.helpers import item_embeddings, write_version
from training.bundle import load_bundle, save_bundle

# The shared tiny dataset's user schema: age (continuous), country, device (categorical),
# interests (multi_categorical, "|").
FEATURES = {"age": 31, "country": "k1", "device": "ios", "interests": "t0|t3"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- model bundles and catalogs --------------------------------------------------------------


def derive_bundle(src: Path, models_dir: Path, seed: int) -> Path:
    """A new bundle (new model_version) whose user tower is `src`'s, perturbed.

    Same item tower, same feature statistics; different user vectors. Cheaper than training.
    """
    bundle = load_bundle(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bundle.model.user_tower.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    cfg = json.loads((Path(src) / "config.json").read_text())
    counts = json.loads((Path(src) / "item_counts.json").read_text())
    return save_bundle(
        bundle.model,
        models_dir,
        train_config=cfg["train"],
        schema=cfg["schema"],
        item_counts=counts,
        data_fingerprint=bundle.manifest["data_fingerprint"],
        metrics={},
        full=False,
    )


@pytest.fixture(scope="session")
def bundle_a(tiny_bundle_path: Path) -> Path:
    """The shared tiny bundle (trained with logQ)."""
    return tiny_bundle_path


@pytest.fixture(scope="session")
def bundle_b(tiny_bundle_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model version with different user vectors."""
    return derive_bundle(tiny_bundle_path, tmp_path_factory.mktemp("models_b"), seed=7)


@pytest.fixture(scope="session")
def catalog(bundle_a: Path, tiny_dataset: Path) -> tuple[np.ndarray, list[str]]:
    """Real item vectors (n, d) and ids of the tiny dataset under bundle A's item tower."""
    emb, ids = item_embeddings(bundle_a, tiny_dataset / "items.csv")
    emb.setflags(write=False)
    return emb, ids


@pytest.fixture
def index_root(tmp_path: Path, bundle_a: Path, catalog: tuple[np.ndarray, list[str]]) -> Path:
    """INDEX_ROOT with one exact (Flat) version of the tiny catalog, `current` pointing at it."""
    root = tmp_path / "index"
    write_version(root, bundle_a, catalog[0], catalog[1])
    return root


# ---- apps ----------------------------------------------------------------------------------


def make_settings(index_root: Path, **over: object) -> Settings:
    base: dict[str, object] = {"index_root": index_root, "access_log": False}
    base.update(over)
    return Settings(**base)  # type: ignore[arg-type]


@contextmanager
def serve(
    index_root: Path,
    *,
    load: bool = True,
    reloader: bool = False,
    raise_server_exceptions: bool = True,
    **over: object,
) -> Iterator[TestClient]:
    """An in-process app (lifespan run) with its version loaded synchronously.

    `reloader=True` runs the real background poller instead (and waits for readiness).
    """
    app = create_app(make_settings(index_root, **over), start_reloader=reloader)
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
        if reloader:
            wait_for(lambda: client.get("/readyz").status_code == 200, what="readiness")
        elif load:
            outcome = app.state.service.reloader.check_once()
            if outcome != "swapped":
                raise AssertionError(f"version did not load: {outcome}: {app.state.service.reloader.last_error}")
        yield client


def terminate(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGTERM a server process, wait for its graceful exit (SIGKILL after `timeout`); its status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # pragma: no cover - a hung server: the test fails on the status
        proc.kill()
        return proc.wait()


def wait_for(cond, timeout: float = 15.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def client(index_root: Path) -> Iterator[TestClient]:
    with serve(index_root) as c:
        yield c


# ---- Redis -----------------------------------------------------------------------------------


class RedisServer:
    """A real redis-server on a fixed loopback port that a test can stop and restart."""

    def __init__(self, workdir: Path, extra: list[str] | None = None) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (make test / .ci/run install it)")
        self.port = free_port()
        self.workdir = workdir
        self.extra = list(extra or [])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        log = self.workdir / f"redis-{self.port}.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir), *self.extra],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:  # not up yet
                time.sleep(0.02)
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server on port {self.port} did not start (exit code {self.proc.poll()}); its log:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self, password: str | None = None, db: int = 0):  # noqa: ANN201 - redis.Redis
        import redis

        return redis.Redis(
            host="127.0.0.1", port=self.port, db=db, password=password, socket_timeout=1, socket_connect_timeout=1
        )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class BlackHole:
    """A TCP server that accepts connections and never answers (a hung Redis)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.conns.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    server = BlackHole()
    try:
        yield server
    finally:
        server.close()
