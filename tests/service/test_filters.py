"""Attribute filters on /retrieve, /retrieve/batch and /similar, against a numpy oracle over the
version's own embeddings and attribute cells (INTERFACES.md §4)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from indexer.attributes import AttributeTable
from tests.indexer.attribute_oracle import CONDITIONS, SPECS, oracle_mask, random_items
from tests.service.conftest import FEATURES, serve
from tests.service.helpers import read_manifest, switch_current, unit_rows, write_version

USER = {"user_id": "u1", "features": FEATURES}


@pytest.fixture(scope="module")
def cells(catalog):
    """The attribute cells of the tiny catalog's items (row i = catalog row i)."""
    return random_items(len(catalog[1]), seed=11)


def write_filtered(root: Path, bundle: Path, catalog, cells, **kw) -> Path:  # noqa: ANN001
    return write_version(root, bundle, catalog[0], catalog[1], attributes=AttributeTable.from_frame(cells, SPECS), **kw)


@pytest.fixture
def filtered_root(tmp_path: Path, bundle_a: Path, catalog, cells) -> Path:
    root = tmp_path / "index"
    write_filtered(root, bundle_a, catalog, cells)
    return root


def exact(emb: np.ndarray, ids: list[str], vec: np.ndarray, k: int, mask: np.ndarray, exclude=()) -> list[str]:  # noqa: ANN001
    rows = np.array([r for r in np.flatnonzero(mask) if ids[r] not in set(exclude)], dtype=np.int64)
    scores = emb[rows].astype(np.float64) @ np.asarray(vec, dtype=np.float64)
    return [ids[r] for r in rows[np.lexsort((rows, -scores))][:k]]


def user_vector(c) -> np.ndarray:  # noqa: ANN001
    return np.array(c.post("/embed", json=USER).json()["vector"])


FILTERS = [{n: c} for n, conds in CONDITIONS.items() for c in conds] + [
    {"color": {"in": ["c0", "c1", "c2"]}, "labels": {"any": ["t1", "t2", "t3"]}},
    {"cost": {"gte": 20, "lte": 80}, "in_stock": True, "color": {"not_in": ["c0"]}},
    {"color": "nope"},  # zero items
]


def test_every_condition_on_retrieve_matches_the_oracle(filtered_root, catalog, cells):
    emb, ids = catalog
    exclude = [ids[0], ids[5], "not-in-catalog"]
    with serve(filtered_root) as c:
        vec = user_vector(c)
        for filt in FILTERS:
            r = c.post("/retrieve", json={**USER, "k": 10, "exclude_item_ids": exclude, "filter": filt})
            assert r.status_code == 200, (filt, r.text)
            got = [it["item_id"] for it in r.json()["items"]]
            want = exact(emb, ids, vec, 10, oracle_mask(cells, filt), exclude)
            assert got == want, filt
            rows = [ids.index(i) for i in got]
            np.testing.assert_allclose([it["score"] for it in r.json()["items"]], emb[rows] @ vec, atol=1e-5)


@pytest.mark.parametrize("k", [1, 50, 1000])
def test_k_beyond_the_allowed_set_returns_every_allowed_item(filtered_root, catalog, cells, k):
    emb, ids = catalog
    filt = {"color": "c5"}  # a handful of items
    mask = oracle_mask(cells, filt)
    assert 0 < mask.sum() < 50
    with serve(filtered_root) as c:
        got = [it["item_id"] for it in c.post("/retrieve", json={**USER, "k": k, "filter": filt}).json()["items"]]
        assert got == exact(emb, ids, user_vector(c), k, mask)
        assert len(got) == min(k, int(mask.sum()))


def test_batch_applies_each_request_its_own_filter(filtered_root, catalog, cells):
    emb, ids = catalog
    filters = [{"color": "c1"}, None, {"cost": {"lte": 30}}, {"labels": {"all": ["t1"]}}, {"in_stock": {"exists": False}}]
    body = {"requests": [{**USER, "k": 8, **({"filter": f} if f else {})} for f in filters]}
    with serve(filtered_root) as c:
        vec = user_vector(c)
        r = c.post("/retrieve/batch", json=body)
        assert r.status_code == 200, r.text
        for f, res in zip(filters, r.json()["results"], strict=True):
            mask = oracle_mask(cells, f) if f else np.ones(len(ids), dtype=bool)
            assert [it["item_id"] for it in res["items"]] == exact(emb, ids, vec, 8, mask)


@pytest.mark.parametrize(
    ("filt", "field", "message"),
    [
        ({"nope": "x"}, "filter.nope", "unknown attribute"),
        ({"color": 3}, "filter.color", "string values"),
        ({"color": {"in": []}}, "filter.color", "at least one value"),
        ({"cost": {"gte": "1"}}, "filter.cost", "must be a number"),
        ({"color": {"in": ["a"] * 4}}, "filter.color", "at most 3"),
        ({"color": {"regex": "c."}}, "filter.color", "unknown operator"),
        ({"labels": {"gte": 1}}, "filter.labels", "does not apply"),
        ({"in_stock": "true"}, "filter.in_stock", "bool values"),
        ([["color", "c1"]], "filter", ""),
    ],
)
def test_bad_filters_are_422_naming_the_attribute(filtered_root, filt, field, message):
    with serve(filtered_root, max_filter_values=3) as c:
        for path, body in [("/retrieve", {**USER, "filter": filt}), ("/similar", {"item_id": "i1", "filter": filt})]:
            r = c.post(path, json=body)
            assert r.status_code == 422, (path, r.text)
            (err,) = r.json()["detail"]
            assert err["field"] == field and message in err["msg"], err


@pytest.mark.parametrize("bound", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_bound_is_422(filtered_root, bound):
    with serve(filtered_root) as c:
        raw = b'{"filter": {"cost": {"lte": %s}}}' % bound
        r = c.post("/retrieve", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert r.json()["detail"][0]["field"] == "filter.cost"


def test_too_many_attributes_is_422(filtered_root):
    with serve(filtered_root, max_filter_attributes=2) as c:
        r = c.post("/retrieve", json={"filter": {"color": "c1", "cost": 1, "in_stock": True}})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "filter"


def test_batch_error_names_the_request(filtered_root):
    with serve(filtered_root) as c:
        r = c.post("/retrieve/batch", json={"requests": [{"filter": {"color": "c1"}}, {"filter": {"colour": "c1"}}]})
        assert r.status_code == 422
        assert r.json()["detail"][0]["field"] == "requests.1.filter.colour"


def test_a_version_without_attributes_refuses_any_filter(index_root):
    with serve(index_root) as c:
        for path, body in [("/retrieve", {"filter": {"color": "c1"}}), ("/similar", {"item_id": "i1", "filter": {"a": 1}}),
                           ("/retrieve/batch", {"requests": [{}, {"filter": {"color": "c1"}}]})]:
            r = c.post(path, json=body)
            assert r.status_code == 422, r.text
            (err,) = r.json()["detail"]
            assert err["field"].endswith("filter") and "no filterable attributes" in err["msg"]
        # no filter, a null one or an empty one: answered as before
        for extra in ({}, {"filter": None}, {"filter": {}}):
            assert len(c.post("/retrieve", json={**USER, "k": 5, **extra}).json()["items"]) == 5


def test_strategies_are_counted(filtered_root):
    with serve(filtered_root) as c:
        for _ in range(3):
            c.post("/retrieve", json={**USER, "filter": {"color": "c1"}})
        c.post("/retrieve", json=USER)
        text = c.get("/metrics").text
    assert 'service_filtered_queries_total{strategy="exact"} 3.0' in text
    assert 'service_filtered_queries_total{strategy="fallback"} 0.0' in text


# ---- /similar ------------------------------------------------------------------------------------


def test_similar_items(filtered_root, catalog, cells):
    emb, ids = catalog
    item = ids[7]
    with serve(filtered_root) as c:
        r = c.post("/similar", json={"item_id": item, "k": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["cached"] is False and set(body) == {"items", "model_version", "index_version", "cached"}
        assert body["index_version"] == filtered_root.joinpath("current").resolve().name
        got = [it["item_id"] for it in body["items"]]
        assert item not in got
        assert got == exact(emb, ids, emb[7], 10, np.ones(len(ids), dtype=bool), [item])
        np.testing.assert_allclose([it["score"] for it in body["items"]], emb[[ids.index(i) for i in got]] @ emb[7], atol=1e-5)

        filt, exclude = {"in_stock": True, "cost": {"gte": 10}}, [got[0]]
        r = c.post("/similar", json={"item_id": item, "k": 500, "filter": filt, "exclude_item_ids": exclude})
        got = [it["item_id"] for it in r.json()["items"]]
        assert got == exact(emb, ids, emb[7], 500, oracle_mask(cells, filt), [item, *exclude])


def test_similar_unknown_item_is_404_naming_it(filtered_root):
    with serve(filtered_root) as c:
        r = c.post("/similar", json={"item_id": "no-such-item", "k": 5})
        assert r.status_code == 404
        assert "no-such-item" in r.json()["detail"]


def test_similar_of_the_only_item(tmp_path: Path, bundle_a: Path, catalog):
    root = tmp_path / "index"
    write_version(root, bundle_a, catalog[0][:1], catalog[1][:1])
    with serve(root) as c:
        r = c.post("/similar", json={"item_id": catalog[1][0]})
        assert r.status_code == 200 and r.json()["items"] == []


def test_openapi_documents_similar_and_the_filter_grammar(filtered_root):
    with serve(filtered_root) as c:
        doc = c.get("/openapi.json").json()
    assert "404" in doc["paths"]["/similar"]["post"]["responses"]
    retrieve = doc["components"]["schemas"]["RetrieveRequest"]["properties"]["filter"]
    assert "ANDed" in retrieve["description"]
    assert "SimilarRequest" in doc["components"]["schemas"]


# ---- hot reload between a version with and one without attributes ------------------------------


def test_reload_between_versions_with_and_without_attributes_under_load(tmp_path: Path, bundle_a: Path, cells):
    """`current` flips between a version with attributes (catalog A) and one without (catalog B)
    while 8 threads send filtered requests: every answer is a 200 from A whose items satisfy the
    filter on A's table, or a 422 'no filterable attributes' — never a 5xx, never B's items."""
    n, d = len(cells), 16
    root = tmp_path / "index"
    emb_a = unit_rows(n, d, seed=21)
    ids_a = [f"a{i}" for i in range(n)]
    with_attrs = write_version(root, bundle_a, emb_a, ids_a, attributes=AttributeTable.from_frame(cells, SPECS), switch=False)
    without = write_version(root, bundle_a, unit_rows(n, d, seed=22), [f"b{i}" for i in range(n)], switch=False)
    assert "attributes" in read_manifest(with_attrs) and "attributes" not in read_manifest(without)
    filt = {"color": {"in": ["c0", "c1"]}, "in_stock": True}
    allowed = {ids_a[r] for r in np.flatnonzero(oracle_mask(cells, filt))}
    switch_current(root, with_attrs.name)
    stop = threading.Event()

    def flipper() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            switch_current(root, (without if i % 2 else with_attrs).name)
            time.sleep(0.03)

    with serve(root, reloader=True, reload_interval_s=0.01) as c:

        def worker(w: int) -> list[tuple[int, dict]]:
            return [(r.status_code, r.json()) for r in (
                c.post("/retrieve", json={**USER, "k": 5, "filter": filt}) if j % 2 else
                c.post("/similar", json={"item_id": "a3", "k": 5, "filter": filt}) for j in range(30))]

        flip = threading.Thread(target=flipper)
        flip.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                results = [x for chunk in pool.map(worker, range(8)) for x in chunk]
        finally:
            stop.set()
            flip.join()
    statuses = {s for s, _ in results}
    assert statuses <= {200, 404, 422}, statuses
    assert 200 in statuses and 422 in statuses, "the load never overlapped a swap"
    for status, body in results:
        if status == 200:
            assert body["index_version"] == with_attrs.name
            assert {it["item_id"] for it in body["items"]} <= allowed and body["items"]
        elif status == 422:
            assert "no filterable attributes" in body["detail"][0]["msg"]
        else:  # /similar of a3 on the version without attributes: it holds b-ids only
            assert "'a3'" in body["detail"]
