"""The Dockerfile / compose rules of .ci/check_docker.py, in the test suite.

CI has no Docker engine, so these text-level rules are what stands between a change and an image
that runs as root, ships a compiler, floats on ``latest`` or has no health probe. Each rule is
also checked to *fire* on a broken variant of the real file, so a checker that silently stopped
matching would fail here rather than pass everything.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tests.stack_helpers import (
    COMPOSE_FILE,
    DOCKER_DOC,
    DOCKERFILE,
    REPO_ROOT,
    argv_of,
    load_checker,
)

checker = load_checker()
DOCKERFILE_TEXT = DOCKERFILE.read_text(encoding="utf-8")


def compose_text_variant(old: str, new: str) -> str:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert old in text, f"fixture drift: {old!r} not in docker-compose.yml"
    return text.replace(old, new)


def dockerfile_variant(old: str, new: str, count: int = -1) -> str:
    assert old in DOCKERFILE_TEXT, f"fixture drift: {old!r} not in Dockerfile"
    return DOCKERFILE_TEXT.replace(old, new, count)


def test_repo_dockerfile_follows_the_rules() -> None:
    assert checker.check_dockerfile(DOCKERFILE_TEXT, REPO_ROOT) == []


def test_repo_compose_follows_the_rules() -> None:
    assert checker.check_compose(checker.load_compose(COMPOSE_FILE)) == []


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    """A COPY of a missing or .dockerignore'd file breaks `docker compose up --build`."""
    ignore = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8")
    assert checker.check_dockerignore(DOCKERFILE_TEXT, ignore) == []
    assert checker.check_copy_sources(DOCKERFILE_TEXT, REPO_ROOT) == []


def test_dockerignore_rule_fires() -> None:
    problems = checker.check_dockerignore(DOCKERFILE_TEXT, "docker\n")
    assert any("docker/healthcheck.py" in p for p in problems), problems
    assert checker.check_dockerignore(DOCKERFILE_TEXT, "docker\n!docker/*.py\n") == []


def test_checker_cli_passes_on_the_repo() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / ".ci" / "check_docker.py")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check_docker: OK" in result.stdout


def test_compose_file_validates_with_docker_compose() -> None:
    ok, detail = checker.compose_config(COMPOSE_FILE)
    if ok is None:
        pytest.skip(detail)
    assert ok, detail


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(
            lambda: dockerfile_variant("python:3.11.13-slim-bookworm", "python:latest"),
            "'latest' tag",
            id="latest-tag",
        ),
        pytest.param(
            lambda: dockerfile_variant("python:3.11.13-slim-bookworm", "python"),
            "no tag",
            id="no-tag",
        ),
        pytest.param(
            lambda: dockerfile_variant("python:3.11.13-slim-bookworm", "python:3.11-slim"),
            "not pinned",
            id="floating-minor",
        ),
        pytest.param(
            lambda: dockerfile_variant("ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm", "ARG PYTHON_IMAGE"),
            "no default",
            id="arg-without-default",
        ),
        pytest.param(lambda: dockerfile_variant("USER 10001:10001", ""), "no USER", id="no-user"),
        pytest.param(lambda: dockerfile_variant("USER 10001:10001", "USER root"), "is root", id="root"),
        pytest.param(lambda: dockerfile_variant("USER 10001:10001", "USER 0"), "is root", id="uid-0"),
        pytest.param(
            lambda: re.sub(r"HEALTHCHECK[^\n]*\\\n[^\n]*\n", "", DOCKERFILE_TEXT),
            "no HEALTHCHECK",
            id="no-healthcheck",
        ),
        pytest.param(
            lambda: dockerfile_variant(
                '    CMD ["python", "/app/docker/healthcheck.py"]',
                "    CMD curl -f http://localhost:8000/readyz",
            ),
            "curl/wget",
            id="healthcheck-curl",
        ),
        pytest.param(
            lambda: dockerfile_variant(
                '    CMD ["python", "/app/docker/healthcheck.py"]',
                '    CMD ["python", "-c", "print(1)"]',
            ),
            "/readyz",
            id="healthcheck-not-readyz",
        ),
        pytest.param(
            lambda: dockerfile_variant("    SERVICE_INDEX_ROOT=/index", "    SERVICE_INDEX_ROOT=/index AWS_SECRET_ACCESS_KEY=abc"),
            "looks like a secret",
            id="secret-env",
        ),
        pytest.param(
            lambda: dockerfile_variant("ARG TORCH_INDEX_URL=", "ARG HF_TOKEN\nARG TORCH_INDEX_URL="),
            "looks like a secret",
            id="secret-arg",
        ),
        pytest.param(
            lambda: dockerfile_variant("install -y --no-install-recommends libgomp1", "install -y libgomp1 gcc python3-dev"),
            "build tools",
            id="compiler-in-final-stage",
        ),
        pytest.param(
            lambda: dockerfile_variant("whl/cpu", "whl/cu128"),
            "CPU index",
            id="gpu-torch-default",
        ),
        pytest.param(
            lambda: "FROM python:3.11.13-slim-bookworm\nUSER 10001\n"
            'HEALTHCHECK CMD ["python", "-c", "/readyz"]\nARG TORCH_INDEX_URL=https://x/whl/cpu\n'
            'VOLUME ["/data", "/models", "/index"]\nCMD ["uvicorn"]\n',
            "not multi-stage",
            id="single-stage",
        ),
        pytest.param(
            lambda: dockerfile_variant('VOLUME ["/data", "/models", "/index"]', 'VOLUME ["/data"]'),
            "VOLUME",
            id="missing-volumes",
        ),
        pytest.param(
            lambda: dockerfile_variant("COPY --from=builder /opt/venv /opt/venv", "COPY --from=train-builder /opt/venv /opt/venv"),
            "would contain PyTorch",
            id="torch-in-serve",
        ),
        pytest.param(
            lambda: dockerfile_variant("FROM runtime AS serve", "FROM train AS serve"),
            "would contain PyTorch",
            id="serve-built-on-train",
        ),
        pytest.param(
            # the train image alone loses runtime's USER/HEALTHCHECK/VOLUME/CMD: checked per image
            lambda: dockerfile_variant("FROM runtime AS train", "FROM ${PYTHON_IMAGE} AS train"),
            "no HEALTHCHECK in stage train",
            id="rules-per-image-stage",
        ),
    ],
)
def test_dockerfile_rule_fires(mutate: Callable[[], str], expected: str) -> None:
    problems = checker.check_dockerfile(mutate(), REPO_ROOT)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("image: redis:7.2.7-alpine", "image: redis:latest", "'latest' tag"),
        ("image: redis:7.2.7-alpine", "image: redis", "no tag"),
        ("image: ${TWOTOWER_IMAGE:-twotower:0.1.0}", "image: twotower", "no tag"),
        ('"--appendonly", "no"', '"--appendonly", "yes"', "cache"),
        ('test: ["CMD", "redis-cli", "ping"]', 'test: ["CMD", "true"]', "redis-cli ping"),
        ("condition: service_completed_successfully\n    restart: unless-stopped\n\n  nightly",
         "condition: service_started\n    restart: unless-stopped\n\n  nightly",
         "bootstrap with condition service_completed_successfully"),
        ("      SERVICE_API_KEY:\n", "      SERVICE_API_KEY: hunter2\n", "secret-looking"),
    ],
    ids=["redis-latest", "redis-untagged", "app-untagged", "redis-persistent", "redis-no-ping",
         "api-not-waiting-for-bootstrap", "literal-secret"],
)
def test_compose_rule_fires(tmp_path: Path, old: str, new: str, expected: str) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(compose_text_variant(old, new), encoding="utf-8")
    problems = checker.check_compose(checker.load_compose(broken))
    assert any(expected in p for p in problems), problems


def test_interpolation_matches_docker_compose(tmp_path: Path) -> None:
    """Our reading of the compose file (used by the stack test) equals docker-compose's own."""
    ok, detail = checker.compose_config(COMPOSE_FILE)
    if ok is None:
        pytest.skip(detail)
    yaml = pytest.importorskip("yaml")
    env = {"SYNTH_USERS": "11", "API_PORT": "9001", "TRAIN_CONFIG": "/data/t.json", "DATASET_DIR": "/srv/ds"}
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), "config"],
        capture_output=True, text=True, timeout=60, check=True,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    theirs = yaml.safe_load(result.stdout)["services"]
    ours = checker.load_compose(COMPOSE_FILE, env)["services"]
    for name, service in ours.items():
        their_env = {k: v for k, v in (theirs[name].get("environment") or {}).items() if v is not None}
        our_env = {k: str(v) for k, v in (service.get("environment") or {}).items() if v is not None}
        assert our_env == their_env, name
        # docker-compose re-escapes `$` as `$$` when it prints the resolved file
        their_cmd = [a.replace("$$", "$") for a in argv_of(theirs[name].get("command", []))]
        assert argv_of(service.get("command", [])) == their_cmd, name
        their_mounts = [v.rsplit(":", 1)[0] if v.endswith((":rw", ":ro")) else v for v in theirs[name].get("volumes", [])]
        our_mounts = [v.rsplit(":", 1)[0] if v.endswith((":rw", ":ro")) else v for v in service.get("volumes", [])]
        assert our_mounts == their_mounts, name
    assert ours["bootstrap"]["volumes"][0] == "/srv/ds:/data"
    assert ours["bootstrap"]["environment"]["SYNTH_USERS"] == "11"


def test_dockerfile_cmd_is_the_compose_api_command() -> None:
    """`docker run IMAGE` and the compose api start the same server (the image's default role)."""
    _, stages = checker.parse_stages(DOCKERFILE_TEXT)
    cmd = checker.exec_form(checker.effective_stage(stages[-1], stages).all("CMD")[-1].args)
    api = checker.load_compose(COMPOSE_FILE)["services"]["api"]
    assert cmd == argv_of(api["command"])
    assert "8000" in "".join(api["ports"][0].split(":")[-1:])


def test_every_variable_is_documented() -> None:
    """Each compose variable and Dockerfile build ARG appears in docs/docker.md's table."""
    doc = DOCKER_DOC.read_text(encoding="utf-8")
    compose_vars = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text(encoding="utf-8")))
    global_args, stages = checker.parse_stages(DOCKERFILE_TEXT)
    args = set(global_args) | {i.args.partition("=")[0].strip() for s in stages for i in s.all("ARG")}
    passthrough = {
        k for s in checker.load_compose(COMPOSE_FILE)["services"].values()
        for k, v in (s.get("environment") or {}).items() if v is None
    }
    assert compose_vars and args and passthrough
    missing = sorted(v for v in compose_vars | args | passthrough | {"HEALTHCHECK_URL"} if f"`{v}`" not in doc)
    assert missing == [], f"undocumented in docs/docker.md: {missing}"


def test_image_installs_exactly_the_pyproject_dependencies() -> None:
    """The builders' pip steps: serve gets pyproject's base dependencies (no torch, pandas or
    pyarrow); train adds the pinned torch from TORCH_INDEX_URL and then the `train` extra."""
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 (the image's) reads pyproject")

    script = REPO_ROOT / "docker" / "pyproject_deps.py"
    pyproject = REPO_ROOT / "pyproject.toml"

    def deps(*flags: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, str(script), str(pyproject), *flags],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        return out.splitlines()

    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    base, train = project["dependencies"], project["optional-dependencies"]["train"]
    assert deps() == base
    names = {checker_name(r) for r in base}
    assert not names & {"torch", "pandas", "pyarrow"}, "the serve image installs the base dependencies"
    torch = deps("--extra", "train", "--only", "torch")
    rest = deps("--extra", "train", "--exclude", "torch")
    assert len(torch) == 1 and torch[0].startswith("torch==")
    assert sorted(torch + rest) == sorted(base + train) == sorted(deps("--extra", "train"))
    assert "--extra train" in DOCKERFILE_TEXT and 'pyproject_deps.py pyproject.toml > /tmp/requirements.txt' in DOCKERFILE_TEXT


def checker_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_the_default_target_is_serve_and_compose_uses_the_right_targets() -> None:
    _, stages = checker.parse_stages(DOCKERFILE_TEXT)
    assert stages[-1].name == "serve"
    assert {s.name for s in checker.image_stages(stages)} == {"train", "serve"}
    services = checker.load_compose(COMPOSE_FILE)["services"]
    targets = {name: (svc.get("build") or {}).get("target") for name, svc in services.items() if name != "redis"}
    assert targets == {"api": "serve", "bootstrap": "train", "nightly": "train", "update": "train"}
    assert services["api"]["image"] != services["bootstrap"]["image"] == services["nightly"]["image"]


@pytest.fixture()
def readyz_server() -> Iterator[Callable[[int], str]]:
    """A local HTTP server whose /readyz answers a status code the test chooses."""
    state = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            code = state["status"] if self.path == "/readyz" else 404
            body = json.dumps({"status": "ready" if code == 200 else "not ready"}).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def url_with(status: int) -> str:
        state["status"] = status
        return f"http://127.0.0.1:{server.server_address[1]}/readyz"

    try:
        yield url_with
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False), (500, False)])
def test_healthcheck_script_follows_readyz(readyz_server: Callable[[int], str], status: int, healthy: bool) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docker" / "healthcheck.py")],
        env={"HEALTHCHECK_URL": readyz_server(status)},
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert (result.returncode == 0) is healthy, result.stdout + result.stderr


def test_healthcheck_script_fails_when_nothing_listens() -> None:
    from tests.stack_helpers import free_port

    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docker" / "healthcheck.py")],
        env={"HEALTHCHECK_URL": f"http://127.0.0.1:{free_port()}/readyz"},
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 1 and "unreachable" in result.stderr
