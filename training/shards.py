"""Integer-coded Parquet shards of the training rows, each rank reading only its own (issue 20).

`trainer prepare shards --data DATASET_DIR --out SHARDS_DIR --shards N [--rows full|train|fit]`
reads the dataset once with the streaming, integer-coding reader (`training.dataset.read_coded`,
21 bytes a row in memory), applies the EVAL.md split on the codes (`split_coded`) and writes

* `part-00000.parquet` ... : columns `user`, `item` (int32 codes), `timestamp` (int64 seconds),
  `weight` (float32) and `row` (int64: the row of interactions.csv it came from), one row per
  training interaction of the chosen rows (`full`: every click, what `trainer fit --full`
  trains on; `train`: fit + val; `fit`: the tuning rows), assigned to shards by a seeded
  permutation, so every shard is a uniform sample and shard sizes differ by at most one row;
* `users.parquet` / `items.parquet`: the vocabularies, code → id (`user_id` / `item_id`; items
  are the catalog in items.csv order, then the retired items);
* `shards.json`: the manifest (format, row counts per shard, vocabulary sizes, the dataset's
  fingerprint, the seed and which rows), written last: a directory with a manifest is complete
  (and the whole directory is renamed into place, like every artifact).

Reading (`read_rank_shards`, or `Ranks.read_shards` under torchrun): with N shards over W ranks
(W must divide N), rank r reads shards r, r + W, r + 2W, ... and nothing else, so a rank's
memory holds 1/W of the rows. Collectives need equal shapes: every rank keeps the same number of
rows, the smallest rank's total (the others drop at most N/W of their last rows; named in the
result), known from the manifest alone, without a collective. Each epoch every rank draws the
same seeded permutation of its local positions (`epoch_order`), and rank r's part of global
batch b is its rows at positions `order[lo:hi]`: the global batch is the rank parts
concatenated in rank order (`global_batch`), which one process can reproduce over the ranks'
rows concatenated — the property the tests check.

What this does not do yet: `trainer fit` still reads the dataset directory in every rank
(training/train.py builds its tables from the str frames); the per-user histories and the
EVAL.md validation need a user's rows together and stay on the full data of rank 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.artifacts import atomic_directory, read_json, write_json
from training.dataset import CodedInteractions, fingerprint, read_coded, split_coded
from training.schema import DatasetError

log = logging.getLogger("trainer.shards")

FORMAT = 1
MANIFEST = "shards.json"
ROWS = ("full", "train", "fit")
COLUMNS = ("user", "item", "timestamp", "weight", "row")


class ShardError(ValueError):
    """A shards directory is incomplete, of another format, or does not split over the ranks."""


def shard_file(s: int) -> str:
    return f"part-{s:05d}.parquet"


def training_rows(coded: CodedInteractions, rows: str) -> np.ndarray:
    """Positions of the rows `trainer fit` trains on: `full` every click (file order), `train`
    fit + val, `fit` the tuning rows (EVAL.md order)."""
    if rows not in ROWS:
        raise ValueError(f"rows={rows!r}: expected one of {list(ROWS)}")
    if rows == "full":
        return np.flatnonzero(coded.clicked)
    split = split_coded(coded)
    return split.train if rows == "train" else split.fit


def assign(n_rows: int, n_shards: int, seed: int) -> list[np.ndarray]:
    """Positions 0..n_rows-1 dealt to `n_shards` shards by a seeded permutation (sizes differ by
    at most one; shard s gets the permutation's entries s, s + n, ...), each sorted."""
    perm = np.random.default_rng(seed).permutation(n_rows)
    return [np.sort(perm[s::n_shards]) for s in range(n_shards)]


def write_shards(
    data_dir: str | Path, out: str | Path, n_shards: int, *, rows: str = "full", seed: int = 0,
    coded: CodedInteractions | None = None,
) -> Path:
    """Write the shards directory `out` (see the module docstring); returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if n_shards < 1:
        raise ValueError(f"n_shards={n_shards}: need at least one shard")
    out = Path(out)
    if out.exists():
        raise DatasetError(f"{out}: already exists; remove it or choose another --out")
    coded = coded if coded is not None else read_coded(data_dir)
    chosen = training_rows(coded, rows)
    if len(chosen) < n_shards:
        raise DatasetError(f"{data_dir}: {len(chosen)} training row(s) ({rows}) cannot fill {n_shards} shards")
    with atomic_directory(out) as tmp:
        sizes = []
        for s, part in enumerate(assign(len(chosen), n_shards, seed)):
            pos = chosen[part]
            table = pa.table({
                "user": coded.user[pos], "item": coded.item[pos], "timestamp": coded.timestamp[pos],
                "weight": coded.weight[pos], "row": pos.astype(np.int64),
            })
            pq.write_table(table, tmp / shard_file(s))
            sizes.append(len(pos))
        pq.write_table(pa.table({"user_id": pa.array(coded.user_ids.tolist(), pa.string())}), tmp / "users.parquet")
        pq.write_table(pa.table({"item_id": pa.array(coded.item_ids.tolist(), pa.string())}), tmp / "items.parquet")
        write_json(tmp / MANIFEST, {
            "format": FORMAT, "rows": rows, "seed": seed, "shard_rows": sizes, "total_rows": int(sum(sizes)),
            "users": len(coded.user_ids), "items": len(coded.item_ids), "catalog_items": coded.n_catalog,
            "dataset_fingerprint": fingerprint(data_dir), "columns": list(COLUMNS),
        })
    log.info("wrote %d shards of %s rows (%d in all) to %s", n_shards, rows, sum(sizes), out)
    return out


def read_manifest(path: str | Path) -> dict:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise ShardError(f"{path}: no {MANIFEST}; not a complete shards directory (trainer prepare shards)")
    manifest = read_json(p)
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{p}: format {manifest.get('format')!r}, this trainer reads format {FORMAT}")
    return manifest


def rank_shards(n_shards: int, rank: int, world: int) -> list[int]:
    """The shards rank `rank` of `world` reads: rank, rank + world, ... (world must divide n_shards)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world size {world}: need 0 <= rank < world")
    if n_shards % world:
        raise ShardError(
            f"{n_shards} shard(s) do not split over {world} ranks; write a multiple of {world} "
            "(trainer prepare shards --shards)"
        )
    return list(range(rank, n_shards, world))


def rows_per_rank(shard_rows: list[int], world: int) -> int:
    """What every rank keeps: the smallest rank total (equal shapes for the collectives)."""
    return min(sum(shard_rows[s] for s in rank_shards(len(shard_rows), r, world)) for r in range(world))


@dataclass
class RankRows:
    """One rank's training rows, read from its shards only (equal length on every rank)."""

    user: np.ndarray        # int32 codes into users.parquet
    item: np.ndarray        # int32 codes into items.parquet
    timestamp: np.ndarray   # int64
    weight: np.ndarray      # float32
    row: np.ndarray         # int64: the interactions.csv row
    shards: list[int]
    dropped: int            # rows of this rank's shards left out to match the smallest rank
    manifest: dict = field(repr=False)

    def __len__(self) -> int:
        return len(self.user)


def read_rank_shards(path: str | Path, rank: int = 0, world: int = 1) -> RankRows:
    """Rank `rank`'s rows: only its shards are opened (see the module docstring)."""
    import pyarrow.parquet as pq

    path = Path(path)
    manifest = read_manifest(path)
    sizes = manifest["shard_rows"]
    mine = rank_shards(len(sizes), rank, world)
    keep = rows_per_rank(sizes, world)
    cols: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
    for s in mine:
        table = pq.read_table(path / shard_file(s), columns=list(COLUMNS))
        if table.num_rows != sizes[s]:
            raise ShardError(f"{path / shard_file(s)}: {table.num_rows} rows, the manifest says {sizes[s]}")
        for c in COLUMNS:
            cols[c].append(table.column(c).to_numpy())
        del table
    got = {c: np.concatenate(v)[:keep] for c, v in cols.items()}
    dropped = sum(sizes[s] for s in mine) - keep
    if dropped:
        log.info("rank %d: %d row(s) of its shards left out to match the smallest rank (%d rows)", rank, dropped, keep)
    return RankRows(**got, shards=mine, dropped=dropped, manifest=manifest)


def read_vocabularies(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids, item_ids): code → id of the shards' user and item columns."""
    import pyarrow.parquet as pq

    path = Path(path)
    return (np.asarray(pq.read_table(path / "users.parquet").column("user_id").to_pylist(), dtype=object),
            np.asarray(pq.read_table(path / "items.parquet").column("item_id").to_pylist(), dtype=object))


def epoch_order(n_local: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of local positions every rank draws for `epoch` (identical on every rank,
    since every rank holds the same number of rows)."""
    return np.random.default_rng([seed, epoch]).permutation(n_local)


def global_batch(rank_parts: list[np.ndarray]) -> np.ndarray:
    """The global batch as one process sees it: the ranks' parts concatenated in rank order."""
    if len({len(p) for p in rank_parts}) > 1:
        raise ShardError(f"rank batch parts of unequal sizes {[len(p) for p in rank_parts]}")
    return np.concatenate(rank_parts)
