"""Request-time history through the service (issue 18, INTERFACES.md §4): what the tower pools,
what is refused, what is counted, and what the cache may reuse."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from service.settings import Settings
from tests.service.conftest import FEATURES, serve
from tests.service.test_api import only_error
from training.bundle import load_bundle


def _vec(client, body: dict) -> tuple[np.ndarray, bool]:  # noqa: ANN001
    r = client.post("/embed", json=body)
    assert r.status_code == 200, r.text
    return np.array(r.json()["vector"], np.float32), r.json()["cached"]


def _metric(client, outcome: str) -> float:  # noqa: ANN001
    text = client.get("/metrics").text
    m = re.search(rf'^service_history_ids_total{{outcome="{outcome}"}} ([0-9.e+]+)$', text, re.M)
    assert m, text[:2000]
    return float(m.group(1))


def test_history_is_pooled_as_the_torch_model_pools_it(index_root: Path, bundle_a: Path, tiny_dataset: Path) -> None:
    """/embed and /retrieve with `history` give the vector of the bundle's torch model for the
    same (id, features, history), with the history's catalog vectors folded in by the bundle's
    `HistoryFoldIn` (as `trainer evaluate` does); without `history` exactly the vector of before."""
    import pandas as pd

    from training.dataset import read_dataset
    from training.evaluate import history_item_vectors
    from training.numpy_tower import HistoryFoldIn

    model = load_bundle(bundle_a).model
    rule = HistoryFoldIn.from_config(model.cfg)
    assert rule is not None  # the default config folds the history in
    items = read_dataset(tiny_dataset).items
    catalog, item_vecs = pd.Index(items["item_id"].astype(str)), model.embed_items(items)
    bodies = [
        {"user_id": "u1", "features": FEATURES},
        {"user_id": "u1", "features": FEATURES, "history": ["i3", "i1", "i4"]},
        {"user_id": "u1", "features": FEATURES, "history": []},
        {"user_id": "nobody", "history": ["i2", "fresh-item", "i9"]},
        {"history": [f"i{j}" for j in range(80)]},  # longer than the model's history length: the newest count
    ]
    want = rule.apply(model.embed_users(bodies), history_item_vectors(model, [b.get("history") for b in bodies], catalog, item_vecs))
    with serve(index_root) as c:
        for body, ref in zip(bodies, want, strict=True):
            got, _ = _vec(c, body)
            np.testing.assert_allclose(got, ref, atol=1e-5)
        plain, _ = _vec(c, bodies[0])
        assert np.abs(_vec(c, bodies[1])[0] - plain).max() > 1e-3  # the history changes the user


def test_cache_never_reuses_a_vector_across_histories(index_root: Path) -> None:
    body = {"user_id": "u1", "features": FEATURES}
    with serve(index_root) as c:
        v0, cached = _vec(c, body)
        assert not cached and _vec(c, body)[1]
        a = {**body, "history": ["i3", "i1"]}
        va, cached = _vec(c, a)
        assert not cached and np.abs(va - v0).max() > 1e-3
        hit, cached = _vec(c, a)
        assert cached and np.array_equal(hit, va)
        b = {**body, "history": ["i1", "i3"]}  # same items, other order: another history
        vb, cached = _vec(c, b)
        assert not cached
        e, cached = _vec(c, {**body, "history": []})  # empty history: not the no-history key
        assert not cached and np.abs(e - v0).max() > 1e-3
        # the key holds the USED history: an id the version does not know changes nothing
        again, cached = _vec(c, {**body, "history": ["never-seen", "i3", "i1"]})
        assert cached and np.array_equal(again, va)
        r = c.post("/retrieve", json={**a, "k": 5}).json()
        assert r["cached"] is True  # /retrieve reuses /embed's vector for the same history


def test_unknown_history_ids_are_ignored_and_counted(index_root: Path) -> None:
    with serve(index_root) as c:
        before_ignored, before_used = _metric(c, "ignored"), _metric(c, "used")
        r = c.post("/retrieve", json={"history": ["fresh-1", "i2", "fresh-2"], "k": 3})
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        r = c.post("/retrieve/batch", json={"requests": [{"history": ["fresh-3"]}, {"k": 2}]})
        assert r.status_code == 200
        assert _metric(c, "ignored") - before_ignored == 3
        assert _metric(c, "used") - before_used == 1


@pytest.mark.parametrize(
    ("path", "make_body", "field"),
    [
        ("/retrieve", lambda h: {"history": h}, "history"),
        ("/embed", lambda h: {"history": h}, "history"),
        ("/retrieve/batch", lambda h: {"requests": [{}, {"history": h}]}, "requests.1.history"),
    ],
)
def test_a_history_over_the_limit_is_a_422_never_cut(index_root: Path, path: str, make_body, field: str) -> None:  # noqa: ANN001
    with serve(index_root, max_history=4) as c:
        assert c.post(path, json=make_body(["i1"] * 4)).status_code == 200
        err = only_error(c.post(path, json=make_body(["i1"] * 5)))
        assert err["field"] == field and err["loc"][0] == "body", err
        assert only_error(c.post(path, json=make_body("i1")))["field"] == field  # a string is not a list


def test_default_history_limit_is_at_least_100(index_root: Path) -> None:
    with serve(index_root) as c:
        assert c.post("/retrieve", json={"history": ["i1"] * 100, "k": 2}).status_code == 200
    assert Settings.model_fields["max_history"].default >= 100


def test_retrieve_with_history_agrees_with_trainer_evaluate(index_root: Path, bundle_a: Path, tiny_dataset: Path) -> None:
    """EVAL.md's request-time history protocols measured through POST /retrieve (user id,
    features, `history`, the protocol's exclusions) give `trainer evaluate`'s figures
    (`training.evaluate.history_metrics`) within 0.005."""
    import pandas as pd

    from training.dataset import read_dataset
    from training.evaluate import history_metrics, ranking_metrics
    from training.history_eval import history_protocols
    from training.split import split_interactions

    ds = read_dataset(tiny_dataset)
    split = split_interactions(ds.interactions)
    figures = history_metrics(load_bundle(bundle_a).model, ds, split)
    item_ids = ds.items["item_id"].astype(str).tolist()
    item_index = pd.Index(item_ids)
    is_tail = ~item_index.isin(list(split.head_items))
    specs = ds.schema.user
    users = ds.users.set_index("user_id")

    def features(uid: str) -> dict:
        row = users.loc[uid]
        return {k: (float(v) if specs[k].type == "continuous" else str(v)) for k, v in row.items() if k in specs and v != ""}

    protocols = history_protocols(split, item_ids)
    assert len(protocols["cold_m3"]) >= 5 and len(protocols["warm_fresh"]) >= 20
    with serve(index_root) as c:
        for name, p in protocols.items():
            tops = np.full((len(p), 100), -1, dtype=np.int64)
            for j, (uid, hist, ex) in enumerate(zip(p.user_ids, p.history, p.exclude, strict=True)):
                body = {"user_id": uid, "features": features(uid), "history": hist, "k": 100,
                        "exclude_item_ids": [item_ids[r] for r in ex]}
                r = c.post("/retrieve", json=body)
                assert r.status_code == 200, r.text
                got = item_index.get_indexer([it["item_id"] for it in r.json()["items"]])
                tops[j, : len(got)] = got
            served = ranking_metrics(tops, p.relevant, is_tail, len(item_ids))
            for m in ("recall@20", "recall@100", "ndcg@20"):
                assert abs(served[m] - figures[f"{name}_{m}"]) <= 0.005, (name, m, served[m], figures[f"{name}_{m}"])


def test_the_control_character_pattern_is_unicode_category_cc() -> None:
    """service.schemas finds control characters with a regex (a per-character unicodedata loop
    cost ~1 µs per id, 50 µs on a 50-id history): it must be exactly category Cc."""
    import sys
    import unicodedata

    from service.schemas import _CONTROL

    cc = {c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cc"}
    assert {c for c in range(sys.maxunicode + 1) if _CONTROL.match(chr(c))} == cc
