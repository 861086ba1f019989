"""`trainer` CLI: a failure is exactly one line on stderr and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TRAINER = Path(sys.executable).parent / "trainer"


def test_bad_dataset_is_one_stderr_line(tmp_path: Path) -> None:
    p = subprocess.run([str(TRAINER), "fit", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainer fit: error:") and "nope" in lines[0]
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_prepare_refuses_non_empty_out(tiny_dataset: Path) -> None:
    p = subprocess.run([str(TRAINER), "prepare", "synthetic", "--out", str(tiny_dataset)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "already exists and is not empty" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
