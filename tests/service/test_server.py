"""The service as it is deployed: a real `uvicorn service.app:app` process, and `python -O`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import FEATURES, RedisServer, free_port, terminate, wait_for
from tests.service.helpers import write_version

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_uvicorn_process_serves_reloads_and_stops(
    index_root: Path, bundle_b: Path, catalog: tuple[np.ndarray, list[str]], redis_server: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update(
        SERVICE_INDEX_ROOT=str(index_root),
        SERVICE_REDIS_URL=redis_server.url,
        SERVICE_RELOAD_INTERVAL_S="0.1",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port),
             "--no-access-log"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as c:

            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"uvicorn exited {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    return c.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(ready, timeout=60, what="uvicorn readiness")
            assert c.get("/healthz").json() == {"status": "ok"}
            body = {"user_id": "196", "features": FEATURES, "k": 20, "exclude_item_ids": ["i1"]}
            first = c.post("/retrieve", json=body).json()
            second = c.post("/retrieve", json=body).json()
            assert len(first["items"]) == 20 and (first["cached"], second["cached"]) == (False, True)
            assert first["items"] == second["items"]
            bad = c.post("/retrieve", content=b'{"features": {"age": NaN}}', headers={"content-type": "application/json"})
            assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "features.age"

            new_dir = write_version(index_root, bundle_b, catalog[0], catalog[1])
            wait_for(lambda: c.get("/readyz").json().get("index_version") == new_dir.name, timeout=30,
                     what="hot reload in the server process")
            third = c.post("/retrieve", json=body).json()
            assert third["index_version"] == new_dir.name and third["cached"] is False
            metrics = c.get("/metrics").text
            assert 'service_reloads_total{result="success"} 2.0' in metrics
            assert 'service_cache_hits_total{backend="redis"} 1.0' in metrics
    finally:
        terminate(proc, timeout=20)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -15)
    assert proc.returncode in (0, -signal.SIGTERM), log.read_text()[-3000:]
    lines = log.read_text().splitlines()
    assert any("Application shutdown complete" in line for line in lines), log.read_text()[-3000:]
    assert any('"msg": "serving new version"' in line and new_dir.name in line for line in lines)


def test_service_tests_pass_under_python_O() -> None:
    """Checks done with `assert` vanish under -O; ours must not. Runs a fast subset that covers
    validation, k > catalog, exclusions with the ANN fallback, the cache, reload refusals."""
    if sys.flags.optimize:
        pytest.skip("already running under -O")
    subset = (
        "test_bad_input or test_k_larger or test_ann_index or test_cached_answers or test_bad_version "
        "or test_dimension_mismatch or test_decode_vector or test_invariant1_scores"
    )
    result = subprocess.run(
        [sys.executable, "-O", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/service", "-k", subset,
         "--deselect", "tests/service/test_server.py"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    tail = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0, tail
    summary = [line for line in result.stdout.splitlines() if " passed" in line]
    assert summary and "failed" not in summary[-1], tail
    assert int(summary[-1].split(" passed")[0].split()[-1]) >= 30, tail
