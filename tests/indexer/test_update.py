"""`indexer update` with a real (tiny) trained model: deltas, chains, crashes, the lock, rollback.

The oracle of every "the update is right" test is a fresh `indexer rebuild` of the same catalog
with the same bundle, or a brute-force scan of the live catalog (`BruteForceTopK`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest

from indexer import faiss_index as fi
from indexer import store
from indexer.attributes import parse_filter
from indexer.cli import main as cli_main
from indexer.rebuild import RebuildConfig, rebuild
from indexer.topk import (
    Allowed,
    BruteForceTopK,
    DeltaTopK,
    FaissTopK,
    Query,
    SegmentedRows,
    exact_live_top_k,
    recall_against_exact,
)
from indexer.update import STAGES, DeltaTooLargeError, UpdateConfig, update
from indexer.version import IndexVersionError, load_version, verify_version
from tests.indexer.conftest import FACTORIES, clustered, root_snapshot, tree_digest
from training.artifacts import sha256_file
from training.numpy_tower import UserRecord

ATTRS = {"color": {"type": "categorical"}, "stock": {"type": "bool"}}


def read_items_raw(data: Path) -> pd.DataFrame:
    return pd.read_csv(data / "items.csv", dtype=str, keep_default_na=False)


def write_items(data: Path, items: pd.DataFrame) -> None:
    items.to_csv(data / "items.csv", index=False)


@pytest.fixture
def data(dataset_copy: Path) -> Path:
    """The tiny dataset with two attributes (a categorical color, a bool in-stock flag)."""
    items = read_items_raw(dataset_copy)
    items["color"] = np.where(np.arange(len(items)) % 3 == 0, "red", "blue")
    items["stock"] = "true"
    write_items(dataset_copy, items)
    schema = json.loads((dataset_copy / "schema.json").read_text())
    schema["item"]["attributes"] = ATTRS
    (dataset_copy / "schema.json").write_text(json.dumps(schema))
    return dataset_copy


def build(root: Path, bundle: Path, data: Path, index: str = "Flat") -> Path:
    return rebuild(RebuildConfig(model=bundle, data=data, out=root, index=index, gate_k=10, progress=False)).path


def ucfg(root: Path, **kw) -> UpdateConfig:
    return UpdateConfig(root=root, gate_k=10, **{"max_delta": 0.5, **kw})


def change_catalog(items: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Remove 4 items, change the features of 3, the attributes of 5, add 3 fresh ids."""
    rng = np.random.default_rng(seed)
    out = items.copy()
    idx = rng.permutation(len(out))
    out.loc[out.index[idx[4:7]], "category"] = "c_new"  # feature change: re-embedded
    out.loc[out.index[idx[7:12]], "color"] = "green"  # attribute-only change
    out.loc[out.index[idx[12]], "stock"] = "false"
    new = out.iloc[idx[13:16]].copy()
    new["item_id"] = [f"fresh{seed}-{i}" for i in range(3)]
    new["tags"] = f"t_new{seed}"
    out = out.drop(out.index[idx[:4]])
    return pd.concat([out, new], ignore_index=True)


def user_queries(version, n: int = 40) -> np.ndarray:  # noqa: ANN001
    rng = np.random.default_rng(0)
    recs = [UserRecord(None, {"age": float(a)}) for a in rng.uniform(15, 70, n)]
    q = version.tower.embed(recs)
    items = np.asarray(version.embeddings[rng.choice(len(version.embeddings), n)])
    return np.ascontiguousarray(np.concatenate([q, items]), dtype=np.float32)


def all_results(version, queries: np.ndarray, k: int, **kw):  # noqa: ANN001, ANN003
    return version.topk.top_k(queries, [Query(k, **kw)] * len(queries))


# ---- the merged top-k against a brute-force oracle of the live catalog ---------------------------


@pytest.mark.parametrize(
    ("factory", "delta_exact_max_rows", "overfetch"),
    [("Flat", None, True), ("HNSW32", None, True), ("IVF32,Flat", None, True), ("IVF32,Flat", None, False),
     ("IVF32,Flat", 0, True), ("IVF32,Flat", 0, False), ("IVF32,SQ8", 0, True)],
)
def test_delta_topk_is_the_exact_topk_of_the_live_catalog_with_filters(factory, delta_exact_max_rows, overfetch, catalog, queries):
    """Base ANN with tombstones excluded ∪ delta = the live catalog's top-k: exactly
    min(k, |allowed ∩ live − excluded|) items, never a tombstoned row, scores exact — with the
    delta scanned exactly or searched through its IVF on the base's quantizer (every list probed
    here: exhaustive, so equal to the oracle), tombstones left out by over-fetch or selector."""
    vectors, ids = catalog
    rng = np.random.default_rng(3)
    tomb = rng.random(len(ids)) < 0.1
    changed = np.flatnonzero(tomb)[:40]  # changed items: their base row is tombstoned, a new row is in the delta
    delta_ids = [ids[r] for r in changed] + [f"new{i}" for i in range(60)]
    delta = clustered(len(delta_ids), vectors.shape[1], seed=9)
    params, _ = FACTORIES[factory]
    base = FaissTopK(fi.build_index(vectors, factory, search_params=params), vectors, ids)
    merged = DeltaTopK(base, delta, delta_ids, tomb, delta_exact_max_rows=delta_exact_max_rows)
    merged.tombstone_overfetch = overfetch
    merged.filter_exact_max_rows, merged.filter_exact_fraction = 0, 0.0  # the ANN path at this small size
    assert (merged.delta_index is not None) == (delta_exact_max_rows == 0 and factory.startswith("IVF"))
    live_rows = np.flatnonzero(~tomb)
    oracle = BruteForceTopK(np.concatenate([vectors[live_rows], delta]), [ids[r] for r in live_rows] + delta_ids)
    assert merged.live_count == oracle.count and not set(delta_ids) - set(merged.rows)
    dead = {ids[r] for r in np.flatnonzero(tomb)} - set(delta_ids)
    color = rng.random(merged.count) < 0.5  # a filter over the merged rows
    for k, exclude in ((10, frozenset()), (50, frozenset(delta_ids[:5]) | {ids[live_rows[0]]}), (oracle.count + 5, frozenset())):
        for allowed in (None, Allowed(color), Allowed.from_rows(np.flatnonzero(color)[:300], merged.count)):
            got = merged.top_k(queries, [Query(k, exclude, allowed)] * len(queries))
            if allowed is None:
                want = oracle.top_k(queries, [Query(k, exclude)] * len(queries))
            else:
                mask = np.concatenate([allowed.mask[:len(ids)][live_rows], allowed.mask[len(ids):]])
                want = oracle.top_k(queries, [Query(k, exclude, Allowed(mask))] * len(queries))
            for g, w in zip(got, want, strict=True):
                assert len(g) == len(w)  # exactly min(k, |allowed ∩ live − excluded|)
                gids = [i for i, _ in g]
                assert not dead & set(gids) and not exclude & set(gids)
                assert len(set(gids)) == len(gids)
                if factory in ("Flat", "IVF32,Flat") or k > 100:
                    assert gids == [i for i, _ in w]
                    np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=1e-6)
                rows = [merged.rows[i] for i in gids]
                np.testing.assert_allclose(
                    [s for _, s in g], merged.embeddings[rows] @ queries[got.index(g)], atol=1e-5
                )
    assert recall_against_exact(merged, queries, 10) >= FACTORIES[factory][1] - 0.05
    if factory == "Flat":  # exact merged search: the gate's exact side must count live rows only
        # (10 % of the base is tombstoned: a truth holding dead rows would put recall below 1)
        for k in (10, 50):
            assert recall_against_exact(merged, queries, k) == 1.0


def test_unfiltered_query_redoes_with_the_selector_when_the_over_fetch_is_all_tombstones(catalog, queries):
    """The over-fetch path (no selector, tombstones dropped after) must never come back short:
    with the 30 best rows of a query tombstoned (few tombstones overall, so the margin is small)
    the query is redone with the bitmap selector and still equals the live catalog's top-k."""
    vectors, ids = catalog
    base = FaissTopK(fi.build_index(vectors, "Flat"), vectors, ids)
    q = queries[:1]
    tomb = np.zeros(len(ids), dtype=bool)
    tomb[np.argsort(-(vectors @ q[0]))[:30]] = True
    merged = DeltaTopK(base, clustered(5, vectors.shape[1], seed=2), [f"d{i}" for i in range(5)], tomb)
    merged.filter_exact_max_rows, merged.filter_exact_fraction = 0, 0.0  # the ANN path at this small size
    calls = []
    real = base.allowed_candidates
    base.allowed_candidates = lambda *a: calls.append(a) or real(*a)  # type: ignore[method-assign]
    live_rows = np.flatnonzero(~tomb)
    oracle = BruteForceTopK(np.concatenate([vectors[live_rows], merged.delta_embeddings]),
                            [ids[r] for r in live_rows] + [f"d{i}" for i in range(5)])
    got = merged.top_k(q, [Query(10)])[0]
    assert len(calls) == 1  # the over-fetch found only tombstones: redone with the selector
    assert [i for i, _ in got] == [i for i, _ in oracle.top_k(q, [Query(10)])[0]]
    calls.clear()
    far = -q  # the tombstones are not near this query: the plain over-fetch answers it
    got = merged.top_k(far, [Query(10)])[0]
    assert not calls and [i for i, _ in got] == [i for i, _ in oracle.top_k(far, [Query(10)])[0]]


def test_delta_index_shares_the_base_quantizer_and_follows_its_nprobe(catalog, queries):
    """The delta IVF is built on the base's coarse quantizer (same centroids: a delta row lands
    in the list of its base twin) and, probed like the base, finds the delta's own top rows."""
    vectors, ids = catalog
    base = FaissTopK(fi.build_index(vectors, "IVF32,Flat", search_params={"nprobe": 4}), vectors, ids)
    delta = vectors[:200].copy()
    tomb = np.zeros(len(ids), dtype=bool)
    tomb[:200] = True  # changed items: same vectors, new rows
    merged = DeltaTopK(base, delta, [ids[i] for i in range(200)], tomb, delta_exact_max_rows=0)
    merged.filter_exact_max_rows, merged.filter_exact_fraction = 0, 0.0  # the ANN path at this small size
    base.filter_exact_max_rows, base.filter_exact_fraction = 0, 0.0
    ivf = faiss.extract_index_ivf(base.index)
    assert merged.delta_index.quantizer.this == ivf.quantizer.this and merged.delta_index.nprobe == 4
    assert merged.delta_index.ntotal == 200
    base_lists = ivf.quantizer.search(delta, 1)[1][:, 0]
    delta_lists = merged.delta_index.quantizer.search(delta, 1)[1][:, 0]
    np.testing.assert_array_equal(base_lists, delta_lists)
    # the same catalog as the base's, its changed rows found through the same probed lists: the
    # merged candidates hold the base search's (the same lists, more rows fetched), so its
    # answer is at least as good, score by score; and the delta rows are found at all
    hits = 0
    for k in (5, 20):
        got = merged.top_k(queries, [Query(k)] * len(queries))
        want = base.top_k(queries, [Query(k)] * len(queries))
        for g, w in zip(got, want, strict=True):
            assert len(g) == len(w) == k
            assert (np.array([s for _, s in g]) >= np.array([s for _, s in w]) - 1e-6).all()
            hits += sum(1 for i, _ in g if merged.rows[i] >= len(ids))
    assert hits > 0
    assert recall_against_exact(merged, queries, 20) >= recall_against_exact(base, queries, 20)


@pytest.mark.parametrize("overfetch", [True, False])
def test_delta_ivf_is_one_ivf_over_the_live_catalog_and_its_short_answers_are_not_rescanned(overfetch, catalog, queries):
    """Oracle: one IVF-Flat over the live catalog (live base rows + delta rows) on the base's
    centroids, probed with the base's nprobe, exactly re-scored. With nprobe 2 of 32 lists and
    ~6 delta rows a list, the delta IVF often finds fewer than k delta rows: the base part
    holds the fetch, so the delta is not scanned exactly — and the answer is still the
    oracle's, row for row (the merged candidates, cut by their float32 distances, hold the
    top-k of the probed lists); with the tombstone selector instead, at least as good."""
    vectors, ids = catalog
    base = FaissTopK(fi.build_index(vectors, "IVF32,Flat", search_params={"nprobe": 2}), vectors, ids)
    rng = np.random.default_rng(7)
    tomb = rng.random(len(ids)) < 0.05
    delta_ids = [f"new{i}" for i in range(200)]
    delta = clustered(200, vectors.shape[1], seed=11)
    merged = DeltaTopK(base, delta, delta_ids, tomb, delta_exact_max_rows=0)
    merged.tombstone_overfetch = overfetch
    merged.filter_exact_max_rows, merged.filter_exact_fraction = 0, 0.0  # the ANN path at this small size
    scans = []
    real = merged._scan_delta
    merged._scan_delta = lambda *a: scans.append(a) or real(*a)  # type: ignore[method-assign]
    live_rows = np.flatnonzero(~tomb)
    live_vecs = np.concatenate([vectors[live_rows], delta])
    ivf = faiss.extract_index_ivf(base.index)
    whole = faiss.IndexIVFFlat(ivf.quantizer, ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
    whole.add(live_vecs)
    whole.nprobe = 2
    oracle = FaissTopK(whole, live_vecs, [ids[r] for r in live_rows] + delta_ids)
    short = 0
    for k in (10, 20):
        dlists = ivf.quantizer.search(queries, 2)[1]
        delta_lists = ivf.quantizer.search(delta, 1)[1][:, 0]
        short += sum(int(np.isin(delta_lists, row).sum() < k) for row in dlists)
        got = merged.top_k(queries, [Query(k)] * len(queries))
        want = oracle.top_k(queries, [Query(k)] * len(queries))
        for g, w in zip(got, want, strict=True):
            if overfetch:
                assert [i for i, _ in g] == [i for i, _ in w]
                np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=1e-6)
            else:  # the selector raises the base's nprobe by 1 / live share: more lists, never worse
                assert len(g) == len(w) == k
                assert (np.array([s for _, s in g]) >= np.array([s for _, s in w]) - 1e-6).all()
    assert short > 0  # the case this is about happened
    assert not scans


def test_cut_keeps_the_exact_top_fetch():
    """`_cut` (the merged candidates cut by FAISS float32 distances) never drops a row of the
    exact top-fetch, also with near-ties at the cut-off, and keeps fewer rows than it got."""
    from indexer.topk import _cut

    rng = np.random.default_rng(5)
    rows_vecs = clustered(400, 64, seed=3)
    for _ in range(20):
        vec = clustered(1, 64, seed=int(rng.integers(1 << 30)))[0]
        rows = rng.permutation(400)[:60].astype(np.int64)
        exact = rows_vecs[rows].astype(np.float64) @ vec.astype(np.float64)
        exact[rng.integers(60)] = exact[np.argsort(-exact)[19]]  # a tie at the cut-off
        dist = (exact + rng.uniform(-5e-6, 5e-6, 60)).astype(np.float32)  # float32 error
        kept = set(_cut(rows, dist, 20, vec).tolist())
        assert set(rows[np.argsort(-exact)[:20]].tolist()) <= kept and len(kept) < 60


def test_segmented_rows_read_as_the_concatenated_matrix():
    """DeltaTopK's base + delta rows without a copy: every read equals the concatenation's."""
    base, delta = clustered(30, 4, seed=0), clustered(7, 4, seed=1)
    seg, want = SegmentedRows(base, delta), np.concatenate([base, delta])
    assert seg.shape == want.shape and len(seg) == 37 and seg.dtype == np.float32
    for rows in ([3], [31], [0, 29, 30, 36], [[1, 33], [35, 2]], [], list(range(37))[::-1]):
        np.testing.assert_array_equal(seg.take(np.array(rows, dtype=np.int64), axis=0), want.take(np.array(rows, dtype=np.int64), axis=0))
        np.testing.assert_array_equal(seg[rows], want[np.array(rows, dtype=np.int64)])
    for key in (0, 29, 30, 36, -1, -8, slice(25, 33), slice(None, None, 5)):
        np.testing.assert_array_equal(seg[key], want[key])
    np.testing.assert_array_equal(np.asarray(seg), want)
    for bad in (37, -38):
        with pytest.raises(IndexError):
            seg[bad]
    with pytest.raises(IndexError):
        seg.take(np.array([0, 37]))


@pytest.mark.parametrize("dead_fraction", [0.0, 0.1, 0.95])
def test_exact_live_top_k_is_the_brute_force_top_k_of_the_live_rows(dead_fraction, catalog, queries):
    """The gate's exact side (a BLAS scan of the base as it is, tombstones dropped, refetched
    when too many were among the first k): the live catalog's exact top-k, also when most of
    the base is tombstoned and when k exceeds the live base rows."""
    vectors, ids = catalog
    rng = np.random.default_rng(4)
    tomb = rng.random(len(ids)) < dead_fraction
    delta = clustered(25, vectors.shape[1], seed=5)
    merged = DeltaTopK(FaissTopK(fi.build_index(vectors, "Flat"), vectors, ids), delta, [f"d{i}" for i in range(25)], tomb)
    live = np.flatnonzero(merged.live.mask)
    oracle = np.concatenate([vectors, delta])[live]
    for k in (1, 10, int(np.count_nonzero(~tomb)) + 5):
        truth = exact_live_top_k(merged, queries, k)
        for qv, rows in zip(queries, truth, strict=True):
            want = np.sort(oracle @ qv)[::-1][: min(k, len(live))]
            assert len(rows) == len(want) and merged.live.mask[rows].all() and len(set(rows.tolist())) == len(rows)
            np.testing.assert_allclose(np.sort(np.asarray(merged.embeddings[rows]) @ qv)[::-1], want, atol=1e-5)


def test_delta_topk_rejects_a_live_duplicate():
    vectors = clustered(20, 4, seed=0)
    base = FaissTopK(fi.build_index(vectors, "Flat"), vectors, [f"i{i}" for i in range(20)])
    with pytest.raises(ValueError, match="also a live base item"):
        DeltaTopK(base, vectors[:1], ["i3"], np.zeros(20, dtype=bool))
    DeltaTopK(base, vectors[:1], ["i3"], np.arange(20) == 3)  # tombstoned first: fine


# ---- the update job -----------------------------------------------------------------------------


@pytest.mark.parametrize("index", ["Flat", "HNSW8"])
def test_update_on_update_on_rebuild_equals_a_fresh_rebuild(index, tmp_path, tiny_bundle_path, data):
    root = tmp_path / "index"
    base = build(root, tiny_bundle_path, data, index)
    first = change_catalog(read_items_raw(data), seed=1)
    write_items(data, first)
    r1 = update(ucfg(root, data=data))
    assert r1.stats["new"] == 3 and r1.stats["removed"] == 4 and r1.stats["feature_changed"] == 3
    assert r1.stats["embedded"] == 6 and r1.stats["fresh_ids"] == 3  # attribute-only changes are not re-embedded
    second = change_catalog(first, seed=2)
    write_items(data, second)
    r2 = update(ucfg(root, data=data))
    assert r2.manifest["delta"]["base"] == base.name  # a chain stays one level deep
    served = load_version(root / "current")
    assert served.base == base.name and served.count == len(second)

    fresh = load_version(build(tmp_path / "fresh", tiny_bundle_path, data, index))
    assert sorted(fresh.item_ids) == sorted(served.topk.rows)
    # the same vectors for every live item (the delta was embedded by the same item tower)
    for item, row in served.topk.rows.items():
        np.testing.assert_allclose(served.embeddings[row], fresh.embeddings[fresh.topk.rows[item]], atol=1e-5)
    q = user_queries(served)
    for k in (10, len(second) + 10):
        got, want = all_results(served, q, k), all_results(fresh, q, k)
        for g, w in zip(got, want, strict=True):
            assert len(g) == len(w) == min(k, len(second))
            np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=1e-5)
            if index == "Flat" or k > 100:
                assert {i for i, _ in g} == {i for i, _ in w} or np.ptp([s for _, s in g]) == 0
    if index != "Flat":
        assert served.manifest["recall"]["merged"] and served.manifest["recall"]["value"] >= 0.95
        assert recall_against_exact(served.topk, q, 10) >= 0.95
    # attributes follow at once: the green items are exactly the catalog's green items
    green = served.attributes.allowed(parse_filter({"color": "green"}))
    assert {served.topk.item_ids[r] for r in green.rows} == set(second.loc[second["color"] == "green", "item_id"])
    res = served.topk.top_k(q[:1], [Query(1000, allowed=green)])[0]
    assert {i for i, _ in res} == set(second.loc[second["color"] == "green", "item_id"])


def test_removed_items_never_appear_and_new_items_are_found_by_their_features(tmp_path, tiny_bundle, tiny_bundle_path, data):
    root = tmp_path / "index"
    build(root, tiny_bundle_path, data)
    before = read_items_raw(data)
    after = change_catalog(before, seed=3)
    write_items(data, after)
    update(ucfg(root, data=data))
    v = load_version(root / "current")
    removed = set(before["item_id"]) - set(after["item_id"])
    q = user_queries(v)
    for res in all_results(v, q, 10_000):  # k >= catalog
        assert len(res) == len(after) and not removed & {i for i, _ in res}
    # a query that matches a new item's features (its item-tower vector) finds it first
    new = after[~after["item_id"].isin(before["item_id"])]
    want = tiny_bundle.model.embed_items(new)
    for item, vec in zip(new["item_id"], want, strict=True):
        (top,) = v.topk.top_k(vec[None, :], [Query(1)])
        assert top[0][0] == item and top[0][1] == pytest.approx(1.0, abs=1e-5)
    for item in removed:
        assert item not in v.topk.rows  # POST /similar answers 404


def test_a_delta_version_holds_its_live_catalog_as_item_ids_and_embeddings(tmp_path, tiny_bundle_path, data):
    """INTERFACES §2: every version has item_ids.txt (the catalog) and embeddings.npy (its unit
    rows, same order). A delta's are a copy for readers of the files; `indexer verify` holds
    them to the served rows, the service does not read them."""
    root = tmp_path / "index"
    build(root, tiny_bundle_path, data)
    after = change_catalog(read_items_raw(data), seed=12)
    write_items(data, after)
    path = update(ucfg(root, data=data)).path
    ids = (root / "current" / "item_ids.txt").read_text().splitlines()
    emb = np.load(root / "current" / "embeddings.npy")
    served = load_version(root / "current")
    assert sorted(ids) == sorted(after["item_id"]) and emb.shape == (len(after), served.dim) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, np.asarray(served.embeddings[[served.topk.rows[i] for i in ids]]))
    verify_version(path)
    # a copy that is not the served rows (its hash made to match) fails `verify`, not serving
    emb[0] = emb[1]
    (path / "embeddings.npy").unlink()
    np.save(path / "embeddings.npy", emb)
    m = json.loads((path / "manifest.json").read_text())
    m["files"]["embeddings.npy"] = sha256_file(path / "embeddings.npy")
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexVersionError, match="embeddings.npy rows 0"):
        verify_version(path)
    assert load_version(path).count == len(after)


def test_a_delta_shares_the_base_it_was_checked_with_and_only_that_one(tmp_path, tiny_bundle_path, data):
    """load_version(delta, base=the served base): the base's opened index and rows are reused,
    not read again (here: a base index.faiss damaged after it was loaded goes unnoticed by the
    shared load, and is refused by a fresh one); a base that is not the pinned one is ignored."""
    root = tmp_path / "index"
    base_path = build(root, tiny_bundle_path, data, "HNSW8")
    served = load_version(root / "current")
    write_items(data, change_catalog(read_items_raw(data), seed=13))
    path = update(ucfg(root, data=data)).path
    fresh = load_version(path)
    shared = load_version(path, base=served.verified_base)
    assert shared.topk.base is served.topk and fresh.topk.base is not served.topk
    assert shared.verified_base is served.verified_base and fresh.verified_base.manifest_sha256 == served.verified_base.manifest_sha256
    q = user_queries(fresh)
    assert all_results(shared, q, 10) == all_results(fresh, q, 10)
    # a delta of a delta's session: the next load shares the same base again
    assert load_version(path, base=shared.verified_base).topk.base is served.topk
    other = dataclasses.replace(served.verified_base, manifest_sha256="0" * 64)
    assert load_version(path, base=other).topk.base is not served.topk
    # replaced, not truncated in place: the served index is memory-mapped (a truncated mapping is SIGBUS)
    (base_path / "damaged.tmp").write_bytes(b"damaged")
    os.replace(base_path / "damaged.tmp", base_path / "index.faiss")
    assert load_version(path, base=served.verified_base).count == fresh.count
    with pytest.raises(IndexVersionError, match="index.faiss sha256 mismatch"):
        load_version(path)


def test_events_mode_equals_the_whole_catalog_mode(tmp_path, tiny_bundle_path, data):
    """--upsert/--remove item events give the same catalog as the corresponding items.csv."""
    items = read_items_raw(data)
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        build(root, tiny_bundle_path, data)
    after = change_catalog(items, seed=4)
    removed = sorted(set(items["item_id"]) - set(after["item_id"]))
    merged = after.merge(items, how="left", on="item_id", suffixes=("", "_old"), indicator=True)
    cols = list(items.columns)
    changed = merged[(merged["_merge"] == "left_only") | (merged[cols[1:]].to_numpy() != merged[[c + "_old" for c in cols[1:]]].to_numpy()).any(axis=1)]
    changed[cols].to_csv(tmp_path / "upsert.csv", index=False)
    pd.DataFrame({"item_id": removed}).to_csv(tmp_path / "remove.csv", index=False)
    write_items(data, after)
    ra = update(ucfg(roots[0], data=data))
    rb = update(ucfg(roots[1], upsert=tmp_path / "upsert.csv", remove=tmp_path / "remove.csv"))
    assert {k: ra.stats[k] for k in ("new", "removed", "feature_changed", "embedded")} == {
        k: rb.stats[k] for k in ("new", "removed", "feature_changed", "embedded")}
    va, vb = load_version(roots[0] / "current"), load_version(roots[1] / "current")
    assert set(va.topk.rows) == set(vb.topk.rows) == set(after["item_id"])
    for cond in ({"color": "green"}, {"color": "red"}, {"stock": False}, {"stock": True}):
        ids = [{v.topk.item_ids[r] for r in v.attributes.allowed(parse_filter(cond)).rows} for v in (va, vb)]
        assert ids[0] == ids[1]
    q = user_queries(va)
    for ga, gb in zip(all_results(va, q, 20), all_results(vb, q, 20), strict=True):
        assert [i for i, _ in ga] == [i for i, _ in gb]
    # a remove-only event stream
    pd.DataFrame({"item_id": [after["item_id"].iloc[0], "never-there"]}).to_csv(tmp_path / "rm2.csv", index=False)
    rc = update(ucfg(roots[1], remove=tmp_path / "rm2.csv"))
    assert rc.stats["removed"] == 1 and rc.stats["removed_unknown_ids"] == 1 and rc.stats["embedded"] == 0


def test_size_cap_refuses_and_keeps_current(tmp_path, tiny_bundle_path, data):
    root = tmp_path / "index"
    build(root, tiny_bundle_path, data)
    before = root_snapshot(root)
    items = read_items_raw(data)
    items.loc[:30, "category"] = "c_other"  # 31 of 200 items: 15.5 % > 5 %
    write_items(data, items)
    with pytest.raises(DeltaTooLargeError, match="run indexer rebuild"):
        update(UpdateConfig(root=root, data=data))
    assert root_snapshot(root) == before and not list(root.glob(".tmp-*"))
    assert cli_main(["update", "--root", str(root), "--data", str(data), "-q"]) == 6
    assert cli_main(["update", "--root", str(root), "--data", str(data), "--max-delta", "0.2", "-q"]) == 0


def test_rollback_across_deltas_and_retention_keeps_referenced_bases(tmp_path, tiny_bundle_path, data, capsys):
    root = tmp_path / "index"
    base = build(root, tiny_bundle_path, data)
    items = read_items_raw(data)
    paths = []
    for seed in (5, 6, 7):
        items = change_catalog(items, seed)
        write_items(data, items)
        paths.append(update(ucfg(root, data=data, keep=2)).path)
    # keep=2 kept the two newest deltas, and their base although it is older
    assert [p.name for p in store.list_versions(root)] == [base.name, paths[1].name, paths[2].name]
    assert store.rollback(root).name == paths[1].name
    assert load_version(root / "current").index_version == paths[1].name
    assert store.rollback(root).name == base.name
    assert load_version(root / "current").base is None
    assert store.rollback(root, paths[2].name).name == paths[2].name
    assert cli_main(["verify", "--root", str(root)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["base"] == base.name and out["item_query_recall"] == 1.0
    assert cli_main(["list", "--root", str(root), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["base"] for r in rows] == [None, base.name, base.name]
    # a delta whose base is gone, or whose base changed, is refused
    shutil.copytree(base, tmp_path / "saved-base")
    store.delete_version(root, base)
    with pytest.raises(IndexVersionError, match="base version .* is missing"):
        verify_version(paths[2])
    shutil.copytree(tmp_path / "saved-base", base)
    m = json.loads((base / "manifest.json").read_text())
    m["created_at"] = "2000-01-01T00:00:00+00:00"
    (base / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexVersionError, match="not the one this delta was built on"):
        verify_version(paths[2])


def test_rebuild_compacts_and_prunes_the_deltas(tmp_path, tiny_bundle_path, data):
    root = tmp_path / "index"
    build(root, tiny_bundle_path, data)
    items = change_catalog(read_items_raw(data), 8)
    write_items(data, items)
    update(ucfg(root, data=data))
    res = rebuild(RebuildConfig(model=tiny_bundle_path, data=data, out=root, progress=False, keep=1))
    assert res.manifest.get("delta") is None and res.manifest["count"] == len(items)
    assert [p.name for p in store.list_versions(root)] == [res.path.name]


def test_retired_items_train_but_are_never_indexed(tmp_path, dataset_copy):
    """`trainer fit` on clicks whose item left items.csv, then a rebuild: those ids are in the
    model's item vocabulary but not in the index."""
    from tests.conftest import tiny_train_config
    from training.bundle import load_bundle
    from training.train import fit

    items = read_items_raw(dataset_copy)
    clicked = pd.read_csv(dataset_copy / "interactions.csv", dtype=str)["item_id"].value_counts().index[:5].tolist()
    write_items(dataset_copy, items[~items["item_id"].isin(clicked)])
    bundle = fit(dataset_copy, tmp_path / "models", tiny_train_config(epochs=1), progress=False)
    assert set(clicked) <= set(load_bundle(bundle).model.item_encoder.ids.tokens)
    v = load_version(build(tmp_path / "index", bundle, dataset_copy))
    assert not set(clicked) & set(v.item_ids) and v.count == len(items) - 5


# ---- crashes and the lock (subprocesses, the rebuild tests' hook) -------------------------------


def _update_cmd(root: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "indexer.cli", "update", "--root", str(root), "--data", str(data), "--max-delta", "0.5",
            "--gate-k", "10", "-q"]


def _env(hook: str, marker: Path) -> dict[str, str]:
    import os

    return {**os.environ, "INDEXER_TEST_HOOK": hook, "INDEXER_TEST_HOOK_FILE": str(marker), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def updated_root(tmp_path: Path, tiny_bundle_path: Path, data: Path) -> Path:
    """A root whose current is a delta version, and the dataset changed once more."""
    root = tmp_path / "index"
    build(root, tiny_bundle_path, data, "HNSW8")
    items = change_catalog(read_items_raw(data), 10)
    write_items(data, items)
    update(ucfg(root, data=data))
    write_items(data, change_catalog(items, 11))
    return root


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "locked"])
def test_sigkill_at_any_stage_of_update_keeps_current_and_next_run_cleans_up(stage, tmp_path, updated_root, data):
    root = updated_root
    before = root_snapshot(root)
    base_name = load_version(root / "current").base
    base_digest = tree_digest(root / base_name)
    old = {p.name for p in store.list_versions(root)}
    marker = tmp_path / "marker"
    proc = subprocess.run(_update_cmd(root, data), env=_env(f"kill:{stage}", marker), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert marker.read_text().startswith(stage)
    new = {p.name for p in store.list_versions(root)} - old
    tmp_dirs = list(root.glob(".tmp-*"))
    if stage.startswith("write:"):
        assert tmp_dirs and not new
    if stage in ("renamed", "switched"):
        assert len(new) == 1
        verify_version(root / new.pop())
    if stage == "switched":
        assert store.read_current(root).name != before[0]
    else:
        assert root_snapshot(root) == before  # the pointer and every byte of the served delta
    assert tree_digest(root / base_name) == base_digest  # base files are never modified
    res = update(ucfg(root, data=data))
    assert not list(root.glob(".tmp-*")) and {p.name for p in res.cleaned} == {p.name for p in tmp_dirs}
    assert store.read_current(root) == res.path.resolve()


def test_update_fails_on_the_lock_held_by_a_rebuild(tmp_path, updated_root, tiny_bundle_path, data):
    root = updated_root
    before = root_snapshot(root)
    marker = tmp_path / "marker"
    cmd = [sys.executable, "-m", "indexer.cli", "rebuild", "--model", str(tiny_bundle_path), "--data", str(data),
           "--out", str(root), "--no-progress", "-q"]
    first = subprocess.Popen(cmd, env=_env("pause:write:embeddings", marker), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(_update_cmd(root, data), capture_output=True, text=True, timeout=60)
        assert second.returncode == 3
        assert second.stderr.count("\n") == 1 and "held by another indexer run" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert root_snapshot(root) == before
    res = update(ucfg(root, data=data))
    assert res.cleaned and not list(root.glob(".tmp-*"))
