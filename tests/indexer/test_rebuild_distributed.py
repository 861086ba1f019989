"""`torchrun ... -m indexer.cli rebuild`: 2 ranks embed the catalog into one memory-mapped array,
rank 0 builds, and the version's embeddings are byte-identical to a one-process rebuild."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from indexer.rebuild import RebuildConfig, rank_rows, rebuild
from training.distributed import Ranks

REPO = Path(__file__).resolve().parents[2]


def test_rank_rows_split_whole_chunks_contiguously() -> None:
    for n, batch, world in [(200, 64, 2), (200, 64, 3), (10, 64, 2), (1000, 7, 4), (64, 64, 2)]:
        spans = [rank_rows(n, batch, Ranks(rank=r, world=world)) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False):
            assert hi == lo  # contiguous, no row twice or never
        assert all(lo % batch == 0 for lo, _ in spans)  # every chunk is a one-process chunk


def test_two_rank_rebuild_is_byte_identical_to_one_process(tiny_bundle_path: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    one = rebuild(RebuildConfig(model=tiny_bundle_path, data=tiny_dataset, out=tmp_path / "one", embed_batch=64,
                                progress=False)).path
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "indexer.cli",
           "rebuild", "--model", str(tiny_bundle_path), "--data", str(tiny_dataset), "--out", str(tmp_path / "two"),
           "--embed-batch", "64", "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [ln for ln in done.stdout.splitlines() if ln.startswith(str(tmp_path / "two"))]
    assert len(printed) == 1  # rank 0 prints the version, the other rank nothing
    two = Path(printed[0])
    assert "embedded 200 items on 2 ranks: [128, 72] rows each" in done.stdout
    assert (two / "embeddings.npy").read_bytes() == (one / "embeddings.npy").read_bytes()
    assert (two / "item_ids.txt").read_bytes() == (one / "item_ids.txt").read_bytes()
    assert np.load(two / "embeddings.npy").shape[0] == 200
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".tmp-")]  # the shared array is gone
