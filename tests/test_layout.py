"""The package table of docs/design.md holds for every import, including imports inside functions.

Imports run one way: `training` ← `indexer` ← `service` (an arrow: "is imported by"); `bench/`
may import the three, and nothing of the project imports `bench/` or `tests/`. The request path
(`service.app` and everything it imports) loads no training code: no losses, samplers,
optimizers, fit loop or evaluation.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "indexer", "service", "bench", "tests")
# package -> the project packages its modules may import (besides itself)
MAY_IMPORT = {
    "training": set(),
    "indexer": {"training"},
    "service": {"training", "indexer"},
    "bench": {"training", "indexer", "service"},
}
TRAINING_ONLY = (
    "training.train", "training.task", "training.samplers", "training.ssl", "training.cold", "training.ema",
    "training.frequency", "training.evaluate", "training.prepare", "training.split", "training.cli", "training.export",
)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported project module) of every import statement in `path`, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                continue
            names = [node.module or ""]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", list(MAY_IMPORT))
def test_imports_follow_the_package_table(package: str) -> None:
    allowed = MAY_IMPORT[package] | {package}
    bad = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in modules(package)
        for line, name in project_imports(path)
        if name.split(".")[0] not in allowed
    ]
    assert bad == [], "imports against docs/design.md's package table:\n" + "\n".join(bad)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    p = tmp_path / "m.py"
    p.write_text("import os\n\ndef f():\n    from service.app import create_app\n    import indexer.store\n")
    assert project_imports(p) == [(4, "service.app"), (5, "indexer.store")]


def test_the_request_path_loads_no_training_code() -> None:
    code = (
        "import sys, service.app\n"
        f"print(','.join(sorted(m for m in sys.modules if m.startswith({TRAINING_ONLY!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"service.app imports training code: {out.stdout.strip()}"


def test_the_request_path_imports_no_torch_pandas_or_pyarrow() -> None:
    """The serving image has none of them (Dockerfile target `serve`); tests/service/test_torch_free.py
    serves a real version with them unimportable, this names the module that pulls one in."""
    code = (
        "import sys, service.app\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pandas', 'pyarrow'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"service.app imports: {out.stdout.strip()[:300]}"
