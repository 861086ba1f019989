"""Print the runtime requirements declared in pyproject.toml, one per line.

Used by the Dockerfile's builder stages so the images install exactly what the project's own
metadata pins (no second, drifting requirements file). The `serve` image gets the base
dependencies only (no torch); the `train` image adds the `train` extra in two steps: the torch
wheel alone from the configurable wheel index (CPU by default, a CUDA index for GPU users), then
every dependency from PyPI (the installed torch already satisfies its pin). Installing the
dependencies before copying the source keeps them in a cached layer.

    python pyproject_deps.py pyproject.toml                                 # -> the base dependencies
    python pyproject_deps.py pyproject.toml --extra train --only torch      # -> torch==2.13.0
    python pyproject_deps.py pyproject.toml --extra train                   # -> base + train extra
    python pyproject_deps.py pyproject.toml --extra train --exclude torch   # -> the same without torch
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib


def requirement_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement string (``Foo_Bar>=1`` -> ``foo-bar``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def select(requirements: list[str], only: set[str], exclude: set[str]) -> list[str]:
    """Filter requirements by normalized name; ``only`` wins when both are given."""
    if only:
        return [r for r in requirements if requirement_name(r) in only]
    return [r for r in requirements if requirement_name(r) not in exclude]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--only", action="append", default=[], help="keep only these names")
    parser.add_argument("--exclude", action="append", default=[], help="drop these names")
    parser.add_argument("--extra", action="append", default=[], help="add this optional-dependencies group")
    args = parser.parse_args(argv)
    project = tomllib.loads(args.pyproject.read_text(encoding="utf-8"))["project"]
    only = {requirement_name(n) for n in args.only}
    exclude = {requirement_name(n) for n in args.exclude}
    requirements = list(project.get("dependencies", []))
    extras = project.get("optional-dependencies", {})
    for extra in args.extra:
        if extra not in extras:
            print(f"pyproject_deps: no optional-dependencies group {extra!r} in {args.pyproject}", file=sys.stderr)
            return 1
        requirements += extras[extra]
    chosen = select(requirements, only, exclude)
    if only and {requirement_name(r) for r in chosen} != only:
        print(f"pyproject_deps: {sorted(only)} not all declared in {args.pyproject}", file=sys.stderr)
        return 1
    sys.stdout.write("".join(f"{r}\n" for r in chosen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
