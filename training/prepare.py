"""`trainer prepare`: produce dataset directories (INTERFACES.md §1).

* `movielens-100k` converts the GroupLens files. Every rating is a click (EVAL.md); user
  features are age (continuous), gender, occupation, zip (categorical); item features are
  genres (multi-categorical) and release year (continuous), with the title kept for display.
* `synthetic` generates a realistic dataset with no download: a planted latent structure that
  both the interactions and the features reflect (so features carry real signal and cold users
  are predictable from them), power-law item popularity (a few items take most clicks), a
  share of never-clicked catalog items, and timestamps. It is vectorized and chunked so that
  1M items and millions of clicks take seconds to a minute, not hours.

Both write through a temp directory renamed into place: an interrupted run leaves nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from training.artifacts import atomic_directory, write_json
from training.dataset import read_dataset
from training.schema import DatasetError

log = logging.getLogger("trainer.prepare")

ML100K_SCHEMA = {
    "user": {"features": {
        "age": {"type": "continuous"},
        "gender": {"type": "categorical"},
        "occupation": {"type": "categorical"},
        "zip": {"type": "categorical"},
    }},
    "item": {"features": {
        "genres": {"type": "multi_categorical", "separator": "|"},
        "year": {"type": "continuous"},
    }},
}

SYNTHETIC_SCHEMA = {
    "user": {"features": {
        "age": {"type": "continuous"},
        "country": {"type": "categorical"},
        "device": {"type": "categorical"},
        "interests": {"type": "multi_categorical", "separator": "|"},
    }},
    "item": {"features": {
        "category": {"type": "categorical"},
        "tags": {"type": "multi_categorical", "separator": "|"},
        "price": {"type": "continuous"},
        "year": {"type": "continuous"},
    }},
}


def _output_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        if not out.is_dir() or any(out.iterdir()):
            raise DatasetError(f"{out}: already exists and is not empty; remove it or choose another --out")
        out.rmdir()
    return out


def _write(out: Path, frames: dict[str, pd.DataFrame], schema: dict, sources: dict[str, Path] | None = None) -> Path:
    """Write the dataset through a temp directory; with `sources` ({"items.csv": source file}),
    first read it back with `read_dataset`, the reader `trainer fit` uses, so a conversion of
    bad input fails here, naming the source file, instead of leaving a dataset fit rejects."""
    with atomic_directory(out) as tmp:
        for name, df in frames.items():
            df.to_csv(tmp / f"{name}.csv", index=False)
        write_json(tmp / "schema.json", schema)
        if sources is not None:
            try:
                read_dataset(tmp, allow_retired=False)  # its clicks must name its own items
            except DatasetError as e:
                raise DatasetError(_blame_source(str(e), sources)) from None
    return out


def _blame_source(message: str, sources: dict[str, Path]) -> str:
    """'interactions.csv: line 7, ...' → '<src>/u.data: line 6 is invalid (interactions.csv: ...)':
    the converted files keep the source row order and add one header line."""
    for name, src in sources.items():
        if message.startswith(f"{name}:"):
            m = re.match(rf"{re.escape(name)}: line (\d+)", message)
            where = f": line {int(m.group(1)) - 1}" if m else ""
            return f"{src}{where} is invalid (converted {message})"
    return f"converted dataset is invalid: {message}"


def _read_source(path: Path, sep: str, n_fields: int, *, complete: bool = False, **kw: object) -> pd.DataFrame:
    """One GroupLens file as str columns, with errors naming it. Every row must have `n_fields`
    fields: a u.genre missing an entry would otherwise shift every genre flag of u.item by one
    column, silently. `complete`: no field may be empty or missing (a short u.data row)."""
    try:
        df = pd.read_csv(path, sep=sep, header=None, dtype=str, **kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"{path}: cannot be parsed: {str(e).splitlines()[0]}") from None
    if df.shape[1] != n_fields:
        raise DatasetError(f"{path}: {df.shape[1]} {sep!r}-separated fields per row, expected {n_fields}")
    missing = df.isna().to_numpy().any(axis=1)
    if complete and missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise DatasetError(f"{path}: line {i + 1}: empty or missing field(s); expected {n_fields} {sep!r}-separated values")
    return df


def prepare_movielens_100k(src: str | Path, out: str | Path) -> Path:
    """Convert GroupLens ML-100K (`u.data`, `u.user`, `u.item`, `u.genre`) into a dataset dir."""
    src = Path(src)
    for f in ("u.data", "u.user", "u.item", "u.genre"):
        if not (src / f).is_file():
            raise DatasetError(f"{src}: missing {f} (expected the extracted ml-100k folder)")
    out = _output_dir(out)
    ratings = _read_source(src / "u.data", "\t", 4, complete=True)
    ratings.columns = ["user_id", "item_id", "rating", "timestamp"]
    users = _read_source(src / "u.user", "|", 5)
    users.columns = ["user_id", "age", "gender", "occupation", "zip"]
    genres = _read_source(src / "u.genre", "|", 2, complete=True, encoding="latin-1")
    genres.columns = ["name", "idx"]
    idx = pd.to_numeric(genres["idx"], errors="coerce")
    if idx.isna().any() or sorted(idx.astype(int)) != list(range(len(genres))):
        raise DatasetError(f"{src / 'u.genre'}: genre indices must be 0..{len(genres) - 1}, got {list(genres['idx'])}")
    genre_names = [g for g, _ in sorted(zip(genres["name"], idx.astype(int), strict=True), key=lambda t: t[1])]
    cols = ["item_id", "title", "release", "video_release", "url", *genre_names]
    raw = _read_source(src / "u.item", "|", len(cols), encoding="latin-1", keep_default_na=False)
    raw.columns = cols
    bad = ~raw[genre_names].isin(["0", "1"]).to_numpy().all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{src / 'u.item'}: line {i + 1}: genre flags must be 0 or 1 (does u.genre list every genre?)")
    flags = raw[genre_names].astype(int).to_numpy().astype(bool)
    year = raw["release"].map(lambda s: m.group(0) if (m := re.search(r"\d{4}$", s)) else "")
    items = pd.DataFrame({
        "item_id": raw["item_id"],
        "title": raw["title"],
        "genres": ["|".join(g for g, f in zip(genre_names, row, strict=True) if f) for row in flags],
        "year": year,
    })
    interactions = ratings[["user_id", "item_id", "timestamp"]]
    sources = {"interactions.csv": src / "u.data", "items.csv": src / "u.item", "users.csv": src / "u.user"}
    return _write(out, {"interactions": interactions, "items": items, "users": users}, ML100K_SCHEMA, sources)


def generate_synthetic(
    n_users: int = 2000,
    n_items: int = 1000,
    n_interactions: int = 60000,
    seed: int = 0,
    **kw: object,
) -> dict[str, pd.DataFrame]:
    """Build the synthetic tables (see module docstring); returns interactions/items/users frames
    (the interactions with str ids: `synthetic_tables` keeps them as integer arrays)."""
    items, users, (u, i, ts) = synthetic_tables(n_users, n_items, n_interactions, seed, **kw)
    inter = pd.DataFrame({"user_id": "u" + pd.Series(u).astype(str), "item_id": "i" + pd.Series(i).astype(str),
                          "timestamp": ts})
    return {"interactions": inter, "items": items, "users": users}


def synthetic_tables(
    n_users: int = 2000,
    n_items: int = 1000,
    n_interactions: int = 60000,
    seed: int = 0,
    *,
    latent_dim: int = 8,
    n_topics: int = 20,
    n_candidates: int = 48,
    zipf: float = 1.0,
    never_clicked: float = 0.05,
    chunk: int = 100_000,
) -> tuple[pd.DataFrame, pd.DataFrame, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(items, users, (user, item, timestamp)): the item and user frames and the interactions as
    int64 arrays (user u is id `u{u}`, item i is `i{i}`), so 100M clicks never become strings
    in memory. Vectorized (numpy; the clicks in chunks of `chunk`); the draws, and so the
    output for a seed, are those of the first, frame-building version."""
    if min(n_users, n_items, n_interactions) < 1:
        raise ValueError(f"sizes must be positive: users={n_users} items={n_items} interactions={n_interactions}")
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_topics, latent_dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)

    # items: topic, latent vector, features derived from both (plus noise)
    topic_p = 1.0 / np.arange(1, n_topics + 1) ** 0.7
    item_topic = rng.choice(n_topics, size=n_items, p=topic_p / topic_p.sum())
    z = centers[item_topic] + 0.45 * rng.normal(size=(n_items, latent_dim))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n_tags = 6 * n_topics
    noisy_topic = np.where(rng.random(n_items) < 0.05, rng.integers(0, n_topics, n_items), item_topic)
    n_item_tags = rng.integers(1, 4, size=n_items)
    # tag t belongs to topic t % n_topics: each item draws up to 3 of its topic's 6 tags
    tag_pick = (noisy_topic[:, None] + n_topics * rng.integers(0, 6, size=(n_items, 3))) % n_tags
    tag_pick = np.where(rng.random((n_items, 3)) < 0.15, rng.integers(0, n_tags, (n_items, 3)), tag_pick)
    tags = _join_tags(tag_pick, n_item_tags)
    price = np.round(np.exp(2.5 + 0.8 * z[:, 0] + 0.4 * rng.normal(size=n_items)), 2)
    year = np.clip(np.round(2012 + 6 * z[:, 1] + 3 * rng.normal(size=n_items)), 1980, 2026).astype(int)
    items = pd.DataFrame({
        "item_id": [f"i{i}" for i in range(n_items)],
        "category": [f"c{t}" for t in noisy_topic],
        "tags": tags,
        "price": price,
        "year": year,
    })

    # popularity: Zipf over a random order; a share of items is brand new (never clicked)
    pop = 1.0 / np.arange(1, n_items + 1) ** zipf
    pop = pop[rng.permutation(n_items)]
    pop[rng.random(n_items) < never_clicked] = 0.0
    if pop.sum() == 0:
        pop[0] = 1.0
    cdf = np.cumsum(pop / pop.sum())

    # users: latent taste near 1-2 topics; features are noisy views of it
    u_topic = rng.choice(n_topics, size=n_users, p=topic_p / topic_p.sum())
    w = centers[u_topic] + 0.5 * rng.normal(size=(n_users, latent_dim))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    n_countries = 12
    country_vecs = rng.normal(size=(n_countries, latent_dim))
    country = np.argmax(w @ country_vecs.T + 0.8 * rng.gumbel(size=(n_users, n_countries)), axis=1)
    age = np.clip(np.round(38 + 12 * w[:, 2] + 8 * rng.normal(size=n_users)), 16, 80).astype(int)
    device = np.where(w[:, 3] + 0.7 * rng.normal(size=n_users) > 0, "ios", "android")
    device = np.where(rng.random(n_users) < 0.15, "web", device)
    interest_topic = np.where(rng.random(n_users) < 0.3, rng.integers(0, n_topics, n_users), u_topic)
    interests = [f"t{t}|t{t + n_topics}" if rng.random() < 0.5 else f"t{t}" for t in interest_topic]
    users = pd.DataFrame({
        "user_id": [f"u{u}" for u in range(n_users)],
        "age": age,
        "country": [f"k{c}" for c in country],
        "device": device,
        "interests": interests,
    })
    # leave a few feature values missing, as real exports do
    users["age"] = users["age"].astype("Int64")
    users.loc[rng.random(n_users) < 0.03, "age"] = pd.NA

    # interactions: per-user activity is heavy-tailed; each click picks, among candidates drawn
    # by popularity, the one with the best taste match (Gumbel-max over beta * <w_u, z_i>)
    # repeated (user, item) clicks are dropped, so draw in rounds until `n_interactions` are unique
    activity = rng.lognormal(0.0, 0.8, size=n_users)
    beta = 6.0
    if n_users * n_items >= 2**63:
        raise ValueError(f"users x items = {n_users * n_items:,} does not fit the int64 pair keys")
    keys = np.empty(0, dtype=np.int64)  # user * n_items + item of the distinct pairs, first-drawn order
    for _round in range(8):
        need = n_interactions - len(keys)
        if need <= 0:
            break
        draw = int(need * 1.3) + 16
        user_of = rng.choice(n_users, size=draw, p=activity / activity.sum())
        chosen = np.empty(draw, dtype=np.int64)
        for s in range(0, draw, chunk):
            uu = user_of[s : s + chunk]
            cand = np.searchsorted(cdf, rng.random((len(uu), n_candidates)), side="right").clip(max=n_items - 1)
            aff = np.einsum("nd,ncd->nc", w[uu], z[cand]) * beta + rng.gumbel(size=cand.shape)
            chosen[s : s + chunk] = cand[np.arange(len(uu)), aff.argmax(1)]
        both = np.concatenate([keys, user_of.astype(np.int64) * n_items + chosen])
        del user_of, chosen
        first = np.unique(both, return_index=True)[1]  # drop_duplicates(keep="first"), in numpy
        keys = both[np.sort(first)]
        del both, first
    keys = keys[:n_interactions]
    t0 = 1_700_000_000
    ts = t0 + np.sort(rng.integers(0, 90 * 86400, size=len(keys)))
    return items, users, (keys // n_items, keys % n_items, ts)


def _join_tags(pick: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Row r: '|'-joined distinct `t{tag}` of pick[r, :k[r]], first occurrence first (3 columns)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def name(col: np.ndarray, keep: np.ndarray | None = None) -> pa.Array:
        text = pc.binary_join_element_wise("t", pc.cast(pa.array(col), pa.string()), "")
        return text if keep is None else pc.if_else(pa.array(keep), text, pa.nulls(len(col), pa.string()))

    t0, t1, t2 = pick[:, 0], pick[:, 1], pick[:, 2]
    joined = pc.binary_join_element_wise(
        name(t0), name(t1, (k >= 2) & (t1 != t0)), name(t2, (k >= 3) & (t2 != t0) & (t2 != t1)), "|",
        null_handling="skip",
    )
    return joined.to_numpy(zero_copy_only=False)


def _write_interactions_csv(path: Path, user: np.ndarray, item: np.ndarray, ts: np.ndarray, chunk: int = 2_000_000) -> None:
    """interactions.csv byte-for-byte as `DataFrame.to_csv` writes the str frame, in chunks:
    the ids are formatted by Arrow a chunk at a time, never all at once."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    def ids(prefix: str, codes: np.ndarray) -> pa.Array:
        return pc.binary_join_element_wise(prefix, pc.cast(pa.array(codes), pa.string()), "")

    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())])
    opts = pacsv.WriteOptions(quoting_style="none", include_header=False)
    with open(path, "wb") as f:
        f.write(",".join(schema.names).encode() + b"\n")  # Arrow would quote the header; pandas does not
        with pacsv.CSVWriter(f, schema, write_options=opts) as w:
            for lo in range(0, len(user), chunk):
                hi = lo + chunk
                w.write_table(pa.table({"user_id": ids("u", user[lo:hi]), "item_id": ids("i", item[lo:hi]),
                                        "timestamp": pa.array(ts[lo:hi])}, schema=schema))


def prepare_synthetic(
    out: str | Path,
    n_users: int = 2000,
    n_items: int = 1000,
    n_interactions: int = 60000,
    seed: int = 0,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Write a synthetic dataset; `warn` (default: a log warning) hears about a shortfall.

    Repeated (user, item) clicks are dropped, and popularity-weighted draws concentrate on the
    head items, so a small catalog or few users can give fewer unique clicks than asked for;
    the run still succeeds, but says so rather than silently returning fewer.

    The exact rule (`generate_synthetic`): at most 8 rounds; each round draws
    `1.3 × (still missing) + 16` clicks (user ∝ activity, item by Gumbel-max over 48
    popularity-drawn candidates) and keeps those whose (user, item) pair is new; it stops as soon
    as `n_interactions` distinct pairs exist and keeps the first `n_interactions`. So fewer come
    back exactly when 8 rounds did not find enough distinct pairs: always when users × clicked
    items < n_interactions, and in practice when the few users' popularity-weighted choices
    keep landing on pairs they already have (each round's yield of new pairs shrinks).

    Size and memory (docs/bench/train.md, "Synthetic generator"): the clicks stay int64 arrays
    and interactions.csv is written in chunks, so memory grows ~8 B a click (the pair keys; ~3x
    that while they are de-duplicated) instead of two Python strings a click: 10M items with 1M
    users and 10M clicks peaked at 4.0 GiB. Time is the click draw (48 popularity-drawn
    candidates a click, each a binary search in the catalog-sized CDF and a gather of its latent
    vector): that run took 19 min on the shared 2-core VM, so 100M clicks at 10M items would take
    hours; that target is not met.
    """
    out = _output_dir(out)
    items, users, (u, i, ts) = synthetic_tables(n_users, n_items, n_interactions, seed)
    n = len(u)
    if n < n_interactions:
        (warn or log.warning)(
            f"wrote {n:,} of the {n_interactions:,} interactions asked for: repeated (user, item) clicks are "
            f"dropped and popularity-weighted draws saturate ({n_users:,} users x {n_items:,} items allow at most "
            f"{n_users * n_items:,} distinct pairs); ask for more users or items to get closer"
        )
    with atomic_directory(out) as tmp:
        _write_interactions_csv(tmp / "interactions.csv", u, i, ts)
        items.to_csv(tmp / "items.csv", index=False)
        users.to_csv(tmp / "users.csv", index=False)
        write_json(tmp / "schema.json", SYNTHETIC_SCHEMA)
    return out
