"""The service imports, loads a version and serves with torch, pandas and pyarrow absent.

The serving image has none of them (Dockerfile target `serve`): the request path and version
loading run on numpy (`training.bundle.read_bundle_arrays`, `training.numpy_tower.UserTower`).
A subprocess installs, before anything else is imported, a meta-path finder that makes those
packages unimportable, then imports `service.app`, loads an index version built here by the
normal trainer and `indexer rebuild`, and answers /retrieve through a TestClient. The answer is
compared with the torch model's own: its user vector against embeddings.npy, exact top-k.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from indexer.rebuild import RebuildConfig, rebuild
from indexer.version import read_item_ids
from training.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "pandas", "pyarrow")
REQUEST = {"user_id": "u3", "features": {"age": 31, "country": "k1", "device": "ios", "interests": "t0|t3"}, "k": 10,
           "exclude_item_ids": ["i1"]}

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = {blocked!r}
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{{name}} is blocked in this test (the serving image has no {{name}})")
            return None

    sys.meta_path.insert(0, Block())

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(index_root={index_root!r}, access_log=False), start_reloader=False)
    with TestClient(app) as client:
        outcome = app.state.service.reloader.check_once()
        assert outcome == "swapped", (outcome, app.state.service.reloader.last_error)
        r = client.post("/retrieve", json={request!r})
        assert r.status_code == 200, r.text
        ready = client.get("/readyz").json()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({{"retrieve": r.json(), "ready": ready, "loaded": loaded, "attempts": sorted(set(attempts))}}))
    """
)


@pytest.fixture(scope="module")
def built_index(tiny_bundle_path: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index root built by the real `indexer rebuild` from the shared trained bundle."""
    root = tmp_path_factory.mktemp("torch_free") / "index"
    rebuild(RebuildConfig(model=tiny_bundle_path, data=tiny_dataset, out=root, progress=False))
    return root


def test_the_finder_really_blocks() -> None:
    """The blocker itself: with it installed, `import torch` fails (else the test below proves nothing)."""
    prelude = SCRIPT.split("from fastapi")[0].format(blocked=BLOCKED)
    code = prelude + "\ntry:\n    import torch\nexcept ImportError as e:\n    print('blocked:', e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    assert out.stdout.startswith("blocked: torch is blocked"), out.stdout + out.stderr


def test_service_serves_with_torch_pandas_pyarrow_unimportable(built_index: Path) -> None:
    code = SCRIPT.format(blocked=BLOCKED, index_root=str(built_index), request=REQUEST)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert out.returncode == 0, f"service failed without torch/pandas/pyarrow:\n{out.stderr[-4000:]}"
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []

    # the in-process torch answer: the trained model's user vector, exact top-k over the catalog
    current = (built_index / "current").resolve()
    model = load_bundle(current / "model").model
    vec = model.embed_users([{"user_id": REQUEST["user_id"], "features": REQUEST["features"]}])[0]
    emb = np.load(current / "embeddings.npy")
    ids = read_item_ids(current / "item_ids.txt")
    scores = emb @ vec
    order = [i for i in np.argsort(-scores, kind="stable") if ids[i] not in REQUEST["exclude_item_ids"]][: REQUEST["k"]]

    items = got["retrieve"]["items"]
    assert [it["item_id"] for it in items] == [ids[i] for i in order]
    np.testing.assert_allclose([it["score"] for it in items], scores[order], atol=1e-5)
    assert got["retrieve"]["model_version"] == load_bundle(current / "model").version
    assert got["ready"]["index_version"] == current.name
