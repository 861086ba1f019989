"""The service under load while `indexer update` publishes ten delta versions in a row."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from indexer.rebuild import RebuildConfig, rebuild
from indexer.update import UpdateConfig, update
from indexer.version import load_version
from tests.service.conftest import serve, wait_for
from training.bundle import load_bundle
from training.numpy_tower import UserRecord, UserTower


def test_ten_consecutive_updates_under_load(tmp_path: Path, bundle_a: Path, tiny_dataset: Path) -> None:
    """Zero 5xx, never a removed item, never an answer that mixes two versions: every answer's
    items are live in the version it names, as many as promised, scored with that version's
    vectors (changed items have other vectors in other versions)."""
    data = tmp_path / "data"
    data.mkdir()
    for p in tiny_dataset.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    root = tmp_path / "index"
    rebuild(RebuildConfig(model=bundle_a, data=data, out=root, index="HNSW8", gate_k=10, progress=False))
    items = pd.read_csv(data / "items.csv", dtype=str, keep_default_na=False)
    tower = UserTower.from_model(load_bundle(bundle_a).model)
    users = [(f"u{i}", {"age": 20 + 3 * i}) for i in range(10)]
    uvec = {uid: tower.embed([UserRecord(uid, tower.validate(f))])[0] for uid, f in users}
    versions: dict[str, dict[str, np.ndarray]] = {}

    def remember() -> None:
        v = load_version(root / "current")
        versions[v.index_version] = {i: np.asarray(v.embeddings[r]) for i, r in v.topk.rows.items()}

    remember()
    stop = threading.Event()
    with serve(root, reloader=True, reload_interval_s=0.01) as c:

        def worker(w: int) -> list[tuple[int, dict, str, int]]:
            out = []
            j = 0
            while (not stop.is_set() or j < 5) and j < 5000:
                uid, feats = users[(w + j) % len(users)]
                k = 1000 if j % 4 == 0 else 10  # k >= catalog every fourth request
                r = c.post("/retrieve", json={"user_id": uid, "features": feats, "k": k})
                out.append((r.status_code, r.json() if r.status_code == 200 else {"text": r.text}, uid, k))
                j += 1
            return out

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(worker, w) for w in range(6)]
            try:
                _ten_updates(data, root, items, remember, c)
            finally:
                stop.set()
            results = [x for f in futures for x in f.result()]


    assert len(versions) == 11
    assert [s for s, *_ in results if s != 200] == []
    seen = set()
    for _, body, uid, k in results:
        live = versions.get(body["index_version"])
        assert live is not None, f"unknown index version {body['index_version']}"
        seen.add(body["index_version"])
        got = [it["item_id"] for it in body["items"]]
        assert len(got) == min(k, len(live)) and set(got) <= set(live), "an item that version does not hold"
        np.testing.assert_allclose([it["score"] for it in body["items"]], [live[i] @ uvec[uid] for i in got], atol=1e-5)
    assert len(seen) >= 5, f"the load overlapped only {len(seen)} versions"


def _ten_updates(data: Path, root: Path, items: pd.DataFrame, remember, c) -> None:  # noqa: ANN001
    """Ten updates in a row (3 feature changes, 2 new, 2 removed items each), each served
    before the next starts."""
    rng = np.random.default_rng(0)
    for step in range(10):
        idx = rng.permutation(len(items))
        items.loc[items.index[idx[:3]], "category"] = f"c_step{step}"  # re-embedded
        new = items.iloc[idx[3:5]].copy()
        new["item_id"] = [f"new{step}-{i}" for i in range(2)]
        items = pd.concat([items.drop(items.index[idx[5:7]]), new], ignore_index=True)
        items.to_csv(data / "items.csv", index=False)
        holder = c.app.state.service.holder
        served_base = holder.current.verified_base.topk
        res = update(UpdateConfig(root=root, data=data, gate_k=10, keep=20, max_delta=0.5))
        remember()
        wait_for(lambda name=res.path.name: c.get("/readyz").json().get("index_version") == name, what="the updated version")
        # the reload shared the base it already served instead of reading it again
        assert holder.current.topk.base is served_base
