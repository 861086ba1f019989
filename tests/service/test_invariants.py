"""DEVELOPERS.md invariants 1 and 2 as the service sees them.

1. Serving scores are plain cosines: no logQ or popularity term. For a model trained with logQ,
   every returned score equals dot(/embed vector, the item's row of embeddings.npy), and
   changing the popularity the logQ correction used (item_counts.json) changes nothing served.
2. A cached user vector is never reused across model versions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.service.conftest import FEATURES, RedisServer, serve
from tests.service.helpers import copy_version, replace_bundle_file, switch_current, write_version

USERS = [
    {"user_id": "u1", "features": FEATURES},
    {"user_id": "u7"},
    {"features": {"age": 65, "device": "android", "interests": ["t2"]}},
    {"user_id": "nobody", "features": {"country": "k3"}},
    # request-time histories (issue 18): the scores stay plain cosines of the /embed vector
    {"user_id": "u1", "features": FEATURES, "history": ["i3", "i1", "i4"]},
    {"features": {"country": "k3"}, "history": ["i2", "not-in-the-catalog", "i9"]},
    {"user_id": "u7", "history": []},
]


def served_catalog(client) -> tuple[np.ndarray, dict[str, int]]:  # noqa: ANN001
    """embeddings.npy and item row by id of the version the client serves."""
    path = client.app.state.service.holder.current.path
    emb = np.load(path / "embeddings.npy")
    ids = (path / "item_ids.txt").read_text().splitlines()
    return emb, {item: row for row, item in enumerate(ids)}


def test_invariant1_scores_are_plain_cosines_of_a_logq_model(index_root: Path, bundle_a: Path) -> None:
    train_cfg = json.loads((bundle_a / "config.json").read_text())["train"]
    assert train_cfg["logq"] is True, "the shared tiny bundle must be trained with logQ"
    with serve(index_root) as c:
        emb, row_of = served_catalog(c)
        for body in USERS:
            vec = np.array(c.post("/embed", json=body).json()["vector"], np.float32)
            items = c.post("/retrieve", json={**body, "k": 50}).json()["items"]
            assert len(items) == 50
            for it in items:
                assert abs(it["score"] - float(emb[row_of[it["item_id"]]] @ vec)) <= 1e-5
            truth = np.argsort(-(emb @ vec), kind="stable")[:50]
            assert [it["item_id"] for it in items] == [list(row_of)[i] for i in truth]


def test_invariant1_popularity_does_not_change_what_is_served(index_root: Path) -> None:
    with serve(index_root) as c:
        before = [c.post("/retrieve", json={**b, "k": 30}).json() for b in USERS]
        current = c.app.state.service.holder.current.path
        counts = json.loads((current / "model" / "item_counts.json").read_text())
        assert counts, "item_counts.json should hold the training clicks"
        # invert the popularity: the most clicked item becomes the least clicked, and so on
        ranked = sorted(counts, key=counts.get)
        inverted = {item: counts[ranked[-1 - i]] * 1000 + i for i, item in enumerate(ranked)}
        new = copy_version(current, index_root, current.name + "-repop")
        replace_bundle_file(new, "item_counts.json", json.dumps(inverted).encode())
        switch_current(index_root, new.name)
        assert c.app.state.service.reloader.check_once() == "swapped"
        after = [c.post("/retrieve", json={**b, "k": 30}).json() for b in USERS]
    for x, y in zip(before, after, strict=True):
        assert y["index_version"] != x["index_version"] and y["model_version"] == x["model_version"]
        assert y["items"] == x["items"]  # same ids, same order, same scores


def test_invariant2_cached_vectors_never_cross_model_versions(
    index_root: Path, bundle_b: Path, catalog: tuple[np.ndarray, list[str]], redis_server: RedisServer
) -> None:
    body = {"user_id": "u1", "features": FEATURES}
    with serve(index_root, redis_url=redis_server.url) as c:
        reloader = c.app.state.service.reloader
        a_dir = c.app.state.service.holder.current.path
        a1 = c.post("/embed", json=body).json()
        a2 = c.post("/embed", json=body).json()
        assert (a1["cached"], a2["cached"]) == (False, True) and a1["vector"] == a2["vector"]

        b_dir = write_version(index_root, bundle_b, catalog[0], catalog[1])
        assert reloader.check_once() == "swapped"
        b1 = c.post("/embed", json=body).json()
        r = c.post("/retrieve", json=body).json()
        assert b1["model_version"] != a1["model_version"]
        assert b1["cached"] is False  # A's cached vector is not B's
        assert b1["vector"] != a1["vector"]
        assert r["cached"] is True and r["model_version"] == b1["model_version"]

        switch_current(index_root, a_dir.name)
        assert reloader.check_once() == "swapped"
        a3 = c.post("/embed", json=body).json()
        assert a3["cached"] is True and a3["vector"] == a1["vector"]
        assert b_dir.exists()

    keys = [k.decode() for k in redis_server.client().keys("*")]
    assert len(keys) == 2
    assert {a1["model_version"], b1["model_version"]} == {k.split(":")[2] for k in keys}
