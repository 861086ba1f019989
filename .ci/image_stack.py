#!/usr/bin/env python3
"""Build both Dockerfile targets and run the compose stack's commands inside the built images.

`make image-check` (minutes; not part of CI, which has no image builder): run it after changing
the Dockerfile, docker-compose.yml, pyproject's dependencies or anything the images import at
start-up. tests/test_stack.py runs the same compose commands as host processes on every CI run;
this runs them in the real images, which is what catches a dependency the slim `serve` image
lacks, a file the image does not contain, or a permission of the image's user.

There is no Docker engine here: `../shared/tools/image-check.sh` (its header says how) builds
the Dockerfile with podman on a local stand-in base and runs commands inside a built image as
the image's own user (a chroot into the image's root filesystem: the host's network, no volume
mounts). The compose file stays the single source of its services' commands and environments;
this driver reads it (interpolated as compose does, with the small sizes below passed as the
compose variables a user would set) and runs, in compose's order:

1. build `train` and `serve`; record both sizes (the serve image must stay under 500 MB) and
   check that the serve image cannot import torch, pandas or pyarrow;
2. `bootstrap` (the compose command) in the train image: synthetic data, `trainer fit`, `indexer
   rebuild`;
3. the index handed to the serve image (a copy, as the shared `index` volume would be), a
   redis-server with the compose redis command, then `api` (the compose command) in the serve
   image; wait for /readyz;
4. the README's curl (the first curl block of docs/docker.md), twice: 200 with k items, then
   `cached: true`;
5. `nightly` (one run) in the train image; the new version handed over (version directory first,
   then `current` switched atomically, as the rebuild does on a shared volume);
6. the running api hot-reloads: the same curl answers with the new model and index versions;
7. the image's HEALTHCHECK command, run inside the serve image against the api.

Prints one line per step and a JSON summary (sizes, versions); exit 0 only if every step passed.
Run as root from the repository root (image-check.sh needs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.stack_helpers import argv_of, documented_curls, load_checker, startup_order, with_port  # noqa: E402

STATE = Path("/tmp/twotower-image-check")
SERVE_LIMIT_BYTES = 500 * 1000 * 1000
# The compose variables a user would set for a small run (docs/docker.md documents them).
STACK_ENV = {
    "SYNTH_USERS": "500",
    "SYNTH_ITEMS": "300",
    "SYNTH_INTERACTIONS": "8000",
    "SYNTH_SEED": "0",
    "TRAIN_CONFIG": "/data/train.json",
    "NIGHTLY_INTERVAL_SECONDS": "0",
    "NIGHTLY_MAX_RUNS": "1",
    "NIGHTLY_KEEP_MODELS": "1",
}
FAST_TRAIN_CONFIG = {"epochs": 1, "full_epochs": 1, "batch_size": 256}


class StepFailed(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"image-stack: {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


class Images:
    def __init__(self, tool: Path) -> None:
        self.tool = tool

    def tag(self, target: str) -> str:
        return f"localhost/twotower:check-{target}"

    def build(self, target: str) -> None:
        log(f"building target {target} (minutes)")
        t0 = time.monotonic()
        subprocess.run(["bash", str(self.tool), "build", target], cwd=ROOT, check=True)
        log(f"built {self.tag(target)} in {time.monotonic() - t0:.0f}s")

    def inspect(self, target: str, fmt: str) -> str:
        return subprocess.run(
            ["podman", "image", "inspect", self.tag(target), "--format", fmt],
            capture_output=True, text=True, check=True,
        ).stdout.strip()

    def size(self, target: str) -> int:
        return int(self.inspect(target, "{{.Size}}"))

    def argv(self, target: str, command: list[str], env: dict[str, str] | None = None) -> list[str]:
        """image-check.sh's `run`: the command as the image's user, with the image's ENV plus `env`."""
        pre = ["env", *(f"{k}={v}" for k, v in (env or {}).items())] if env else []
        return ["bash", str(self.tool), "run", self.tag(target), "--", *pre, *command]

    def run(self, target: str, command: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> str:
        result = subprocess.run(
            self.argv(target, command, env), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
        out = result.stdout + result.stderr
        if result.returncode != 0:
            raise StepFailed(f"`{shlex.join(command)[:200]}` in {target} exited {result.returncode}:\n{out[-6000:]}")
        return out

    def rootfs(self, target: str) -> Path:
        """The mounted root filesystem of the target's work container (created by a first `run`)."""
        key = self.tag(target).replace("/", "_").replace(":", "_")
        cid = (STATE / f"{key}.cid").read_text().strip()
        return Path(subprocess.run(["podman", "mount", cid], capture_output=True, text=True, check=True).stdout.strip())

    def clean(self) -> None:
        subprocess.run(["bash", str(self.tool), "clean"], cwd=ROOT, check=False)


def hand_over_index(src: Path, dst: Path) -> str:
    """Copy new version directories of `src` (the train image's /index) into `dst` (the serve
    image's), then switch dst/current atomically to src's target; return that version."""
    dst.mkdir(exist_ok=True)
    for entry in sorted(src.iterdir()):
        if entry.name == "current" or entry.name.startswith(".") or (dst / entry.name).exists():
            continue
        subprocess.run(["cp", "-a", str(entry), str(dst / entry.name)], check=True)
    target = os.readlink(src / "current")
    tmp = dst / f".current-{os.getpid()}"
    os.symlink(target, tmp)
    os.replace(tmp, dst / "current")
    return target


def request(url: str, method: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", type=Path, default=Path(os.environ.get("IMAGE_CHECK", ROOT.parent / "shared" / "tools" / "image-check.sh")))
    parser.add_argument("--skip-build", action="store_true", help="use the images of an earlier build")
    parser.add_argument("--summary", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    if not args.tool.is_file():
        print(f"image-stack: no image-check tool at {args.tool} (set IMAGE_CHECK or --tool)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("image-stack: run as root (podman build and chroot need it)", file=sys.stderr)
        return 2

    checker = load_checker()
    compose = checker.load_compose(ROOT / "docker-compose.yml", {**os.environ, **STACK_ENV})
    services = compose["services"]
    order = startup_order(services)
    if order != ["redis", "bootstrap", "api", "nightly"]:
        raise SystemExit(f"image-stack: unexpected compose order {order}")
    targets = {name: services[name]["build"]["target"] for name in ("bootstrap", "api", "nightly")}
    images = Images(args.tool)
    summary: dict[str, Any] = {"targets": targets, "steps": [], "problems": []}
    procs: list[subprocess.Popen[bytes]] = []
    workdir = Path(tempfile.mkdtemp(prefix="image-stack-"))

    def env_of(name: str, redis_port: int) -> dict[str, str]:
        env = {}
        for k, v in (services[name].get("environment") or {}).items():
            if v is None:
                continue
            env[str(k)] = str(v).replace("redis://redis:6379", f"redis://127.0.0.1:{redis_port}")
        return env

    def step(name: str) -> None:
        summary["steps"].append(name)
        log(f"ok: {name}")

    try:
        # 1. the images
        if not args.skip_build:
            for target in sorted(set(targets.values())):
                images.build(target)
        summary["size_bytes"] = {t: images.size(t) for t in sorted(set(targets.values()))}
        log(f"image sizes: {summary['size_bytes']}")
        images.clean()
        serve, train = targets["api"], targets["bootstrap"]
        # size and content problems are recorded, and the stack still runs (to see every problem at once)
        if summary["size_bytes"][serve] >= SERVE_LIMIT_BYTES:
            summary["problems"].append(f"the {serve} image is {summary['size_bytes'][serve] / 1e6:.0f} MB (limit 500 MB)")
        probe = "import importlib.util as u; print([m for m in ('torch', 'pandas', 'pyarrow') if u.find_spec(m)])"
        found = images.run(serve, ["python", "-c", probe]).strip().splitlines()[-1]
        if found != "[]":
            summary["problems"].append(f"the {serve} image can import {found}")
        step(f"images built; {serve} is {summary['size_bytes'][serve] / 1e6:.0f} MB; it imports {found} of torch/pandas/pyarrow")

        # 2. bootstrap (compose's command and environment) in the train image
        redis_port = free_port()
        images.run(train, ["sh", "-c", f"printf '%s' {shlex.quote(json.dumps(FAST_TRAIN_CONFIG))} > /data/train.json"])
        out = images.run(train, argv_of(services["bootstrap"]["command"]), env_of("bootstrap", redis_port))
        if "bootstrap: done" not in out:
            raise StepFailed(f"bootstrap did not finish:\n{out[-3000:]}")
        first = hand_over_index(images.rootfs(train) / "index", _serve_index(images, serve))
        step(f"bootstrap in {train}: index version {first}")

        # 3. redis (compose's command) and the api (compose's command) in the serve image
        redis_argv = [*argv_of(services["redis"]["command"]), "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(workdir)]
        procs.append(subprocess.Popen(redis_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        port = 8000 if port_free(8000) else free_port()
        api_argv = with_port(argv_of(services["api"]["command"]), "0.0.0.0", port)
        api_log = (workdir / "api.log").open("wb")
        procs.append(subprocess.Popen(images.argv(serve, api_argv, env_of("api", redis_port)), cwd=ROOT, stdout=api_log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if request(base + "/readyz", "GET", None, {})[0] == 200:
                    break
            except OSError:
                pass
            if procs[-1].poll() is not None:
                raise StepFailed(f"the api exited {procs[-1].returncode}:\n{(workdir / 'api.log').read_text()[-4000:]}")
            time.sleep(0.5)
        else:
            raise StepFailed(f"the api never became ready:\n{(workdir / 'api.log').read_text()[-4000:]}")
        step(f"api ({serve} image, compose command) ready on port {port}")

        # 4. the README curl, twice
        curl = documented_curls((ROOT / "docs" / "docker.md").read_text(encoding="utf-8"))[0]
        path = "/" + curl.url.split("/", 3)[3]
        body = curl.body.encode() if isinstance(curl.body, str) else curl.body
        k = json.loads(body or b"{}").get("k")
        status, answer = request(base + path, curl.method, body, dict(curl.headers))
        if status != 200 or len(answer["items"]) != k or answer["index_version"] != first:
            raise StepFailed(f"README curl: {status} {answer}")
        status, again = request(base + path, curl.method, body, dict(curl.headers))
        if status != 200 or again.get("cached") is not True or again["items"] != answer["items"]:
            raise StepFailed(f"README curl again (expected cached: true): {status} {again}")
        summary["first"] = {"model_version": answer["model_version"], "index_version": answer["index_version"]}
        step(f"README curl: {k} items from {answer['model_version']}, then cached: true")

        # 5. nightly (one run) in the train image, handed over like the shared volume
        out = images.run(train, argv_of(services["nightly"]["command"]), env_of("nightly", redis_port))
        if "nightly: done" not in out:
            raise StepFailed(f"nightly did not finish:\n{out[-3000:]}")
        second = hand_over_index(images.rootfs(train) / "index", _serve_index(images, serve))
        if second == first:
            raise StepFailed("nightly did not switch current")
        step(f"nightly in {train}: index version {second}")

        # 6. hot reload of the running api
        deadline = time.monotonic() + 60
        latest = answer
        while time.monotonic() < deadline and latest["index_version"] != second:
            time.sleep(0.5)
            status, latest = request(base + path, curl.method, body, dict(curl.headers))
            if status != 200:
                raise StepFailed(f"during the reload: {status} {latest}")
        if latest["index_version"] != second or latest["model_version"] == answer["model_version"]:
            raise StepFailed(f"the api did not hot-reload: {latest}")
        summary["second"] = {"model_version": latest["model_version"], "index_version": latest["index_version"]}
        step(f"api hot-reloaded to {second} (model {latest['model_version']}) without a restart")

        # 7. the image's HEALTHCHECK command inside the serve image
        hc = json.loads(images.inspect(serve, "{{json .Config.Healthcheck}}") or "null")
        if not hc or hc.get("Test", [None])[0] not in ("CMD", "CMD-SHELL"):
            raise StepFailed(f"the {serve} image has no HEALTHCHECK: {hc}")
        test = hc["Test"][1:] if hc["Test"][0] == "CMD" else ["/bin/sh", "-c", hc["Test"][1]]
        hc_env = {} if port == 8000 else {"HEALTHCHECK_URL": f"http://127.0.0.1:{port}/readyz"}
        images.run(serve, test, hc_env, timeout=60)
        step(f"HEALTHCHECK {test} passed")
    except (StepFailed, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        log(f"FAILED: {e}")
        summary["failed"] = str(e)[:2000]
        if (workdir / "api.log").exists():
            log("api log (tail):\n" + (workdir / "api.log").read_text(errors="replace")[-3000:])
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        images.clean()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    for problem in summary["problems"]:
        log(f"PROBLEM: {problem}")
    return 1 if "failed" in summary or summary["problems"] else 0


def _serve_index(images: Images, serve: str) -> Path:
    images.run(serve, ["true"])  # creates (or reuses) the serve image's work container
    return images.rootfs(serve) / "index"


if __name__ == "__main__":
    raise SystemExit(main())
