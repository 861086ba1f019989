"""Integer-coded Parquet shards (training/shards.py): every rank reads only its shards, the
ranks' rows are disjoint, of equal length and together the training rows; the ranks' parts of a
global batch concatenate to the batch one process draws over their rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.training.test_distributed import join, run_ranks
from training import distributed
from training.dataset import read_coded, read_dataset, split_coded
from training.distributed import ShardMismatchError
from training.shards import (
    ShardError,
    epoch_order,
    global_batch,
    read_manifest,
    read_rank_shards,
    read_vocabularies,
    rows_per_rank,
    training_rows,
    write_shards,
)
from training.split import split_interactions


@pytest.fixture(scope="module")
def shards(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tiny_dataset, tmp_path_factory.mktemp("sh") / "shards", 4, rows="full", seed=5)


def test_training_rows_are_what_fit_trains_on(tiny_dataset: Path) -> None:
    ds, coded = read_dataset(tiny_dataset), read_coded(tiny_dataset)
    split = split_interactions(ds.interactions)
    clicked = ds.interactions[ds.interactions["clicked"].to_numpy()].reset_index(drop=True)
    for rows, want in (("full", clicked), ("train", split.train), ("fit", split.fit)):
        got = coded.frame(training_rows(coded, rows)).reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert len(split_coded(coded).fit) == len(split.fit)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_rows_are_disjoint_equal_and_cover_the_training_rows(shards: Path, tiny_dataset: Path, world: int) -> None:
    coded = read_coded(tiny_dataset)
    manifest = read_manifest(shards)
    sizes = manifest["shard_rows"]
    assert sum(sizes) == manifest["total_rows"] == int(coded.clicked.sum()) and max(sizes) - min(sizes) <= 1
    parts = [read_rank_shards(shards, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == rows_per_rank(sizes, world)
    assert [p.shards for p in parts] == [list(range(r, 4, world)) for r in range(world)]
    rows = np.concatenate([p.row for p in parts])
    assert len(np.unique(rows)) == len(rows)  # disjoint
    assert len(rows) + sum(p.dropped for p in parts) == manifest["total_rows"]
    assert sum(p.dropped for p in parts) <= world * (4 // world)
    users, items = read_vocabularies(shards)
    assert list(users) == list(coded.user_ids) and list(items) == list(coded.item_ids)
    for p in parts:  # every column is the interaction at that row
        np.testing.assert_array_equal(p.user, coded.user[p.row])
        np.testing.assert_array_equal(p.item, coded.item[p.row])
        np.testing.assert_array_equal(p.timestamp, coded.timestamp[p.row])
        np.testing.assert_array_equal(p.weight, coded.weight[p.row])
    if world == 1:  # one rank: every training row, none dropped
        np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(coded.clicked))


def test_rank_parts_of_each_global_batch_union_to_the_one_process_batch(shards: Path) -> None:
    world, per_rank_batch, seed = 2, 64, 3
    parts = [read_rank_shards(shards, r, world) for r in range(world)]
    n_local = len(parts[0])
    together = np.concatenate([p.row for p in parts])  # one process: the ranks' rows in rank order
    for epoch in (1, 2):
        orders = [epoch_order(n_local, seed, epoch) for _ in range(world)]
        assert all((o == orders[0]).all() for o in orders)  # every rank draws the same permutation
        seen = []
        for lo in range(0, n_local - per_rank_batch + 1, per_rank_batch):
            rank_parts = [p.row[orders[r][lo : lo + per_rank_batch]] for r, p in enumerate(parts)]
            batch = global_batch(rank_parts)
            one = together[np.concatenate([r * n_local + orders[0][lo : lo + per_rank_batch] for r in range(world)])]
            np.testing.assert_array_equal(batch, one)
            assert len(batch) == world * per_rank_batch
            seen.append(batch)
        seen = np.concatenate(seen)
        assert len(np.unique(seen)) == len(seen)  # each row at most once an epoch
    assert not (epoch_order(n_local, seed, 1) == epoch_order(n_local, seed, 2)).all()
    with pytest.raises(ShardError, match="unequal sizes"):
        global_batch([np.arange(3), np.arange(2)])


def test_shard_errors(shards: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="4 shard\\(s\\) do not split over 3 ranks"):
        read_rank_shards(shards, 0, 3)
    with pytest.raises(ShardError, match="no shards.json"):
        read_rank_shards(tmp_path, 0, 1)
    with pytest.raises(Exception, match="already exists"):
        write_shards(tiny_dataset, shards, 2)


def test_cli_prepare_shards(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    p = subprocess.run([sys.executable, "-m", "training.cli", "prepare", "shards", "--data", str(tiny_dataset),
                        "--out", str(out), "--shards", "2", "--rows", "fit"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == str(out)
    m = json.loads((out / "shards.json").read_text())
    assert m["rows"] == "fit" and len(m["shard_rows"]) == 2


# ---- 2 gloo ranks: each reads its shards; different directories fail before training --------------


def shard_worker(rank: int, world: int, tmp: Path, shards: Path, other: Path) -> None:
    ranks = join(rank, world, tmp, timeout_s=60.0)
    rows = ranks.read_shards(shards)
    out: dict = {"rows": rows.row.tolist(), "shards": rows.shards}
    try:
        ranks.read_shards(shards if rank == 0 else other)
    except ShardMismatchError as e:
        out["mismatch"] = str(e)
    (tmp / f"shards{rank}.json").write_text(json.dumps(out))
    distributed.shutdown()


def test_two_gloo_ranks_read_their_shards(shards: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    other = write_shards(tiny_dataset, tmp_path / "other", 4, rows="fit", seed=5)
    run_ranks(shard_worker, tmp_path, shards, other, timeout_s=120)
    got = [json.loads((tmp_path / f"shards{r}.json").read_text()) for r in range(2)]
    assert got[0]["shards"] == [0, 2] and got[1]["shards"] == [1, 3]
    assert len(got[0]["rows"]) == len(got[1]["rows"]) and not set(got[0]["rows"]) & set(got[1]["rows"])
    for r in got:
        assert "unequal shards" in r["mismatch"] and "which='full'" in r["mismatch"] and "which='fit'" in r["mismatch"]
