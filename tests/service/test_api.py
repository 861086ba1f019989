"""The HTTP contract (INTERFACES.md §3), in process: every endpoint, limits, errors, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.schemas import BatchRetrieveResponse, EmbedResponse, RetrieveResponse
from tests.service.conftest import FEATURES, serve
from tests.service.helpers import unit_rows, write_version


def post_raw(client: TestClient, path: str, text: str):  # noqa: ANN201 - httpx.Response
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def only_error(resp) -> dict:  # noqa: ANN001
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, list) and detail
    for item in detail:
        assert set(item) == {"loc", "field", "msg", "type"}  # no "input", no "ctx"
    return detail[0]


# ---- the happy paths ---------------------------------------------------------------------------


def test_retrieve_contract(client: TestClient, catalog: tuple[np.ndarray, list[str]]) -> None:
    body = {"user_id": "u1", "features": FEATURES, "k": 20, "exclude_item_ids": ["i1", "i2"]}
    r = client.post("/retrieve", json=body)
    assert r.status_code == 200, r.text
    data = RetrieveResponse.model_validate(r.json())
    assert len(data.items) == 20
    ids = [it.item_id for it in data.items]
    assert not {"i1", "i2"} & set(ids)
    assert set(ids) <= set(catalog[1])
    scores = [it.score for it in data.items]
    assert scores == sorted(scores, reverse=True)
    assert data.model_version and data.index_version and data.cached is False
    ready = client.get("/readyz").json()
    assert (data.model_version, data.index_version) == (ready["model_version"], ready["index_version"])


def test_retrieve_is_exact_top_k_of_the_embed_vector(client: TestClient, catalog: tuple[np.ndarray, list[str]]) -> None:
    emb, ids = catalog
    vec = np.array(client.post("/embed", json={"user_id": "u3", "features": FEATURES}).json()["vector"], np.float32)
    got = client.post("/retrieve", json={"user_id": "u3", "features": FEATURES, "k": 10}).json()["items"]
    truth = np.argsort(-(emb @ vec), kind="stable")[:10]
    assert [it["item_id"] for it in got] == [ids[i] for i in truth]


def test_embed_contract(client: TestClient) -> None:
    r = client.post("/embed", json={"user_id": "u1", "features": FEATURES})
    assert r.status_code == 200
    data = EmbedResponse.model_validate(r.json())
    v = np.array(data.vector)
    assert v.shape == (16,) and abs(np.linalg.norm(v) - 1) < 1e-5
    assert data.model_version == client.get("/readyz").json()["model_version"]


def test_unknown_or_absent_user_and_missing_features_use_oov(client: TestClient) -> None:
    for body in ({}, {"user_id": "never-seen"}, {"features": {}}, {"features": {"age": None}},
                 {"user_id": "u1", "features": {"country": "unseen-country", "interests": []}}):
        r = client.post("/retrieve", json=body)
        assert r.status_code == 200, (body, r.text)
        assert len(r.json()["items"]) == 20  # the default k
    absent = client.post("/embed", json={}).json()["vector"]
    unknown = client.post("/embed", json={"user_id": "never-seen"}).json()["vector"]
    assert absent == unknown  # both the OOV id row
    assert client.post("/embed", json={"features": {"age": None}}).json()["vector"] == absent


def test_feature_value_forms_are_equivalent(client: TestClient) -> None:
    """A multi-categorical list or joined string, an int or float continuous: same vector."""
    a = client.post("/embed", json={"features": {"interests": "t0|t3", "age": 30}}).json()
    b = client.post("/embed", json={"features": {"interests": ["t0", "t3"], "age": 30.0}}).json()
    assert a["vector"] == b["vector"]
    assert b["cached"] is True  # canonicalized features: the same cache key


def test_health_ready_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    client.post("/retrieve", json={"user_id": "u1"})
    client.post("/retrieve", json={"user_id": "u1"})
    text = client.get("/metrics").text
    assert 'service_request_duration_seconds_bucket{endpoint="/retrieve",le="0.5",method="POST"} 2.0' in text
    assert 'service_cache_hits_total{backend="local"} 1.0' in text
    assert 'service_cache_misses_total{backend="local"} 1.0' in text
    ready = client.get("/readyz").json()
    assert (
        f'service_loaded_version_info{{index_version="{ready["index_version"]}",model_version="{ready["model_version"]}"}} 1.0'
        in text
    )
    assert 'service_reloads_total{result="success"} 1.0' in text
    assert "service_ready 1.0" in text


@pytest.mark.parametrize("path", ["/nope", "/retrieve"])
def test_metric_labels_are_bounded_whatever_the_method(client: TestClient, path: str) -> None:
    """Made-up methods (any client can send them) must not add series to /metrics."""

    def series() -> set[str]:
        return {line.split(" ")[0] for line in client.get("/metrics").text.splitlines() if line.startswith("service_requests")}

    series()  # the scrape itself is a series
    client.request("XMADEUP0", path)
    client.request("XMADEUP0", f"{path}/0")
    before = series()
    for i in range(1, 30):
        client.request(f"XMADEUP{i}", path)
        client.request(f"XMADEUP{i}", f"{path}/{i}")  # unmatched raw paths: endpoint="unmatched"
    after = series()
    assert after == before
    assert not any("XMADEUP" in s or f"{path}/" in s for s in after), after
    assert any('method="other"' in s for s in after)


def test_batch_fields_are_strict_too(client: TestClient) -> None:
    err = only_error(client.post("/retrieve/batch", json={"requests": [{"k": 2}, {"k": True}]}))
    assert err["field"] == "requests.1.k", err


def test_not_ready_until_a_version_is_loaded(tmp_path: Path) -> None:
    with serve(tmp_path / "empty-root", load=False) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not ready"
        assert c.post("/retrieve", json={}).status_code == 503
        assert c.post("/embed", json={}).status_code == 503
        assert c.app.state.service.reloader.check_once() == "no-current"
        assert "current" in c.get("/readyz").json()["reason"]


def test_batch_matches_single_requests(client: TestClient) -> None:
    reqs = [
        {"user_id": "u1", "features": FEATURES, "k": 5},
        {"user_id": "u2", "k": 3, "exclude_item_ids": ["i0"]},
        {"features": {"age": 70}, "k": 1},
    ]
    singles = [client.post("/retrieve", json=r).json() for r in reqs]
    r = client.post("/retrieve/batch", json={"requests": reqs})
    assert r.status_code == 200, r.text
    batch = BatchRetrieveResponse.model_validate(r.json())
    assert len(batch.results) == 3
    for one, res in zip(singles, batch.results, strict=True):
        assert res.cached is True  # the singles populated the cache
        assert [(i.item_id, i.score) for i in res.items] == [(i["item_id"], i["score"]) for i in one["items"]]
        assert (res.model_version, res.index_version) == (batch.model_version, batch.index_version)


def test_batch_is_bounded(index_root: Path) -> None:
    with serve(index_root, max_batch=2) as c:
        assert c.post("/retrieve/batch", json={"requests": [{}, {}]}).status_code == 200
        err = only_error(c.post("/retrieve/batch", json={"requests": [{}, {}, {}]}))
        assert err["field"] == "requests"
        assert only_error(c.post("/retrieve/batch", json={"requests": []}))["field"] == "requests"
        err = only_error(c.post("/retrieve/batch", json={"requests": [{}, {"features": {"nope": 1}}]}))
        assert err["field"] == "requests.1.features.nope"


# ---- exclusions and k --------------------------------------------------------------------------


def test_k_larger_than_catalog_and_everything_excluded(client: TestClient, catalog: tuple[np.ndarray, list[str]]) -> None:
    ids = catalog[1]
    n = len(ids)
    items = client.post("/retrieve", json={"k": 1000}).json()["items"]
    assert len(items) == n and len({i["item_id"] for i in items}) == n
    excl = ids[: n - 5] + ["not-in-catalog"]
    items = client.post("/retrieve", json={"k": 1000, "exclude_item_ids": excl}).json()["items"]
    assert sorted(i["item_id"] for i in items) == sorted(ids[n - 5 :])
    assert client.post("/retrieve", json={"k": 3, "exclude_item_ids": ids}).json()["items"] == []
    for it in items:
        assert isinstance(it["score"], float)


@pytest.mark.parametrize("factory", ["HNSW4"])
def test_ann_index_with_exclusions_returns_min_k_catalog_minus_excluded(tmp_path: Path, bundle_a: Path, factory: str) -> None:
    """HNSW with a tiny efSearch cannot supply k + |exclude| rows: the exact fallback does."""
    n, d = 3000, 16
    emb = unit_rows(n, d, seed=3)
    ids = [f"x{i}" for i in range(n)]
    root = tmp_path / "index"
    write_version(root, bundle_a, emb, ids, factory=factory)
    with serve(root, hnsw_ef_search=4) as c:
        vec = np.array(c.post("/embed", json={"user_id": "u1"}).json()["vector"], np.float32)
        exact = np.argsort(-(emb @ vec), kind="stable")
        cases = [
            (10, []),
            (50, [ids[i] for i in exact[:40]]),  # the 40 best excluded
            (1000, ids[: n - 100]),  # fetch > 25% of catalog: exact scan
            (1000, [ids[i] for i in exact[:500]]),
        ]
        for k, excl in cases:
            r = c.post("/retrieve", json={"user_id": "u1", "k": k, "exclude_item_ids": excl})
            assert r.status_code == 200
            items = r.json()["items"]
            want = min(k, n - len(set(excl) & set(ids)))
            assert len(items) == want, (k, len(excl))
            got = [i["item_id"] for i in items]
            assert not set(got) & set(excl)
            assert len(set(got)) == len(got)
            scores = np.array([i["score"] for i in items])
            assert np.isfinite(scores).all() and (np.diff(scores) <= 0).all()
            rows = [int(g[1:]) for g in got]
            np.testing.assert_allclose(scores, emb[rows] @ vec, atol=1e-5)


# ---- the cache through the API ---------------------------------------------------------------


def test_cached_answers_are_identical_and_flagged(client: TestClient) -> None:
    body = {"user_id": "u5", "features": FEATURES, "k": 50}
    first = client.post("/retrieve", json=body).json()
    second = client.post("/retrieve", json=body).json()
    assert first["cached"] is False and second["cached"] is True
    assert first["items"] == second["items"]
    other = client.post("/retrieve", json={**body, "features": {**FEATURES, "age": 32}}).json()
    assert other["cached"] is False  # different features, different key


# ---- input validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"features": {"age": NaN}}', "features.age"),
        ('{"features": {"age": Infinity}}', "features.age"),
        ('{"features": {"age": -Infinity}}', "features.age"),
        ('{"features": {"age": 1e999}}', "features.age"),
        ('{"features": {"bogus": 1}}', "features.bogus"),
        ('{"features": {"age": "old"}}', "features.age"),
        ('{"features": {"age": true}}', "features.age"),
        ('{"features": {"country": ["a"]}}', "features.country"),
        ('{"features": {"country": {"a": 1}}}', "features.country"),
        ('{"features": {"interests": [1, 2]}}', "features.interests"),
        ('{"features": {"interests": 3.5}}', "features.interests"),
        ('{"features": []}', "features"),
        ('{"user_id": 196}', "user_id"),
        ('{"k": 0}', "k"),
        ('{"k": 1001}', "k"),
        ('{"k": NaN}', "k"),
        ('{"k": "ten"}', "k"),
        ('{"k": "3"}', "k"),  # coerced to 3 before _Strict became strict
        ('{"k": true}', "k"),  # coerced to 1
        ('{"k": 3.0}', "k"),
        ('{"exclude_item_ids": [1]}', "exclude_item_ids.0"),
        ('{"exclude_item_ids": "i1"}', "exclude_item_ids"),
        ('{"colour": "red"}', "colour"),
        ("[1, 2]", "body"),
        ('{"k": ', "body"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(client: TestClient, text: str, field: str) -> None:
    err = only_error(post_raw(client, "/retrieve", text))
    assert err["field"] == field, err
    if field.startswith("features"):
        embed_err = only_error(post_raw(client, "/embed", text))
        assert embed_err["field"] == field


@pytest.mark.parametrize("char", ["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x85"])
@pytest.mark.parametrize(
    ("path", "make_body", "field"),
    [
        ("/retrieve", lambda bad: {"user_id": bad}, "user_id"),
        ("/embed", lambda bad: {"user_id": bad}, "user_id"),
        ("/retrieve", lambda bad: {"exclude_item_ids": ["i1", bad]}, "exclude_item_ids.1"),
        ("/retrieve", lambda bad: {"history": ["i1", bad]}, "history.1"),
        ("/embed", lambda bad: {"history": [bad]}, "history.0"),
        ("/retrieve/batch", lambda bad: {"requests": [{"k": 3}, {"user_id": bad}]}, "requests.1.user_id"),
        ("/retrieve/batch", lambda bad: {"requests": [{"k": 3, "history": [bad]}]}, "requests.0.history.0"),
        ("/similar", lambda bad: {"item_id": bad}, "item_id"),
        ("/similar", lambda bad: {"item_id": "i1", "exclude_item_ids": [bad]}, "exclude_item_ids.0"),
    ],
)
def test_ids_with_control_characters_are_a_422_naming_the_field(
    client: TestClient, path: str, make_body, field: str, char: str  # noqa: ANN001
) -> None:
    """Ids go into cache keys and log lines: a NUL (once a 200) or a newline is refused."""
    r = client.post(path, json=make_body(f"u{char}1"))
    err = only_error(r)
    assert (err["field"], err["type"]) == (field, "control_character"), err
    assert f"U+{ord(char):04X} at position 1" in err["msg"]


@pytest.mark.parametrize("user_id", ["café", "用户-7", "a b", "u\u200b1", "😀"])
def test_ids_with_printable_unicode_are_accepted(client: TestClient, user_id: str) -> None:
    r = client.post("/retrieve", json={"user_id": user_id, "k": 2})
    assert r.status_code == 200 and len(r.json()["items"]) == 2, r.text


@pytest.mark.parametrize(
    ("body", "content_type", "error_type"),
    [
        (b'{"features": {"country": "\\ud800"}}', "application/json", "json_invalid"),  # was a 500
        (b'{"user_id": "\\udfff"}', "application/json", "json_invalid"),
        (b'{"features": {"country": "\xff"}}', "application/json", "json_invalid"),  # not UTF-8
        (b'{"features": {"age": ' + b"9" * 5000 + b"}}", "application/json", "json_invalid"),
        (b'{"features": {"a": ' + b"[" * 300 + b"]" * 300 + b"}}", "application/json", "json_invalid"),
        (b'{"k": 5} trailing', "application/json", "json_invalid"),
        (b"", "application/json", "missing"),
        (b"{}", None, "content_type"),
        (b"{}", "text/plain", "content_type"),
        (b"{}", "application/jsonx", "content_type"),
    ],
)
def test_bodies_that_are_not_json_are_a_422_at_body(
    client: TestClient, body: bytes, content_type: str | None, error_type: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/retrieve", "/embed", "/retrieve/batch"):
        r = client.post(path, content=body, headers=headers)
        err = only_error(r)
        assert (err["field"], err["type"]) == ("body", error_type), (path, err)
        assert "9999" not in r.text and "ud800" not in r.text  # the input is never echoed


def test_json_media_types_with_parameters_or_suffix_are_accepted(client: TestClient) -> None:
    for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json"):
        r = client.post("/retrieve", content=b'{"k": 3}', headers={"content-type": content_type})
        assert r.status_code == 200 and len(r.json()["items"]) == 3, (content_type, r.text)


def test_auth_and_readiness_are_checked_before_the_body(index_root: Path, tmp_path: Path) -> None:
    bad = {"content": b'{"k": "ten"', "headers": {"content-type": "application/json"}}
    with serve(index_root, api_key="k-1") as c:
        assert c.post("/retrieve", **bad).status_code == 401
        assert c.post("/retrieve", headers={"X-API-Key": "k-1", **bad["headers"]}, content=bad["content"]).status_code == 422
    with serve(tmp_path / "empty-root", load=False) as c:
        assert c.post("/retrieve", **bad).status_code == 503


def test_openapi_documents_the_lean_routes_like_any_route(client: TestClient) -> None:
    """The JSON POST routes run on JSONBodyRoute; their OpenAPI operations are FastAPI's own."""
    doc = client.get("/openapi.json").json()
    for path, model in (("/retrieve", "RetrieveRequest"), ("/embed", "EmbedRequest"),
                        ("/retrieve/batch", "BatchRetrieveRequest")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["required"] is True
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{model}"
        assert op["security"] == [{"APIKeyHeader": []}]
        assert set(op["responses"]) == {"200", "401", "413", "422", "503"}
    assert doc["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


def test_json_body_route_refuses_endpoints_it_cannot_run() -> None:
    from fastapi import FastAPI

    from service.deps import ServedDep
    from service.routes import post_json
    from service.schemas import EmbedRequest

    app = FastAPI()

    async def no_served(body: EmbedRequest):  # noqa: ANN202
        return None

    async def extra_query(body: EmbedRequest, served: ServedDep, q: int = 0):  # noqa: ANN202
        return None

    def not_async(body: EmbedRequest, served: ServedDep):  # noqa: ANN202
        return None

    for endpoint in (no_served, extra_query, not_async):
        with pytest.raises(TypeError, match="JSONBodyRoute"):
            post_json(app, "/x")(endpoint)


def test_422_never_echoes_the_input(client: TestClient) -> None:
    secret = "s3cr3t-" + "x" * 50
    for text in (
        json.dumps({"features": {"age": secret}}),
        json.dumps({"user_id": secret * 20}),
        json.dumps({"k": secret}),
        json.dumps({"features": {"country": {"nested": secret}}}),
        '{"features": {"age": NaN}, "k": "' + secret + '"}',
    ):
        r = post_raw(client, "/retrieve", text)
        assert r.status_code == 422
        assert secret not in r.text
        json.loads(r.text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in a response"))


def test_long_unknown_names_are_truncated_in_errors(client: TestClient) -> None:
    name = "f" * 5000
    err = only_error(client.post("/retrieve", json={"features": {name: 1}}))
    assert len(err["field"]) < 200


def test_too_many_excludes(index_root: Path) -> None:
    with serve(index_root, max_exclude=3) as c:
        assert c.post("/retrieve", json={"exclude_item_ids": ["a", "b", "c"]}).status_code == 200
        err = only_error(c.post("/retrieve", json={"exclude_item_ids": ["a", "b", "c", "d"]}))
        assert err["field"] == "exclude_item_ids"


def test_default_exclude_limit_is_ten_thousand(client: TestClient) -> None:
    ok = client.post("/retrieve", json={"k": 5, "exclude_item_ids": [f"e{i}" for i in range(10_000)]})
    assert ok.status_code == 200 and len(ok.json()["items"]) == 5
    err = only_error(client.post("/retrieve", json={"exclude_item_ids": [f"e{i}" for i in range(10_001)]}))
    assert err["field"] == "exclude_item_ids"


def test_max_k_is_configurable(index_root: Path) -> None:
    with serve(index_root, max_k=7) as c:
        assert len(c.post("/retrieve", json={"k": 7}).json()["items"]) == 7
        assert only_error(c.post("/retrieve", json={"k": 8}))["field"] == "k"
        schema = c.get("/openapi.json").json()["components"]["schemas"]["RetrieveRequest"]
        assert schema["properties"]["k"]["maximum"] == 7


def test_body_size_limit_is_a_413(index_root: Path) -> None:
    with serve(index_root, max_body_bytes=2048) as c:
        big = {"exclude_item_ids": ["x" * 100] * 30}
        r = c.post("/retrieve", json=big)
        assert r.status_code == 413 and "2048" in r.json()["detail"]

        def chunks():  # no Content-Length: the streamed total is what is checked
            for _ in range(10):
                yield b" " * 400

        r = c.post("/retrieve", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/retrieve", json={"k": 1}).status_code == 200  # still serving
        assert 'endpoint="unmatched"' in c.get("/metrics").text or "413" in c.get("/metrics").text


# ---- API key -----------------------------------------------------------------------------------


def test_api_key_is_off_by_default(client: TestClient) -> None:
    assert client.post("/retrieve", json={}).status_code == 200


def test_api_key_when_configured(index_root: Path) -> None:
    with serve(index_root, api_key="k-123") as c:
        assert c.post("/retrieve", json={}).status_code == 401
        assert c.post("/retrieve", json={}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/retrieve", json={}, headers={"X-API-Key": ""}).status_code == 401
        assert c.post("/retrieve", json={}, headers={"X-API-Key": "k-123"}).status_code == 200
        assert c.post("/embed", json={}).status_code == 401
        assert c.post("/retrieve/batch", json={"requests": [{}]}).status_code == 401
        assert c.get("/healthz").status_code == 200  # probes stay open
        assert c.get("/readyz").status_code == 200


def test_non_finite_user_vector_is_never_searched_or_cached(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken tower (NaN output) is a 500 with a reason, not garbage from FAISS, and not cached."""
    tower = client.app.state.service.holder.current.tower
    monkeypatch.setattr(tower, "embed", lambda records: np.full((len(records), tower.dim), np.nan, np.float32))
    body = {"user_id": "u9"}
    r = client.post("/retrieve", json=body)
    assert r.status_code == 500 and "non-finite" in r.json()["detail"]
    monkeypatch.undo()
    r = client.post("/retrieve", json=body)
    assert r.status_code == 200 and r.json()["cached"] is False
