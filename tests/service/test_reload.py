"""Hot reload: new versions are picked up, bad ones refused, and a swap never mixes versions."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.service.conftest import FEATURES, serve, wait_for
from tests.service.helpers import (
    edit_manifest,
    read_manifest,
    replace_file,
    switch_current,
    unit_rows,
    write_version,
)
from training.bundle import load_bundle
from training.numpy_tower import UserRecord, UserTower


def pair(client) -> tuple[str, str]:  # noqa: ANN001
    ready = client.get("/readyz").json()
    return ready["model_version"], ready["index_version"]


def reload_count(client, result: str) -> float:  # noqa: ANN001
    m = client.app.state.service.metrics
    return m.registry.get_sample_value("service_reloads_total", {"result": result}) or 0.0


def test_background_reloader_picks_up_a_new_version(
    index_root: Path, bundle_b: Path, catalog: tuple[np.ndarray, list[str]]
) -> None:
    with serve(index_root, reloader=True, reload_interval_s=0.05) as c:
        old = pair(c)
        new_dir = write_version(index_root, bundle_b, catalog[0], catalog[1])
        wait_for(lambda: pair(c)[1] == new_dir.name, what="the new version")
        r = c.post("/retrieve", json={"user_id": "u1"}).json()
        assert (r["model_version"], r["index_version"]) == pair(c) != old
        assert r["model_version"] == read_manifest(new_dir)["model_version"]
        assert reload_count(c, "success") == 2


def test_a_swap_is_in_the_metrics_before_it_is_served(
    index_root: Path, bundle_b: Path, catalog: tuple[np.ndarray, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever sees the new version on /readyz also sees it counted and labelled in /metrics,
    however long the GC pass after the swap takes (it is held here until the check is done)."""
    from service import state

    with serve(index_root) as c:
        reloader = c.app.state.service.reloader
        release = threading.Event()
        real_freeze = state._freeze_heap

        def slow_freeze() -> float:
            assert release.wait(30)
            return real_freeze()

        monkeypatch.setattr(state, "_freeze_heap", slow_freeze)
        new_dir = write_version(index_root, bundle_b, catalog[0], catalog[1])
        poll = threading.Thread(target=reloader.check_once)
        poll.start()
        try:
            wait_for(lambda: pair(c)[1] == new_dir.name, what="the swap")
            assert reload_count(c, "success") == 2
            info = c.app.state.service.metrics.registry.get_sample_value(
                "service_loaded_version_info",
                {"model_version": read_manifest(new_dir)["model_version"], "index_version": new_dir.name},
            )
            assert info == 1
        finally:
            release.set()
            poll.join()


def test_a_swapped_out_version_is_freed_by_reference_counting(
    index_root: Path, bundle_b: Path, catalog: tuple[np.ndarray, list[str]]
) -> None:
    """The swap freezes the heap (gc.freeze) instead of walking it; that only frees the old
    version if it holds no reference cycle. With the collector off, it must be gone at once."""
    import gc
    import weakref

    with serve(index_root) as c:
        holder = c.app.state.service.holder
        old = weakref.ref(holder.current)
        write_version(index_root, bundle_b, catalog[0], catalog[1])
        gc.disable()
        try:
            assert c.app.state.service.reloader.check_once() == "swapped"
            assert old() is None, "the swapped-out version is still alive: a reference cycle or a leak"
        finally:
            gc.enable()


def test_a_swap_does_not_walk_what_earlier_swaps_froze(
    index_root: Path, bundle_b: Path, catalog: tuple[np.ndarray, list[str]]
) -> None:
    """The cost of a swap must not grow with the swaps before it: the collection it runs walks
    only objects that are not frozen yet. A sentinel frozen by the first swap is looked for
    among the collector's objects while the second swap's collection runs."""
    import gc

    sentinel = [object()]  # a tracked container, alive across both swaps
    seen: list[bool] = []

    def during_collection(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            seen.append(any(o is sentinel for o in gc.get_objects()))

    with serve(index_root) as c:
        reloader = c.app.state.service.reloader
        write_version(index_root, bundle_b, catalog[0], catalog[1])
        assert reloader.check_once() == "swapped"  # freezes the sentinel
        assert not any(o is sentinel for o in gc.get_objects())
        switch_current(index_root, sorted(p.name for p in index_root.iterdir() if p.name[0].isdigit())[0])
        gc.callbacks.append(during_collection)
        try:
            assert reloader.check_once() == "swapped"
        finally:
            gc.callbacks.remove(during_collection)
    assert seen, "the swap ran no full collection"
    assert not any(seen), "a swap unfroze the heap: every swap would walk every object again"


def _corrupt_checksum(d: Path, dim: int) -> None:
    data = bytearray((d / "embeddings.npy").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the payload, manifest unchanged
    (d / "embeddings.npy").write_bytes(bytes(data))


def _garbage_index_rehashed(d: Path, dim: int) -> None:
    replace_file(d, "index.faiss", b"\x00garbage" * 64, rehash=True)


def _truncated_faiss(d: Path, dim: int) -> None:
    data = (d / "index.faiss").read_bytes()
    replace_file(d, "index.faiss", data[: len(data) // 2], rehash=True)


def _missing_item_ids(d: Path, dim: int) -> None:
    (d / "item_ids.txt").unlink()


def _extra_item_id(d: Path, dim: int) -> None:
    text = (d / "item_ids.txt").read_text() + "extra\n"
    replace_file(d, "item_ids.txt", text.encode(), rehash=True)


def _model_version_mismatch(d: Path, dim: int) -> None:
    edit_manifest(d, model_version="20990101T000000000Z-ffffff")


BAD_VERSIONS = {
    "corrupt file (checksum)": _corrupt_checksum,
    "garbage index with a matching checksum": _garbage_index_rehashed,
    "truncated index with a matching checksum": _truncated_faiss,
    "missing item_ids.txt": _missing_item_ids,
    "item count mismatch": _extra_item_id,
    "mismatched model version": _model_version_mismatch,
}


@pytest.mark.parametrize("kind", list(BAD_VERSIONS))
def test_bad_version_is_refused_and_the_old_one_keeps_serving(
    kind: str, index_root: Path, bundle_a: Path, catalog: tuple[np.ndarray, list[str]]
) -> None:
    emb, ids = catalog
    with serve(index_root) as c:
        good = pair(c)
        bad = write_version(index_root, bundle_a, emb, ids, switch=False)
        BAD_VERSIONS[kind](bad, emb.shape[1])
        switch_current(index_root, bad.name)
        reloader = c.app.state.service.reloader
        assert reloader.check_once() == "refused"
        assert bad.name in (reloader.last_error or "")
        assert reloader.check_once() == "skipped"  # not retried every poll
        assert pair(c) == good
        r = c.post("/retrieve", json={"user_id": "u1", "features": FEATURES})
        assert r.status_code == 200
        assert (r.json()["model_version"], r.json()["index_version"]) == good
        assert reload_count(c, "failure") == 1
        assert 'service_reloads_total{result="failure"} 1.0' in c.get("/metrics").text
        # the next good version is taken
        fixed = write_version(index_root, bundle_a, emb, ids)
        assert reloader.check_once() == "swapped"
        assert pair(c)[1] == fixed.name


def test_dimension_mismatch_is_refused(index_root: Path, bundle_a: Path, catalog: tuple[np.ndarray, list[str]]) -> None:
    """Index and embeddings of dimension 8 for a tower of dimension 16 (consistent checksums)."""
    ids = catalog[1]
    with serve(index_root) as c:
        good = pair(c)
        write_version(index_root, bundle_a, unit_rows(len(ids), 8), ids)
        assert c.app.state.service.reloader.check_once() == "refused"
        assert "dimension" in c.app.state.service.reloader.last_error
        assert pair(c) == good
        assert c.post("/retrieve", json={}).status_code == 200


def test_first_version_bad_means_not_ready(tmp_path: Path, bundle_a: Path, catalog: tuple[np.ndarray, list[str]]) -> None:
    root = tmp_path / "index"
    d = write_version(root, bundle_a, catalog[0], catalog[1])
    edit_manifest(d, model_version="20990101T000000000Z-ffffff")
    with serve(root, load=False) as c:
        assert c.app.state.service.reloader.check_once() == "refused"
        r = c.get("/readyz")
        assert r.status_code == 503 and d.name in r.json()["reason"]
        assert c.post("/retrieve", json={}).status_code == 503


def test_swap_under_concurrent_load_never_mixes_versions(
    tmp_path: Path, bundle_a: Path, bundle_b: Path
) -> None:
    """Two versions with different models AND different catalogs; `current` flips between them
    while 8 threads send requests. Every answer must name one pair, hold only that pair's items,
    and score them with that pair's user tower — a mixed answer cannot pass all three."""
    n, d = 400, 16
    root = tmp_path / "index"
    emb = {"a": unit_rows(n, d, seed=11), "b": unit_rows(n, d, seed=12)}
    dirs = {
        "a": write_version(root, bundle_a, emb["a"], [f"a{i}" for i in range(n)], switch=False),
        "b": write_version(root, bundle_b, emb["b"], [f"b{i}" for i in range(n)], switch=False),
    }
    pairs = {key: (read_manifest(p)["model_version"], p.name) for key, p in dirs.items()}
    towers = {"a": UserTower.from_model(load_bundle(bundle_a).model), "b": UserTower.from_model(load_bundle(bundle_b).model)}
    users = [(f"u{i}", {"age": 20 + i, "country": f"k{i % 5}"}) for i in range(12)]
    vecs = {
        key: {uid: t.embed([UserRecord(uid, t.validate(f))])[0] for uid, f in users} for key, t in towers.items()
    }
    switch_current(root, dirs["a"].name)

    stop = threading.Event()

    def flipper() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            switch_current(root, dirs["b" if i % 2 else "a"].name)
            time.sleep(0.03)

    with serve(root, reloader=True, reload_interval_s=0.01) as c:

        def worker(w: int) -> list[tuple[int, dict, str]]:
            out = []
            for j in range(40):
                uid, feats = users[(w * 7 + j) % len(users)]
                r = c.post("/retrieve", json={"user_id": uid, "features": feats, "k": 5, "exclude_item_ids": ["a1", "b1"]})
                out.append((r.status_code, r.json() if r.status_code == 200 else {"text": r.text}, uid))
            return out

        flip = threading.Thread(target=flipper)
        flip.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                results = [x for chunk in pool.map(worker, range(8)) for x in chunk]
        finally:
            stop.set()
            flip.join()
        reloads = reload_count(c, "success")

    assert [s for s, _, _ in results if s != 200] == []
    seen = set()
    for _, body, uid in results:
        got = (body["model_version"], body["index_version"])
        key = next((k for k, p in pairs.items() if p == got), None)
        assert key is not None, f"unknown version pair {got}"
        seen.add(key)
        rows = []
        for it in body["items"]:
            assert it["item_id"][0] == key, f"{it['item_id']} in an answer from version {key}"
            rows.append(int(it["item_id"][1:]))
        assert len(rows) == 5
        np.testing.assert_allclose(
            [it["score"] for it in body["items"]], emb[key][rows] @ vecs[key][uid], atol=1e-5
        )
    assert seen == {"a", "b"}, "the load never overlapped a swap"
    assert reloads >= 3


def test_a_version_built_by_indexer_rebuild_is_served(index_root: Path, bundle_b: Path, tiny_dataset: Path) -> None:
    """The real writer (`indexer rebuild`) and the service agree on the version format."""
    from indexer.rebuild import RebuildConfig, rebuild

    with serve(index_root) as c:
        result = rebuild(RebuildConfig(model=bundle_b, data=tiny_dataset, out=index_root, index="HNSW8", progress=False))
        assert c.app.state.service.reloader.check_once() == "swapped"
        assert pair(c) == (read_manifest(result.path)["model_version"], result.path.name)
        items = c.post("/retrieve", json={"user_id": "u1", "features": FEATURES, "k": 10}).json()["items"]
        assert len(items) == 10


def _quantized(emb: np.ndarray, factory: str):  # noqa: ANN202 - faiss.Index
    from indexer import faiss_index as fi

    index = fi.build_index(emb, factory)
    if fi.index_family(index) == "ivf":
        fi.apply_search_params(index, {"nprobe": 4})  # stored in index.faiss
    return index


@pytest.mark.parametrize("factory", ["HNSW16,SQ8", "HNSW16,SQ4", "IVF4,SQ8", "IVF4,PQ4x4"])
def test_quantized_index_is_served_with_exact_cosines(
    factory: str, index_root: Path, catalog: tuple[np.ndarray, list[str]], bundle_a: Path
) -> None:
    """A lossy index's scores never equal embeddings.npy's; it must be served anyway, exactly scored."""
    emb, ids = catalog
    with serve(index_root) as c:
        v = write_version(index_root, bundle_a, emb, ids, factory=factory, index=_quantized(emb, factory))
        reloader = c.app.state.service.reloader
        assert reloader.check_once() == "swapped", reloader.last_error
        assert pair(c)[1] == v.name
        body = {"user_id": "u1", "features": FEATURES}
        vec = np.asarray(c.post("/embed", json=body).json()["vector"], dtype=np.float64)
        items = c.post("/retrieve", json={**body, "k": 10}).json()["items"]
        assert len(items) == 10
        row = {item: i for i, item in enumerate(ids)}
        exact = [float(np.float32(emb[row[it["item_id"]]].astype(np.float64) @ vec)) for it in items]
        assert [it["score"] for it in items] == pytest.approx(exact, abs=1e-6)  # plain cosines


def test_quantized_index_over_other_rows_is_refused(
    index_root: Path, catalog: tuple[np.ndarray, list[str]], bundle_a: Path
) -> None:
    """The lossy tolerance is the index's own quantization error: a shifted row order still fails."""
    emb, ids = catalog
    with serve(index_root) as c:
        good = pair(c)
        shifted = np.ascontiguousarray(np.roll(emb, len(emb) // 2, axis=0))
        write_version(index_root, bundle_a, emb, ids, factory="HNSW16,SQ8", index=_quantized(shifted, "HNSW16,SQ8"))
        reloader = c.app.state.service.reloader
        assert reloader.check_once() == "refused"
        assert "does not hold embeddings.npy's rows" in (reloader.last_error or "")
        assert pair(c) == good
