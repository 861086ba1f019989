"""FAISS inner-product indexes over unit vectors: pure functions over arrays.

The two-tower model scores a (user, item) pair by the cosine of their embeddings. Both towers
end in an L2 normalization, so cosine == inner product and retrieval is maximum inner product
search over the catalog's item vectors. Every index built here uses `METRIC_INNER_PRODUCT`;
an L2 index would rank unit vectors the same way but return distances instead of the cosine
scores the service promises, and some factory strings silently fall back to L2 (e.g.
`"HNSW16,PQ8"`), so the metric of every built or loaded index is checked.

Supported families (a FAISS factory string picks one):

- exact: `"Flat"` (`IndexFlatIP`), the default for small catalogs;
- graph: `"HNSW<M>"` / `"HNSW<M>,Flat"` / `"HNSW<M>,SQ8"`, search-time knob `efSearch`;
- inverted file: `"IVF<nlist>,Flat"`, `"IVF<nlist>,PQ<m>x<nbits>"`, `"IVF<nlist>,SQ8"`,
  optionally behind a transform (`"OPQ16,IVF1024,PQ16"`), search-time knob `nprobe`;
- re-ranked (FAISS `IndexRefine`): any of the above followed by `,RFlat` or `,Refine(<f>)`
  (`"IVF1024,PQ32,RFlat"`, `"IVF4096,PQ16,Refine(SQ8)"`). The base index proposes
  `k * k_factor` candidates from its compressed codes and the refine index re-scores them with
  better codes (RFlat: the exact float vectors, a full float copy held in the index file, so it
  costs as much memory as `Flat`; SQ8: one byte per dimension), keeping the best k. A PQ code
  loses the ordering among near neighbours (`IVF2048,PQ32x8` plateaus at recall@100 ~ 0.88 at
  1M items, docs/bench/index.md), re-ranking a few times k candidates restores it. Search-time
  knobs: the base's (`nprobe` / `efSearch`) and `k_factor`. The family of a refined index is
  its base's (`is_refined` tells them apart).

Search-time knobs are kept in a plain dict (`{"efSearch": 128}`, `{"nprobe": 32}`,
`{"nprobe": 16, "k_factor": 4}`) that the index manifest stores and `apply_search_params`
applies after loading.

Inputs are checked here with explicit exceptions, not `assert` (which `python -O` strips) and
not FAISS's own C++ checks (whose messages name no shape): a query of the wrong dimension, a
NaN or an infinity is a `ValueError` that says what was wrong.

Top-k with item ids, exclusions and exact scores over an index built here is `indexer.topk`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import faiss
import numpy as np

log = logging.getLogger(__name__)

METRIC = faiss.METRIC_INNER_PRODUCT
SEARCH_PARAM_NAMES = ("efSearch", "nprobe", "k_factor")
BUILD_PARAM_NAMES = ("efConstruction", "train_size", "kmeans_iters", "seed")
UNIT_NORM_ATOL = 1e-3
# Tolerance on float32 inner products when deciding ties (recall) and comparing scores.
SCORE_TOL = 1e-5

# Ladders tried by `tune_search_params`, smallest (fastest) first.
EF_SEARCH_LADDER = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
NPROBE_LADDER = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096)
# k_factor of a refined index: candidates re-ranked per result. The ladder's top is what nprobe
# is tuned at (a generous re-rank, so that nprobe alone limits recall), then the smallest
# k_factor that still reaches the target is kept.
K_FACTOR_LADDER = (1, 2, 3, 4, 6, 8, 12, 16)
# k_factor a refined index is built with (FAISS's default, 1, re-ranks nothing: the bare base
# ranking), kept when the rebuild is given --nprobe / --ef-search and skips the tuning
DEFAULT_K_FACTOR = 4


# ---------------------------------------------------------------------------------------------
# threads


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask / cgroup cpuset, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int | None = None) -> int:
    """Set FAISS's OpenMP thread count and return it.

    `None` means `OMP_NUM_THREADS` if set, else every CPU in the affinity mask. Oversubscribing
    (FAISS's default is the host's core count, which in a container can exceed the CPUs we may
    use) makes OpenMP spin-wait and is much slower than one thread per usable core.
    """
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        n = int(env) if env.isdigit() and int(env) > 0 else available_cpus()
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be a positive integer, got {n!r}")
    faiss.omp_set_num_threads(n)
    return n


# ---------------------------------------------------------------------------------------------
# array checks


def as_matrix(x: np.ndarray, *, name: str = "vectors", dim: int | None = None) -> np.ndarray:
    """`x` as a C-contiguous float32 (n, d) array, or a ValueError naming the problem.

    A 1-D array is one row. Rejects other ranks, a wrong dimension and non-finite values (a NaN
    in a FAISS query silently returns garbage neighbours; a NaN in the catalog poisons k-means).
    """
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} have dimension {a.shape[1]} (shape {a.shape}), the index has dimension {dim}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{name} contain non-finite values (NaN or inf) in {len(bad)} row(s), first row {int(bad[0])}")
    return a


def check_unit_rows(x: np.ndarray, *, name: str = "vectors", atol: float = UNIT_NORM_ATOL) -> None:
    """Raise ValueError unless every row has L2 norm 1 within `atol`.

    Inner product equals cosine only for unit vectors; a tower that forgot its normalization
    would silently rank long vectors first.
    """
    if len(x) == 0:
        return
    norms = np.linalg.norm(np.asarray(x, dtype=np.float32), axis=1)
    dev = np.abs(norms - 1.0)
    if not (dev <= atol).all():
        i = int(np.argmax(dev))
        n_bad = int((dev > atol).sum())
        raise ValueError(
            f"{name} must be L2-normalized: {n_bad} of {len(x)} rows have |norm - 1| > {atol}, "
            f"e.g. row {i} has norm {norms[i]:.6g}"
        )


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


# ---------------------------------------------------------------------------------------------
# index families and parameters


def index_family(index: faiss.Index) -> str:
    """'flat', 'hnsw' or 'ivf' for a supported index, else ValueError.

    Checks the metric too: every supported index ranks by inner product.
    """
    index = faiss.downcast_index(index)
    if index.metric_type != METRIC:
        raise ValueError(
            f"{type(index).__name__} uses metric {index.metric_type}, expected inner product ({METRIC}); "
            "cosine scores need METRIC_INNER_PRODUCT"
        )
    if isinstance(index, faiss.IndexPreTransform):
        return index_family(index.index)
    if isinstance(index, faiss.IndexRefine):
        refine = faiss.downcast_index(index.refine_index)
        if refine.metric_type != METRIC:
            raise ValueError(f"the refine index {type(refine).__name__} uses metric {refine.metric_type}, expected inner product ({METRIC})")
        if not isinstance(refine, (faiss.IndexFlat, faiss.IndexScalarQuantizer)):
            raise ValueError(f"unsupported refine index {type(refine).__name__}; use RFlat, Refine(Flat) or Refine(SQ8|SQfp16|SQ4)")
        return index_family(index.base_index)
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    raise ValueError(
        f"unsupported index type {type(index).__name__}; use Flat, HNSW<M>[,Flat|SQ8] or IVF<nlist>,<Flat|PQ..|SQ8>, "
        "optionally followed by ,RFlat or ,Refine(SQ8)"
    )


def refine_of(index: faiss.Index) -> faiss.IndexRefine | None:
    """The `IndexRefine` (downcast) at the top of `index` or behind its transforms, else None."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index if isinstance(index, faiss.IndexRefine) else None


def is_refined(index: faiss.Index) -> bool:
    """Whether `index` re-ranks its candidates with a refine index (`,RFlat` / `,Refine(..)`)."""
    return refine_of(index) is not None


def rescore_fetch(index: faiss.Index, k: int) -> int:
    """How many candidates to ask of `index` for an answer of `k` that is re-scored exactly.

    k, except for a refine index with lossy codes (`Refine(SQ8)`, `Refine(SQ4)`): its own order
    near the cut-off is off by its quantization error, so ceil(k × LOSSY_REFINE_OVERFETCH).
    The caller caps the result at the catalog size."""
    refine = refine_of(index)
    if refine is None:
        return k
    codes = faiss.downcast_index(refine.refine_index)
    if isinstance(codes, faiss.IndexScalarQuantizer) and codes.sq.qtype != faiss.ScalarQuantizer.QT_fp16:
        return math.ceil(k * LOSSY_REFINE_OVERFETCH)
    return k


def _inner(index: faiss.Index) -> faiss.Index:
    """The index that holds the knobs (HNSW / IVF / Flat) behind any IndexPreTransform and
    IndexRefine wrappers (a refined index's base), downcast."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexPreTransform, faiss.IndexRefine)):
        index = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index.base_index)
    return index


def get_search_params(index: faiss.Index) -> dict[str, int]:
    """The search-time knobs currently set on `index` ({} for an exact index)."""
    fam = index_family(index)
    inner = _inner(index)
    out: dict[str, int] = {}
    if fam == "hnsw":
        out["efSearch"] = int(inner.hnsw.efSearch)
    if fam == "ivf":
        out["nprobe"] = int(inner.nprobe)
    refine = refine_of(index)
    if refine is not None:
        out["k_factor"] = int(round(refine.k_factor))
    return out


def validate_search_params(index: faiss.Index, params: Mapping[str, object] | None) -> dict[str, int]:
    """Check `params` names and values against `index`'s family; return them as plain ints."""
    fam = index_family(index)
    allowed = {"flat": (), "hnsw": ("efSearch",), "ivf": ("nprobe",)}[fam]
    if is_refined(index):
        allowed = (*allowed, "k_factor")
    out: dict[str, int] = {}
    for name, value in (params or {}).items():
        if name not in SEARCH_PARAM_NAMES:
            raise ValueError(f"unknown search parameter {name!r}; known: {list(SEARCH_PARAM_NAMES)}")
        if name not in allowed:
            kind = f"{fam} index" + (" with refine" if is_refined(index) else " without refine")
            raise ValueError(f"search parameter {name!r} does not apply to a {kind} (applies: {list(allowed) or 'none'})")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"search parameter {name} must be a positive integer, got {value!r}")
        out[name] = int(value)
    if fam == "ivf" and "nprobe" in out:
        nlist = int(_inner(index).nlist)
        if out["nprobe"] > nlist:
            raise ValueError(f"nprobe={out['nprobe']} exceeds the index's nlist={nlist}")
    return out


def apply_search_params(index: faiss.Index, params: Mapping[str, object] | None) -> dict[str, int]:
    """Set search-time knobs (as stored in the manifest) on `index`; return the applied dict.

    Call once after loading: it mutates the index, so it must not race with searches.
    `search()` reads the values back from the index and passes them per call.
    """
    checked = validate_search_params(index, params)
    inner = _inner(index)
    if "efSearch" in checked:
        inner.hnsw.efSearch = checked["efSearch"]
    if "nprobe" in checked:
        inner.nprobe = checked["nprobe"]
    if "k_factor" in checked:
        refine = refine_of(index)
        assert refine is not None  # validated above
        refine.k_factor = float(checked["k_factor"])
    return checked


_IVF_RE = re.compile(r"IVF(\d+)")


def factory_nlist(factory: str) -> int | None:
    """The nlist of an IVF factory string (`"IVF1024,Flat"` → 1024), None if not IVF."""
    m = _IVF_RE.search(factory)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class IndexSpec:
    """What to build: a factory string, build-time and search-time parameters."""

    factory: str
    search_params: dict[str, int] = field(default_factory=dict)
    build_params: dict[str, int] = field(default_factory=dict)


# Chosen from docs/bench/index.md (2 shared cores, 64-d unit vectors calibrated on a trained
# model): exact search answers one query in ~0.1 ms at 20k items and ~0.9 ms at 100k, so it is
# the default while it stays under ~0.5 ms. Above that IVF-Flat reached recall@100 >= 0.95 at
# the lowest latency of every type tried, and builds far faster than HNSW (1M items: IVF2048
# builds in 12 s and answers at recall 0.95-0.97 in 0.07-0.10 ms p50; HNSW32 takes 88 s to
# reach 0.985 at 0.16 ms; IVF4096 is a little faster to search but 2.7x slower to build, which
# matters for a nightly job on 2 cores; IVF-PQ never reaches 0.95: quantization error). nlist
# ~ 2 sqrt(n) keeps ~500 vectors per list.
AUTO_FLAT_MAX = 50_000
AUTO_NLIST_MIN, AUTO_NLIST_MAX = 256, 8192
# Above this many items `auto` builds IVF-PQ re-ranked with one-byte scalar codes instead of
# IVF-Flat, for memory (docs/bench/bigindex.md, docs/bench/memory.md; 64-d, tuned for recall@100
# >= 0.95). At 1M items: IVF2048,Flat passes at nprobe 6 (0.13 ms p50, 264 bytes an item);
# PQ32 + Refine(SQfp16) passes at the same nprobe with k_factor 2 (0.36 ms, 168 bytes); PQ32 +
# Refine(SQ8) (104 bytes) passes at the same nprobe too once its candidates are over-fetched
# (`LOSSY_REFINE_OVERFETCH`, below: alone it needs nprobe 192 at 1M and fails at 3M, because
# SQ8's error reorders the cut-off); PQ32 + RFlat holds more than IVF-Flat (296 bytes). So
# IVF-Flat, the fastest, stays while its memory is affordable: a 2 GB serving worker (issue 20)
# holds its 264 bytes + the id column up to ~5M items. Above, the SQ8-refined index: at 10M
# items its 1.0 GB of codes + the id column fit a worker in 2 GB where the fp16-refined 1.6 GB
# did not (docs/bench/memory.md). Memory-mapping the index (`read_index(mmap=True)`) shares
# its pages between the workers of a machine, see docs/scale.md.
AUTO_REFINE_MIN: int | None = 5_000_000
AUTO_REFINE_DIMS_PER_CODE = 2  # PQ sub-quantizers of 2 dimensions, 8 bits each: d/2 bytes a vector
AUTO_REFINE = "Refine(SQ8)"
# A refine index with lossy codes (SQ8, SQ4) orders its candidates by approximate scores, so
# items within its quantization error of the k-th score fall on the wrong side of the cut-off.
# Serving re-scores every candidate exactly (indexer.topk), so it asks such an index for this
# many times k candidates and cuts after the exact re-score. Measured (1M items, d=64,
# IVF2048,PQ32x8,Refine(SQ8), nprobe 6, k_factor 2, 300 queries, candidates re-scored exactly):
# recall@100 0.929 with 1.0 k, 0.965 with 1.5 k, 0.966 with 2 k (IVF2048,SQfp16: 0.966).
LOSSY_REFINE_OVERFETCH = 1.5


def auto_nlist(n_items: int) -> int:
    """Inverted lists for `auto`: the power of two nearest 2 sqrt(n), within [256, 8192]."""
    nlist = 2 ** round(math.log2(2 * math.sqrt(n_items)))
    return int(min(max(nlist, AUTO_NLIST_MIN), AUTO_NLIST_MAX))


def auto_spec(n_items: int, dim: int, *, refine_min: int | None = AUTO_REFINE_MIN) -> IndexSpec:
    """The default index for a catalog of `n_items` vectors of dimension `dim`.

    Up to AUTO_FLAT_MAX: exact; above: IVF-Flat, or, above `refine_min` items (default
    AUTO_REFINE_MIN; None: never), IVF-PQ with d/2 one-byte codes re-ranked with fp16 codes
    (AUTO_REFINE; 2.6 bytes a dimension instead of 4.1) when the dimension splits into PQ
    sub-quantizers (even `dim`).
    Search parameters are left empty: the rebuild tunes nprobe (and k_factor) on a query sample
    for the recall target (`tune_search_params`) and stores the result in the manifest.
    """
    if n_items < 1 or dim < 1:
        raise ValueError(f"need a non-empty catalog, got n_items={n_items}, dim={dim}")
    if n_items <= AUTO_FLAT_MAX:
        return IndexSpec("Flat")
    nlist = auto_nlist(n_items)
    if refine_min is not None and n_items > refine_min and dim % AUTO_REFINE_DIMS_PER_CODE == 0:
        return IndexSpec(f"IVF{nlist},PQ{dim // AUTO_REFINE_DIMS_PER_CODE}x8,{AUTO_REFINE}")
    return IndexSpec(f"IVF{nlist},Flat")


# ---------------------------------------------------------------------------------------------
# build


def build_index(
    vectors: np.ndarray,
    factory: str = "Flat",
    *,
    build_params: Mapping[str, int] | None = None,
    search_params: Mapping[str, int] | None = None,
    progress: Callable[[int], None] | None = None,
    add_chunk: int = 65_536,
) -> faiss.Index:
    """Build an inner-product index over unit rows `vectors` (float32 (n, d)).

    Row i of `vectors` gets FAISS id i. `build_params`: `efConstruction` (HNSW graph quality,
    default FAISS's 40), `train_size` (IVF: vectors sampled for k-means; default 40 per list, just
    above FAISS's advice of 39, which cost no measurable recall against 64 per list at 1M items
    and trains 40% faster), `kmeans_iters`
    (default 10), `seed` (sampling and k-means). `progress(n_added)` is called after each chunk
    added, for a progress bar. `train_index` + adding every row; `indexer.sharded` fills the
    same trained index from several shards in parallel instead.
    """
    x = as_matrix(vectors, name="catalog vectors")
    index = train_index(x, factory, build_params=build_params)
    n = len(x)
    for s in range(0, n, add_chunk):
        index.add(x[s : s + add_chunk])
        if progress is not None:
            progress(min(s + add_chunk, n))
    if search_params:
        apply_search_params(index, search_params)
    return index


def train_index(vectors: np.ndarray, factory: str = "Flat", *, build_params: Mapping[str, int] | None = None) -> faiss.Index:
    """The empty, trained index of `factory` for the catalog `vectors` (checked unit rows): the
    coarse quantizer, PQ / SQ codebooks and refine codes trained on a sample of them (see
    `build_index` for `build_params`). Adding rows to it (one process, or shards in parallel
    and merged, `indexer.sharded`) gives the index."""
    x = as_matrix(vectors, name="catalog vectors")
    n, d = x.shape
    if n == 0:
        raise ValueError("cannot build an index over an empty catalog (0 vectors)")
    check_unit_rows(x, name="catalog vectors")
    bp = dict(build_params or {})
    unknown = set(bp) - set(BUILD_PARAM_NAMES)
    if unknown:
        raise ValueError(f"unknown build parameter(s) {sorted(unknown)}; known: {list(BUILD_PARAM_NAMES)}")
    seed = int(bp.get("seed", 0))
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(f"index factory must be a non-empty string, got {factory!r}")
    nlist = factory_nlist(factory)
    if nlist is not None and nlist > n:
        raise ValueError(f"{factory!r} has {nlist} inverted lists but the catalog has only {n} vectors; use a smaller IVF or Flat")
    try:
        index = faiss.index_factory(d, factory, METRIC)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS factory string {factory!r} for dimension {d}: {_faiss_msg(e)}") from None
    if index_family(index) == "flat" and is_refined(index):  # also rejects unsupported types and non-IP metrics
        raise ValueError(f"{factory!r} refines an exact (Flat) index: nothing to re-rank; use Flat")
    inner = _inner(index)
    if hasattr(inner, "do_polysemous_training"):
        # the factory turns on polysemous code reordering for IVF-PQ: a slow simulated
        # annealing (~10x the PQ training) that only helps Hamming-threshold search, unused here
        inner.do_polysemous_training = False
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efConstruction = int(bp.get("efConstruction", inner.hnsw.efConstruction))
    refine = refine_of(index)
    if refine is not None:
        refine.k_factor = float(DEFAULT_K_FACTOR)
    if not index.is_trained:
        _train(index, x, bp, seed)
    return index


def _train(index: faiss.Index, x: np.ndarray, bp: Mapping[str, int], seed: int) -> None:
    n = len(x)
    ivf = faiss.try_extract_index_ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else 1
    train_size = int(bp.get("train_size", max(40 * nlist, 10_000)))
    train_size = min(n, max(train_size, nlist))
    if train_size < 39 * nlist:
        log.warning("training %d inverted lists on %d vectors (FAISS advises >= %d); recall may suffer", nlist, train_size, 39 * nlist)
    # FAISS prints its own "please provide at least ..." line straight to stderr; we warned above.
    for cp in _clustering_params(index):
        cp.min_points_per_centroid = 1
        cp.max_points_per_centroid = 1 << 30  # we sample ourselves
        cp.seed = seed
        if "kmeans_iters" in bp:
            cp.niter = int(bp["kmeans_iters"])
    rng = np.random.default_rng(seed)
    sample = x if train_size >= n else x[np.sort(rng.choice(n, size=train_size, replace=False))]
    try:
        index.train(sample)
    except RuntimeError as e:
        raise ValueError(f"training the index on {len(sample)} vectors failed: {_faiss_msg(e)}") from None


def _clustering_params(index: faiss.Index) -> list:
    out = []
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        out.append(ivf.cp)
        ivf_d = faiss.downcast_index(ivf)
        if hasattr(ivf_d, "pq"):
            out.append(ivf_d.pq.cp)
    return out


def _faiss_msg(e: BaseException) -> str:
    """The useful part of a FAISS C++ exception message (drops the file/line preamble)."""
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return msg.split(": ", 1)[-1] if msg.startswith("Error in") else msg


# ---------------------------------------------------------------------------------------------
# search


def _search_params(index: faiss.Index, k: int, sel: faiss.IDSelector | None) -> faiss.SearchParameters | None:
    """Per-call search parameters: the index's current knobs, HNSW's efSearch raised to >= the
    candidates asked of it (FAISS's HNSW returns fewer than k results, padded with -1, when
    efSearch < k), and an optional id selector. IndexPreTransform forwards non-pretransform
    params to its inner index; an IndexRefine accepts only `IndexRefineSearchParameters` (any
    other type is a C++ error), which carry the base's parameters — the selector goes there: the
    base chooses the candidates.
    """
    return search_parameters(index, k, sel=sel)


def search_parameters(
    index: faiss.Index, k: int, *, sel: faiss.IDSelector | None = None, **overrides: int
) -> faiss.SearchParameters | None:
    """FAISS search parameters for one `index.search(x, k, params=...)` call on any supported
    index: the index's current knobs, replaced by `overrides` (`nprobe=`, `efSearch=`,
    `k_factor=`), with `sel` restricting the rows, nested the way the index type needs
    (`IndexRefineSearchParameters(base_index_params=SearchParametersIVF(...))` for a refined
    IVF). None when nothing needs passing. Callers that build their own `SearchParametersIVF`
    for a refined index get FAISS's "params have incorrect type" error instead.
    """
    fam = index_family(index)
    inner = _inner(index)
    refine = refine_of(index)
    unknown = set(overrides) - set(SEARCH_PARAM_NAMES)
    if unknown:
        raise ValueError(f"unknown search parameter(s) {sorted(unknown)}; known: {list(SEARCH_PARAM_NAMES)}")
    k_factor = float(overrides.get("k_factor", refine.k_factor if refine is not None else 1.0))
    base_k = math.ceil(k * k_factor) if refine is not None else k
    base: faiss.SearchParameters | None = None
    if fam == "hnsw":
        ef = int(overrides.get("efSearch", inner.hnsw.efSearch))
        base = faiss.SearchParametersHNSW(efSearch=max(ef, base_k), sel=sel)
    elif fam == "ivf":
        nprobe = int(overrides.get("nprobe", inner.nprobe))
        base = faiss.SearchParametersIVF(nprobe=nprobe, max_codes=int(inner.max_codes), sel=sel)
    elif sel is not None:
        base = faiss.SearchParameters(sel=sel)
    if refine is None:
        return base
    if base is None:
        return faiss.IndexRefineSearchParameters(k_factor=k_factor)
    return faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=base)


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    exclude_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of `index` for each query: (scores float32 (nq, k'), rows int64 (nq, k')).

    k' = min(k, ntotal - len(exclude_rows)), so asking for more than the catalog never pads with
    -1. An approximate index may still find fewer than k' candidates for some query (an IVF
    whose probed lists are nearly empty, or mostly excluded): those slots hold row -1 and score
    -inf; `indexer.topk` answers such queries by exact search.
    """
    k = _check_k(k)
    q = as_matrix(queries, name="queries", dim=index.d)
    excl = _unique_rows(exclude_rows, index.ntotal)
    kk = min(k, int(index.ntotal) - len(excl))
    if kk <= 0 or len(q) == 0:
        return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
    batch = sel = None
    if len(excl):
        batch = faiss.IDSelectorBatch(excl)
        sel = faiss.IDSelectorNot(batch)
    params = _search_params(index, kk, sel)
    scores, rows = index.search(q, kk, params=params)
    del batch, sel  # the selectors must outlive the search call
    scores[rows < 0] = -np.inf
    return scores, rows


def _unique_rows(rows: np.ndarray | None, ntotal: int) -> np.ndarray:
    if rows is None:
        return np.empty(0, np.int64)
    r = np.unique(np.asarray(rows, dtype=np.int64).ravel())
    if len(r) and (r[0] < 0 or r[-1] >= ntotal):
        raise ValueError(f"exclude_rows must be in [0, {ntotal}), got values {int(r[0])}..{int(r[-1])}")
    return r


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (FAISS flat, multi-threaded BLAS): the gate's ground truth."""
    x = as_matrix(vectors, name="catalog vectors")
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    return search(flat, queries, k)


# ---------------------------------------------------------------------------------------------
# recall


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_i ∩ truth_i| / |truth_i| (ids or rows; -1 entries ignored).

    The textbook set recall. It undercounts when the k-th exact score is tied (two equally
    good answers, either is right); `measure_recall` handles ties.
    """
    found = np.asarray(found)
    truth = np.asarray(truth)
    if found.shape[0] != truth.shape[0]:
        raise ValueError(f"found has {found.shape[0]} queries, truth has {truth.shape[0]}")
    total = 0.0
    n = 0
    for f, t in zip(found, truth, strict=True):
        tset = {x for x in t.tolist() if x != -1}
        if not tset:
            continue
        total += len(tset & {x for x in f.tolist() if x != -1}) / len(tset)
        n += 1
    return total / n if n else 1.0


def measure_recall(
    index: faiss.Index,
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    truth: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """recall@k of `index` against exact search over `vectors` (the rows the index holds), as
    serving sees it: the index's `rescore_fetch(index, k)` candidates, re-scored exactly.

    A returned row counts as a hit when its true score reaches the k-th exact score (within
    float tolerance), so ties at the cut-off (identical item vectors, e.g. fresh items with the
    same features) are not counted as misses. Without ties this equals `recall_at_k`.
    `truth` may pass precomputed `exact_search(vectors, queries, k)`.
    """
    k = _check_k(k)
    x = as_matrix(vectors, name="catalog vectors", dim=index.d)
    if len(x) != index.ntotal:
        raise ValueError(f"index holds {index.ntotal} vectors but {len(x)} catalog vectors were given")
    q = as_matrix(queries, name="queries", dim=index.d)
    if len(q) == 0:
        raise ValueError("need at least one query to measure recall")
    ex_scores, _ = truth if truth is not None else exact_search(x, q, k)
    kk = ex_scores.shape[1]
    _, rows = search(index, q, rescore_fetch(index, kk))
    hits = 0
    for i in range(len(q)):
        r = rows[i][rows[i] >= 0]
        r = np.unique(r)
        true_scores = x[r] @ q[i]
        hits += min(kk, int((true_scores >= ex_scores[i, kk - 1] - SCORE_TOL).sum()))
    return hits / (len(q) * kk)


def tune_search_params(
    index: faiss.Index,
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    target: float,
) -> tuple[dict[str, int], float]:
    """The cheapest efSearch / nprobe (and k_factor) whose recall@k on `queries` reaches `target`.

    Walks the ladder from fast to slow and stops at the first value that meets the target; if
    none does, returns the most thorough value tried (the recall gate then decides). A refined
    index is tuned in two walks: nprobe / efSearch with the largest k_factor of
    `K_FACTOR_LADDER` (so that the re-rank does not limit recall), then the smallest k_factor
    that keeps the target at that nprobe / efSearch (a base that cannot reach the target keeps
    the largest k_factor). Sets the chosen parameters on `index` and returns (params, measured
    recall). Use a query sample disjoint from the gate's, so that the gate measures what was
    not tuned on.
    """
    fam = index_family(index)
    q = as_matrix(queries, name="queries", dim=index.d)
    k = _check_k(k)
    truth = exact_search(vectors, q, k)
    refined = is_refined(index)
    if fam == "flat":
        return {}, measure_recall(index, vectors, q, k, truth=truth)
    if refined:
        apply_search_params(index, {"k_factor": K_FACTOR_LADDER[-1]})
    if fam == "hnsw":
        name = "efSearch"
        ladder = [v for v in EF_SEARCH_LADDER if v >= min(k, index.ntotal)] or [max(EF_SEARCH_LADDER)]
    else:
        name = "nprobe"
        nlist = int(_inner(index).nlist)
        ladder = [v for v in NPROBE_LADDER if v < nlist] + [nlist]
    best = _walk(index, vectors, q, k, truth, target, name, ladder)
    if not refined or best[1] < target:
        return best
    base_params = {name: best[0][name]}
    return _walk(index, vectors, q, k, truth, target, "k_factor", list(K_FACTOR_LADDER), fixed=base_params)


def _walk(
    index: faiss.Index, vectors: np.ndarray, q: np.ndarray, k: int, truth: tuple[np.ndarray, np.ndarray],
    target: float, name: str, ladder: list[int], fixed: Mapping[str, int] | None = None,
) -> tuple[dict[str, int], float]:
    """The first value of `ladder` for knob `name` (others as set, or `fixed`) reaching `target`."""
    best: tuple[dict[str, int], float] = ({}, -1.0)
    for value in ladder:
        apply_search_params(index, {**(fixed or {}), name: value})
        rec = measure_recall(index, vectors, q, k, truth=truth)
        log.debug("tune %s=%d recall@%d=%.4f", name, value, k, rec)
        best = (get_search_params(index), rec)
        if rec >= target:
            break
    return best


# ---------------------------------------------------------------------------------------------
# io


def write_index(index: faiss.Index, path: str | os.PathLike[str]) -> None:
    """Serialize `index` to `path` and fsync it (callers write into a temp directory)."""
    faiss.write_index(index, os.fspath(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_index(path: str | os.PathLike[str], *, mmap: bool = False) -> faiss.Index:
    """Read an index written by `write_index`; check it is a supported inner-product index.

    `mmap=True` maps the stored codes instead of reading them into private memory: IVF inverted
    lists and flat / SQ code arrays (a Flat index, an RFlat or Refine(SQ8) refine index), with
    FAISS's `IO_FLAG_MMAP_IFC` (plain `IO_FLAG_MMAP` maps only the inverted lists). The pages
    are then page cache, shared by every worker process mapping the same file, and loading is
    near-instant (docs/bench/bigindex.md). The file must never be rewritten in place: index
    versions are immutable for that reason. HNSW graphs and PQ codebooks are still read.
    """
    flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
    try:
        index = faiss.read_index(os.fspath(path), flags)
    except RuntimeError as e:
        raise ValueError(f"{path}: not a readable FAISS index ({_faiss_msg(e)})") from None
    index_family(index)
    return index


__all__ = [
    "AUTO_FLAT_MAX",
    "AUTO_REFINE_MIN",
    "IndexSpec",
    "METRIC",
    "apply_search_params",
    "as_matrix",
    "auto_spec",
    "available_cpus",
    "build_index",
    "check_unit_rows",
    "exact_search",
    "get_search_params",
    "index_family",
    "is_refined",
    "refine_of",
    "search_parameters",
    "measure_recall",
    "read_index",
    "recall_at_k",
    "search",
    "set_num_threads",
    "train_index",
    "rescore_fetch",
    "tune_search_params",
    "validate_search_params",
    "write_index",
]
