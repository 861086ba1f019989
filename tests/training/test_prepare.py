"""`trainer prepare movielens-100k` validates its input: bad source files fail naming the file,
and nothing is written."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from training.prepare import prepare_movielens_100k
from training.schema import DatasetError


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="latin-1") as f:
        f.write(text)


def _drop_genre(src: Path) -> None:
    lines = (src / "u.genre").read_text(encoding="latin-1").splitlines()
    (src / "u.genre").write_text("\n".join(lines[:-2] + lines[-1:]) + "\n", encoding="latin-1")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # a short row: an empty timestamp was written and exit 0
        (lambda s: _append(s / "u.data", "1\t2\n"), r"u.data: line 100001: empty or missing field"),
        # an empty u.genre / one genre missing shifted every genre flag of u.item
        (lambda s: (s / "u.genre").write_text(""), r"u.genre: cannot be parsed"),
        (_drop_genre, r"u.item: 24 '\|'-separated fields per row, expected 23"),
        # caught by read_dataset on the converted files, blamed on the source line
        (lambda s: _append(s / "u.data", "1\t99999\t5\t881250949\n"), r"u.data: line 100001 is invalid .*'99999' is not in items"),
    ],
)
def test_bad_source_fails_naming_it(
    ml100k_dir: Path, tmp_path: Path, edit: Callable[[Path], object], message: str
) -> None:
    src = tmp_path / "src"
    shutil.copytree(ml100k_dir, src)
    edit(src)
    with pytest.raises(DatasetError, match=message):
        prepare_movielens_100k(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temp directory left behind


def test_synthetic_csv_is_what_pandas_writes_of_the_frames(tmp_path: Path) -> None:
    """The chunked Arrow writer of interactions.csv gives exactly the bytes `to_csv` gives of the
    str frame (chunk smaller than the data: several chunks)."""
    import numpy as np

    from training.prepare import _write_interactions_csv, generate_synthetic, synthetic_tables

    frames = generate_synthetic(120, 40, 3000, seed=4)
    frames["interactions"].to_csv(tmp_path / "want.csv", index=False)
    _, _, (u, i, ts) = synthetic_tables(120, 40, 3000, seed=4)
    _write_interactions_csv(tmp_path / "got.csv", u, i, ts, chunk=700)
    assert (tmp_path / "got.csv").read_bytes() == (tmp_path / "want.csv").read_bytes()
    assert len(np.unique(u * 40 + i)) == len(u)  # distinct (user, item) pairs


def test_join_tags_is_the_first_occurrence_join() -> None:
    import numpy as np

    from training.prepare import _join_tags

    rng = np.random.default_rng(0)
    pick, k = rng.integers(0, 4, size=(500, 3)), rng.integers(1, 4, size=500)
    want = ["|".join(dict.fromkeys(f"t{t}" for t in row[:n])) for row, n in zip(pick, k, strict=True)]
    assert list(_join_tags(pick, k)) == want
