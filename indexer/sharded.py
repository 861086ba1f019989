"""Sharded index build: train once on a sample, fill shards in parallel, merge with FAISS.

An IVF index is a trained part (the coarse quantizer's centroids, the PQ / SQ codebooks, a
transform, the refine index's codebook) and a filled part (each vector's code in the inverted
list of its centroid, and for a refined index its refine code in row order). Only the trained
part needs all the data at once, and only a sample of it (`faiss_index.train_index`); filling
is independent per vector. So a catalog too big to add in one pass — or on one core — is
split into contiguous row ranges, each range is added to its own copy of the trained index
(FAISS releases the GIL, so threads run in parallel; each sets its own OpenMP thread count,
which is per thread), and the copies are merged in row order with FAISS's own
`IndexIVF.merge_from` (inverted lists, keeping the global ids given at add time) and
`IndexFlatCodes.merge_from` (refine codes, appended). Because every shard uses the same trained
quantizer and the merge appends in row order, the merged index holds exactly the lists a
single-process build over the same trained index would hold, in the same order: the same search
results, ids and scores (tested).

Beyond one machine's RAM the shards are written to files and merged into on-disk inverted
lists with `faiss.contrib.ondisk.merge_ondisk` (`merge_shards_ondisk`): the index file then
holds only the trained part and the lists live in a memory-mapped `.ivfdata` file.

HNSW graphs cannot be merged (a graph built per shard is a different, worse graph), so only
the IVF family (optionally behind a transform, optionally refined) and Flat can be sharded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np

from indexer import faiss_index as fi

__all__ = ["build_sharded", "fill_shard", "merge_shards", "merge_shards_ondisk", "shard_bounds"]


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """`n_shards` contiguous [start, stop) row ranges covering 0..n, sizes differing by <= 1."""
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
    if n_shards > max(n, 1):
        raise ValueError(f"{n_shards} shards for {n} vectors: at most one shard per vector")
    edges = np.linspace(0, n, n_shards + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _parts(index: faiss.Index) -> tuple[faiss.Index, faiss.Index | None]:
    """(the index that takes ids: the refined base or the index itself, the refine index or None)."""
    refine = fi.refine_of(index)
    top = faiss.downcast_index(index)
    if refine is not None and not isinstance(top, faiss.IndexRefine):
        raise ValueError("a transform in front of a refined index cannot be sharded; put the transform in the base")
    if refine is not None:
        return faiss.downcast_index(refine.base_index), faiss.downcast_index(refine.refine_index)
    return top, None


def _check_shardable(template: faiss.Index) -> str:
    fam = fi.index_family(template)
    if fam == "hnsw":
        raise ValueError("an HNSW graph cannot be built in shards and merged; use an IVF index (or build HNSW in one process)")
    if not template.is_trained:
        raise ValueError("the template index is not trained; make it with faiss_index.train_index")
    if template.ntotal != 0:
        raise ValueError(f"the template index must be empty, it holds {template.ntotal} vectors")
    return fam


def fill_shard(template: faiss.Index, vectors: np.ndarray, start: int, *, threads: int | None = None) -> faiss.Index:
    """A copy of the trained, empty `template` holding `vectors` as rows start, start+1, ...

    IVF codes are added with their global row ids (`add_with_ids`); refine codes and Flat
    codes have no ids — their position is the row — and are appended in order at the merge.
    `threads`: this thread's OpenMP thread count (an OpenMP setting is per calling thread).
    """
    fam = _check_shardable(template)
    x = fi.as_matrix(vectors, name="shard vectors", dim=template.d)
    if threads is not None:
        fi.set_num_threads(threads)
    shard = faiss.clone_index(template)
    base, refine = _parts(shard)
    if fam == "ivf":
        base.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
    else:
        base.add(x)
    if refine is not None:
        refine.add(x)
    _fix_ntotal(shard)
    return shard


def merge_shards(template: faiss.Index, shards: Sequence[faiss.Index]) -> faiss.Index:
    """One index holding every shard's rows, `shards` in row order (each made by `fill_shard`
    from `template`; the shards are emptied: `merge_from` moves their codes)."""
    fam = _check_shardable(template)
    out = faiss.clone_index(template)
    base, refine = _parts(out)
    for i, shard in enumerate(shards):
        s_base, s_refine = _parts(shard)
        if fam == "ivf":
            # check_compatible_for_merge inside: same quantizer centroids, same code size
            faiss.extract_index_ivf(base).merge_from(faiss.extract_index_ivf(s_base), 0)
        else:
            base.merge_from(s_base)
        if refine is not None:
            if s_refine is None:
                raise ValueError(f"shard {i} has no refine index but the template has one")
            refine.merge_from(s_refine)
        _fix_ntotal(out)
        _fix_ntotal(shard)
    return out


def _fix_ntotal(index: faiss.Index) -> None:
    """Wrappers (IndexPreTransform, IndexRefine) keep their own ntotal, which merging their inner
    indexes does not update: set them from the innermost index, outside in."""
    chain = []
    cur = faiss.downcast_index(index)
    while isinstance(cur, (faiss.IndexPreTransform, faiss.IndexRefine)):
        chain.append(cur)
        cur = faiss.downcast_index(cur.index if isinstance(cur, faiss.IndexPreTransform) else cur.base_index)
    for wrapper in reversed(chain):
        inner = wrapper.index if isinstance(wrapper, faiss.IndexPreTransform) else wrapper.base_index
        wrapper.ntotal = inner.ntotal


def build_sharded(
    vectors: np.ndarray,
    factory: str,
    *,
    n_shards: int,
    workers: int | None = None,
    build_params: Mapping[str, int] | None = None,
    search_params: Mapping[str, int] | None = None,
    template: faiss.Index | None = None,
) -> faiss.Index:
    """`faiss_index.build_index`, with the add step split into `n_shards` contiguous shards
    filled by `workers` threads (default min(shards, usable CPUs)) and merged.

    `template`: an already trained empty index (e.g. trained once and reused, or by a test
    that compares against a one-process build over the same quantizer); else it is trained
    here on a sample, as `build_index` does.
    """
    x = fi.as_matrix(vectors, name="catalog vectors")
    if template is None:
        template = fi.train_index(x, factory, build_params=build_params)
    elif template.d != x.shape[1]:
        raise ValueError(f"template index has dimension {template.d}, vectors have {x.shape[1]}")
    bounds = shard_bounds(len(x), n_shards)
    workers = workers or min(n_shards, fi.available_cpus())
    per_worker = max(1, fi.available_cpus() // workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard") as pool:
        shards = list(pool.map(lambda b: fill_shard(template, x[b[0] : b[1]], b[0], threads=per_worker), bounds))
    index = merge_shards(template, shards)
    if search_params:
        fi.apply_search_params(index, search_params)
    return index


def merge_shards_ondisk(
    template: faiss.Index, shards: Sequence[faiss.Index], index_path: str | os.PathLike[str], ivfdata_path: str | os.PathLike[str]
) -> faiss.Index:
    """Merge IVF `shards` into on-disk inverted lists (`faiss.contrib.ondisk.merge_ondisk`): the
    lists go to `ivfdata_path` (memory-mapped when the index is read), the trained part with a
    reference to that file to `index_path`. Unrefined IVF only (a refine index would still
    hold its codes in RAM). Returns the index as read back from `index_path`."""
    from faiss.contrib.ondisk import merge_ondisk

    fam = _check_shardable(template)
    if fam != "ivf" or fi.is_refined(template):
        raise ValueError("on-disk merging is for unrefined IVF indexes")
    index_path, ivfdata_path = Path(index_path), Path(ivfdata_path)
    tmp = index_path.parent / f".shards-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=False)
    try:
        names = []
        for i, shard in enumerate(shards):
            name = tmp / f"shard{i}.faiss"
            faiss.write_index(shard, os.fspath(name))
            names.append(os.fspath(name))
        out = faiss.clone_index(template)
        merge_ondisk(out, names, os.fspath(ivfdata_path))
        _fix_ntotal(out)
        fi.write_index(out, index_path)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return fi.read_index(index_path)
