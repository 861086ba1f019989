"""`docker compose up`, proven without Docker: the compose services' own commands as processes.

CI has no Docker engine, so this test reads docker-compose.yml (the single place the stack's
commands live), interpolates it as compose would, and runs each service in compose's start
order against a real ``redis-server``: redis -> bootstrap -> api (uvicorn) -> the query from
docs/docker.md (the README's "docker compose up" section) -> one nightly iteration -> the
running API hot-reloads the new model and index. If a command in the compose file is wrong,
this fails; nothing here re-states what the commands are.

Sizes are kept small through the variables the compose file exposes (SYNTH_*, TRAIN_CONFIG,
NIGHTLY_*), exactly as a user would set them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.stack_helpers import (
    COMPOSE_FILE,
    DOCKER_DOC,
    DOCKERFILE,
    REPO_ROOT,
    Sandbox,
    documented_curls,
    free_port,
    load_checker,
    output_tail,
    startup_order,
    with_port,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
        reason="redis-server / redis-cli are not installed (Debian: redis-server)",
    ),
]

# Small but real: a few hundred users/items, a couple of epochs. These are the compose file's
# own knobs (docs/docker.md documents them), not a separate code path.
STACK_ENV = {
    "SYNTH_USERS": "300",
    "SYNTH_ITEMS": "200",
    "SYNTH_INTERACTIONS": "4000",
    "SYNTH_SEED": "7",
    "NIGHTLY_INTERVAL_SECONDS": "0",
    "NIGHTLY_MAX_RUNS": "1",
    "NIGHTLY_KEEP_MODELS": "1",  # prune to the new bundle: the API must not need the old one
}
FAST_TRAIN_CONFIG = {"epochs": 1, "full_epochs": 1, "batch_size": 256}

JOB_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 90.0
RELOAD_TIMEOUT_S = 60.0


def load_stack(tmp_path: Path) -> dict[str, Any]:
    """docker-compose.yml interpolated with the test's variables (and nothing from the shell)."""
    config = tmp_path / "train-config.json"
    config.write_text(json.dumps(FAST_TRAIN_CONFIG), encoding="utf-8")
    env = {**STACK_ENV, "TRAIN_CONFIG": str(config)}
    return load_checker().load_compose(COMPOSE_FILE, env)


@pytest.fixture()
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    box = Sandbox(root=tmp_path, compose=load_stack(tmp_path))
    try:
        yield box
    finally:
        box.close()


def wait_ready(client: httpx.Client, api: subprocess.Popen[bytes], log: Path) -> None:
    """Poll /readyz until 200; fail early (with the log) if uvicorn dies."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if api.poll() is not None:
            pytest.fail(f"api exited with {api.returncode} before ready:\n{output_tail(log)}")
        try:
            response = client.get("/readyz", timeout=2.0)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.25)
    pytest.fail(f"/readyz not 200 after {READY_TIMEOUT_S}s (last: {last}):\n{output_tail(log)}")


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's own HEALTHCHECK command, pointed at the test's port."""
    checker = load_checker()
    _, stages = checker.parse_stages(DOCKERFILE.read_text(encoding="utf-8"))
    argv = checker.healthcheck_command(checker.effective_stage(stages[-1], stages))
    assert argv is not None, "Dockerfile has no HEALTHCHECK CMD"
    argv = [str(REPO_ROOT) + a[len("/app") :] if a.startswith("/app/") else a for a in argv]
    # the image's `python` is its venv's interpreter; here that is the one running the tests
    argv = [sys.executable, *argv[1:]] if argv[0] == "python" else argv
    env = {"HEALTHCHECK_URL": f"http://127.0.0.1:{port}/readyz"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, check=False)


def test_compose_start_order() -> None:
    """Compose starts redis and bootstrap before the api, and nightly and update only after bootstrap."""
    services = load_checker().load_compose(COMPOSE_FILE, {})["services"]
    assert startup_order(services) == ["redis", "bootstrap", "api", "nightly", "update"]


def test_documented_query_is_a_retrieve_call() -> None:
    """docs/docker.md (pasted into the README) has exactly one curl, a POST to /retrieve."""
    curls = documented_curls(DOCKER_DOC.read_text(encoding="utf-8"))
    assert len(curls) == 1, [c.text for c in curls]
    request = curls[0]
    assert request.method == "POST" and urlsplit(request.url).path == "/retrieve"
    assert urlsplit(request.url).port == 8000, "the doc must use the default API_PORT"
    assert json.loads(request.body or "")["k"] >= 1


def test_compose_stack_end_to_end(sandbox: Sandbox) -> None:
    """bootstrap -> api -> documented query -> nightly -> hot reload, all from the compose file."""
    order = startup_order(sandbox.services)
    assert order == ["redis", "bootstrap", "api", "nightly", "update"]
    index_dir = sandbox.mounts("bootstrap")["/index"]
    models_dir = sandbox.mounts("bootstrap")["/models"]
    data_dir = sandbox.mounts("bootstrap")["/data"]

    # redis: the compose command, checked to really be a non-persistent cache.
    sandbox.start_redis()
    assert sandbox.redis_cli("CONFIG", "GET", "save").stdout.split("\n")[1] == ""
    assert sandbox.redis_cli("CONFIG", "GET", "appendonly").stdout.split("\n")[1] == "no"

    # bootstrap on empty volumes: synthetic data, one model, one index version.
    status, out = sandbox.run_job("bootstrap", JOB_TIMEOUT_S)
    assert status == 0, f"bootstrap failed ({status}):\n{out}"
    assert (data_dir / "interactions.csv").is_file() and (data_dir / "schema.json").is_file()
    assert not (data_dir / ".synthetic").exists()
    bundles = sorted(p.name for p in models_dir.iterdir() if (p / "manifest.json").is_file())
    assert len(bundles) == 1, bundles
    first_current = (index_dir / "current").resolve()
    assert (first_current / "manifest.json").is_file()

    # bootstrap again (a second `docker compose up`): idempotent, trains and indexes nothing.
    status, out = sandbox.run_job("bootstrap", JOB_TIMEOUT_S, suffix="-again")
    assert status == 0, f"second bootstrap failed ({status}):\n{out}"
    assert sorted(p.name for p in models_dir.iterdir() if (p / "manifest.json").is_file()) == bundles
    assert (index_dir / "current").resolve() == first_current

    # api: the compose command with only host/port changed (it runs beside other tests).
    port = free_port()
    api = sandbox.start("api", with_port(sandbox.command("api"), "127.0.0.1", port))
    log = sandbox.log("api")
    request = documented_curls(DOCKER_DOC.read_text(encoding="utf-8"))[0]
    path = urlsplit(request.url).path
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
        wait_ready(client, api, log)
        health = run_healthcheck(port)
        assert health.returncode == 0, f"Dockerfile HEALTHCHECK failed: {health.stderr}"

        def query(via: httpx.Client = client) -> dict[str, Any]:
            try:
                response = via.request(request.method, path, content=request.body, headers=request.headers)
            except httpx.TransportError as exc:
                pytest.fail(f"{type(exc).__name__}: {exc}; api log:\n{output_tail(log)}")
            assert response.status_code == 200, f"{response.status_code}: {response.text}"
            return response.json()

        first = query()
        body = json.loads(request.body or "{}")
        ids = [item["item_id"] for item in first["items"]]
        assert len(ids) == body["k"] and len(set(ids)) == len(ids)
        assert not set(ids) & set(body.get("exclude_item_ids", []))
        scores = [item["score"] for item in first["items"]]
        assert scores == sorted(scores, reverse=True)
        assert first["model_version"] and first["index_version"]
        assert first["index_version"] == first_current.name
        assert first["model_version"] == bundles[0]

        # the API really uses the compose Redis: the vector landed there, the repeat hits it.
        again = query()
        assert again["cached"] is True and again["items"] == first["items"]
        assert int(sandbox.redis_cli("DBSIZE").stdout.strip()) >= 1

        # nightly: one iteration of the compose loop while the api keeps serving.
        status, out = sandbox.run_job("nightly", JOB_TIMEOUT_S)
        assert status == 0, f"nightly failed ({status}):\n{out}"
        second_current = (index_dir / "current").resolve()
        assert second_current != first_current and first_current.is_dir()
        newest = sorted(p.name for p in models_dir.iterdir() if (p / "manifest.json").is_file())
        assert len(newest) == 1 and newest[0] > bundles[0], (newest, bundles)
        assert not (models_dir / bundles[0]).exists(), "NIGHTLY_KEEP_MODELS=1 kept the old bundle"

    # hot reload: same process, new versions, no restart. A new client, because the old one's
    # connection sat idle through the nightly: uvicorn closes idle connections after its
    # keep-alive timeout, and a request sent on one just as the server closes it is reset (the
    # HTTP/1.1 keep-alive race; the nightly here takes about that long). That is a client's
    # retry to make, not a property of the reload under test.
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        latest = query(client)
        while latest["index_version"] == first["index_version"] and time.monotonic() < deadline:
            assert client.get("/readyz").status_code == 200, "not ready during the reload"
            time.sleep(0.25)
            latest = query(client)
        assert api.poll() is None, f"the api died:\n{output_tail(log)}"
        assert latest["index_version"] == second_current.name, output_tail(log)
        assert latest["model_version"] == newest[0] != first["model_version"]
        assert len(latest["items"]) == body["k"]


def test_readme_docker_section_is_the_tested_one() -> None:
    """The README's "docker compose up" section runs exactly the commands docs/docker.md does.

    docs/docker.md is the section's source (the stack test reads its curl); once pasted into the
    README, every command block must stay identical there.
    """
    readme = REPO_ROOT / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    if "docker compose up" not in text:
        pytest.skip("README.md has no `docker compose up` section yet (paste docs/docker.md)")
    blocks = re.findall(r"```[^\n]*\n.*?```", DOCKER_DOC.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    missing = [block for block in blocks if block not in text]
    assert missing == [], f"README.md differs from docs/docker.md in: {missing}"


def test_nightly_failure_exits_nonzero_and_leaves_index_alone(sandbox: Sandbox) -> None:
    """A failed nightly run reports itself and switches nothing (here: no dataset at all)."""
    index_dir = sandbox.mounts("nightly")["/index"]
    (index_dir / "sentinel").write_text("untouched", encoding="utf-8")
    status, out = sandbox.run_job("nightly", 120.0)
    assert status == 1, out
    assert "nightly: failed; the API keeps serving the current index" in out
    assert "trainer fit: error" in out  # the trainer's own one-line error reaches the log
    assert sorted(p.name for p in index_dir.iterdir()) == ["sentinel"]


def test_dataset_dir_points_the_stack_at_your_own_data(tmp_path: Path) -> None:
    """DATASET_DIR=<dir> bind-mounts a user's dataset: bootstrap trains on it, generates nothing."""
    own = tmp_path / "my-dataset"
    subprocess.run(
        [str(Path(sys.executable).parent / "trainer"), "prepare", "synthetic", "--out", str(own),
         "--users", "60", "--items", "45", "--interactions", "700", "--seed", "3"],
        check=True, capture_output=True, timeout=120,
    )
    before = sorted(p.name for p in own.iterdir())
    config = tmp_path / "train-config.json"
    config.write_text(json.dumps(FAST_TRAIN_CONFIG), encoding="utf-8")
    compose = load_checker().load_compose(
        COMPOSE_FILE, {"DATASET_DIR": str(own), "TRAIN_CONFIG": str(config)}
    )
    box = Sandbox(root=tmp_path / "stack", compose=compose)
    assert box.mounts("bootstrap")["/data"] == own and box.mounts("nightly")["/data"] == own
    status, out = box.run_job("bootstrap", JOB_TIMEOUT_S)
    assert status == 0, out
    assert f"bootstrap: using the dataset in {own}" in out and "generating" not in out
    assert sorted(p.name for p in own.iterdir()) == before, "bootstrap wrote into the user's dataset"
    manifest = json.loads((box.mounts("bootstrap")["/index"] / "current" / "manifest.json").read_text())
    assert manifest["count"] == 45
