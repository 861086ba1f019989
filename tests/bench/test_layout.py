"""bench/ layout: no benchmark imports another one, none edits `sys.path`, all run as modules.

Each bench module may import training/, indexer/, service/ and the one shared-helpers module
`bench/common.py`; anything two benchmarks share lives there. Read from the source (AST), so an
import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
SHARED = "bench.common"
MODULES = sorted(p for p in BENCH.glob("*.py") if p.name != "__init__.py")


def bench_imports(source: str, package: str = "bench") -> list[tuple[int, str]]:
    """(line, module) of every import of a `bench` module other than the shared one."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""  # a relative import inside bench/ is a bench import
            module = ".".join(p for p in (base, node.module or "") if p)
            # `from bench import x` imports the module bench.x; `from bench.x import y` imports bench.x
            targets = [f"{module}.{a.name}" for a in node.names] if module == "bench" else [module]
        else:
            continue
        out += [(node.lineno, t) for t in targets if (t == "bench" or t.startswith("bench.")) and t != SHARED]
    return out


def sys_path_uses(source: str) -> list[int]:
    """Lines that touch `sys.path` (through any alias of `sys`) or import `path` from sys."""
    tree = ast.parse(source)
    aliases = {"sys"} | {
        a.asname for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name == "sys" and a.asname
    }

    def touches(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute):
            return node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id in aliases
        return isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names)

    return [node.lineno for node in ast.walk(tree) if touches(node)]


def test_every_module_is_found() -> None:
    names = {p.stem for p in MODULES}
    assert {"common", "serve", "index", "experiments", "cold_validation", "cold_ceiling"} <= names, names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_bench_module_imports_no_other_benchmark(path: Path) -> None:
    assert bench_imports(path.read_text(encoding="utf-8")) == [], f"{path.name} imports another bench module"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_bench_module_leaves_sys_path_alone(path: Path) -> None:
    assert sys_path_uses(path.read_text(encoding="utf-8")) == [], f"{path.name} edits sys.path"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from bench.cold_ceiling import pool", [(1, "bench.cold_ceiling")]),
        ("import bench.machine", [(1, "bench.machine")]),
        ("from bench import serve, common", [(1, "bench.serve")]),
        ("from .experiments import merge_overrides", [(1, "bench.experiments")]),
        ("from . import index", [(1, "bench.index")]),
        ("def main():\n    from bench.cold_validation import nested_frames", [(2, "bench.cold_validation")]),
        ("from bench.common import mean_se\nimport bench.common\nfrom . import common\nimport training.train", []),
    ],
)
def test_import_check_fires(source: str, expected: list) -> None:
    assert bench_imports(source) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import sys\nsys.path.insert(0, 'x')", [2]),
        ("import sys as s\ns.path.append('x')", [2]),
        ("import sys\nsys.path = ['x']", [2]),
        ("from sys import path", [1]),
        ("import sys\nsys.argv[1:]\nimport os\nos.path.join('a')", []),
    ],
)
def test_sys_path_check_fires(source: str, expected: list) -> None:
    assert sys_path_uses(source) == expected


@pytest.mark.parametrize("path", [p for p in MODULES if p.stem != "common"], ids=lambda p: p.name)
def test_benchmark_is_a_runnable_module(path: Path) -> None:
    """`python -m bench.NAME` runs main(), and the module's own commands say so."""
    source = path.read_text(encoding="utf-8")
    assert 'if __name__ == "__main__":' in source
    assert f"python -m bench.{path.stem}" in source


def test_no_command_runs_a_benchmark_as_a_script() -> None:
    """Every reproduce command (docs, README, reports, code) is `python -m bench.NAME`."""
    pattern = re.compile(r"python3? \.?/?bench/\w+\.py")
    files = [REPO / "README.md", *REPO.glob("docs/**/*.md"), *REPO.glob("docs/**/*.json"),
             *BENCH.glob("*.py"), *REPO.glob("tests/**/*.py"), REPO / "Makefile"]
    offenders = [f"{f.relative_to(REPO)}: {m.group(0)}" for f in files if f.is_file() and f != Path(__file__)
                 for m in pattern.finditer(f.read_text(encoding="utf-8"))]
    assert offenders == []
