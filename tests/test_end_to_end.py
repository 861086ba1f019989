"""End to end through the public contract: `trainer prepare synthetic` → `trainer fit` →
`trainer evaluate` → `indexer rebuild` → the service, in-process (ASGI) and as a real uvicorn
process, each with a real Redis cache and with the in-process cache."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

BIN = Path(sys.executable).parent
EVAL_KEYS = {"recall@20", "recall@100", "ndcg@20", "ndcg@100", "tail_recall@100", "coverage@20"}


def _run(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{args}: rc={p.returncode}\n{p.stderr[-2000:]}"
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: CI's (TWOTOWER_TEST_REDIS_URL) or one started here on a free port."""
    if os.environ.get("TWOTOWER_TEST_REDIS_URL"):
        yield os.environ["TWOTOWER_TEST_REDIS_URL"]
        return
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server not installed: `make test` and .ci/run install it")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    data, models, index = root / "data", root / "models", root / "index"
    _run("trainer", "prepare", "synthetic", "--out", str(data), "--users", "300", "--items", "200",
         "--interactions", "6000", "--seed", "3")
    cfg = root / "train.json"
    cfg.write_text(json.dumps({"epochs": 2, "batch_size": 256, "model": {"embedding_dim": 16, "id_dim": 16, "hidden": [32]}}))
    fit = _run("trainer", "fit", "--data", str(data), "--out", str(models), "--config", str(cfg), "--no-progress")
    bundle = Path(fit.stdout.strip().splitlines()[-1])
    assert bundle.parent == models and (bundle / "manifest.json").is_file()
    ev = _run("trainer", "evaluate", "--data", str(data), "--model", str(bundle))
    metrics = json.loads(ev.stdout)
    assert EVAL_KEYS | {f"cold_{k}" for k in EVAL_KEYS} <= set(metrics)
    assert metrics["recall@20"] == json.loads((bundle / "manifest.json").read_text())["metrics"]["recall@20"]
    _run("indexer", "rebuild", "--model", str(models), "--data", str(data), "--out", str(index))
    current = index / "current"
    assert current.is_symlink()
    for name in ("embeddings.npy", "item_ids.txt", "manifest.json", "index.faiss"):
        assert (current / name).is_file(), name
    return {"data": data, "models": models, "index": index, "bundle": bundle}


REQUEST = {"user_id": "u7", "features": {"age": 30, "country": "k2", "device": "ios", "interests": ["t1"]},
           "k": 10, "exclude_item_ids": ["i0", "i1"]}


def _check_answer(body: dict, index: Path, bundle: Path) -> None:
    assert body["model_version"] == bundle.name
    assert body["index_version"] == (index / "current").resolve().name
    items = body["items"]
    assert len(items) == 10 and not {"i0", "i1"} & {i["item_id"] for i in items}
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    assert np.load(index / "current" / "embeddings.npy").shape[0] == 200


def _exercise(client, pipeline: dict[str, Path]) -> None:  # noqa: ANN001 - TestClient or httpx.Client
    assert client.get("/healthz").status_code == 200
    deadline = time.time() + 30
    while client.get("/readyz").status_code != 200:
        assert time.time() < deadline, "service never became ready"
        time.sleep(0.2)
    first = client.post("/retrieve", json=REQUEST)
    assert first.status_code == 200, first.text
    second = client.post("/retrieve", json=REQUEST)
    assert (first.json()["cached"], second.json()["cached"]) == (False, True)
    assert first.json()["items"] == second.json()["items"]
    _check_answer(first.json(), pipeline["index"], pipeline["bundle"])
    vec = client.post("/embed", json={"user_id": "u7", "features": REQUEST["features"]}).json()["vector"]
    emb = np.load(pipeline["index"] / "current" / "embeddings.npy")
    ids = (pipeline["index"] / "current" / "item_ids.txt").read_text().splitlines()
    row = {i: n for n, i in enumerate(ids)}
    for it in first.json()["items"]:
        assert it["score"] == pytest.approx(float(emb[row[it["item_id"]]] @ np.asarray(vec)), abs=1e-5)
    bad = client.post("/retrieve", json={**REQUEST, "features": {"age": "old"}})
    assert bad.status_code == 422 and "age" in bad.text


@pytest.mark.parametrize("with_redis", [False, True], ids=["inprocess-cache", "redis"])
def test_asgi(pipeline: dict[str, Path], with_redis: bool, request: pytest.FixtureRequest) -> None:
    from service.app import create_app
    from service.settings import Settings

    over = {}
    if with_redis:
        over = {"redis_url": request.getfixturevalue("redis_url"), "cache_prefix": f"e2e-asgi-{time.time_ns()}"}
    app = create_app(Settings(index_root=pipeline["index"], **over))
    with TestClient(app) as client:
        _exercise(client, pipeline)


@pytest.mark.parametrize("with_redis", [False, True], ids=["inprocess-cache", "redis"])
def test_uvicorn_process(pipeline: dict[str, Path], with_redis: bool, request: pytest.FixtureRequest) -> None:
    port = _free_port()
    env = {**os.environ, "SERVICE_INDEX_ROOT": str(pipeline["index"])}
    env.pop("SERVICE_REDIS_URL", None)
    if with_redis:
        env["SERVICE_REDIS_URL"] = request.getfixturevalue("redis_url")
        env["SERVICE_CACHE_PREFIX"] = f"e2e-proc-{time.time_ns()}"
    proc = subprocess.Popen(
        [str(BIN / "uvicorn"), "service.app:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(base + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "uvicorn did not start"
                time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=10) as client:
            _exercise(client, pipeline)
    finally:
        proc.terminate()
        proc.wait(15)
