"""The request path's building blocks on their own: re-scoring/ordering and the tower's row path.

`_finish` and `UserTower.embed` are written for per-call overhead (see their docstrings); these
tests pin what they must still do against plain reference implementations: order by (exact score
desc, catalog row asc), drop -1 padding and repeated rows, honour exclusions and k, and give a
user the same bits whether embedded alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.retrieval import Query, _finish, exact_scores
from service.tower import UserRecord, UserTower
from tests.service.conftest import FEATURES
from training.bundle import load_bundle


@dataclass
class _Version:
    """The two attributes of a ServingVersion that `_finish` reads."""

    embeddings: np.ndarray
    item_ids: list[str]


def _reference(version: _Version, vec: np.ndarray, rows: np.ndarray, q: Query) -> list[tuple[str, float]]:
    rows = np.unique(rows[rows >= 0])
    scores = exact_scores(version.embeddings, rows, vec).tolist()
    ranked = sorted(zip(rows.tolist(), scores, strict=True), key=lambda rs: (-rs[1], rs[0]))
    out = [(version.item_ids[r], s) for r, s in ranked if version.item_ids[r] not in q.exclude]
    return out[: q.k]


def test_finish_orders_by_score_then_row_and_filters_like_the_reference() -> None:
    rng = np.random.default_rng(0)
    n, d = 200, 8
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[11] = emb[10]  # identical vectors: tied scores, broken by row
    emb[150] = emb[3]
    version = _Version(emb, [f"i{i}" for i in range(n)])
    for trial in range(3000):
        vec = rng.normal(size=d).astype(np.float32)
        vec /= np.linalg.norm(vec)
        rows = rng.choice(n, size=int(rng.integers(0, 40)), replace=trial % 4 == 0).astype(np.int64)
        if len(rows) and trial % 3 == 0:
            rows[rng.integers(0, len(rows), size=3)] = -1  # ANN padding
        if trial % 5 == 0:
            rows = np.concatenate([rows, [10, 11, 3, 150]]).astype(np.int64)
        exclude = frozenset(f"i{i}" for i in rng.choice(n, size=int(rng.integers(0, 3)) * 4))
        q = Query(UserRecord(None, {}), int(rng.integers(1, 30)), exclude)
        assert _finish(version, vec, rows, q) == _reference(version, vec, rows, q)


def test_finish_of_nothing_or_only_padding_is_empty() -> None:
    version = _Version(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
    q = Query(UserRecord(None, {}), 3, frozenset())
    vec = np.array([1, 0, 0, 0], np.float32)
    assert _finish(version, vec, np.array([], np.int64), q) == []
    assert _finish(version, vec, np.array([-1, -1], np.int64), q) == []


def test_tower_gives_the_same_bits_alone_and_in_a_batch(bundle_a: Path) -> None:
    tower = UserTower(load_bundle(bundle_a).model)
    assert tower.fast is not None, tower.fast_path_reason
    records = [
        UserRecord("u1", tower.validate(FEATURES)),
        UserRecord(None, {}),
        UserRecord("nobody", tower.validate({"age": 1e6, "device": "web"})),
    ]
    alone = [tower.embed([r]) for r in records]
    batch = tower.embed(records)
    for i, row in enumerate(alone):
        assert row.shape == (1, tower.dim) and row.dtype == np.float32
        assert row.tobytes() == batch[i : i + 1].tobytes()
    reference = tower._reference(records)
    np.testing.assert_allclose(batch, reference, atol=1e-5)
