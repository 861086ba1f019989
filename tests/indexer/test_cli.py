"""`indexer` CLI: exit codes, one-line errors, list / verify / rollback."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from indexer import cli, store
from tests.indexer.conftest import root_snapshot


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() installs its own stdout handler on the root logger; put pytest's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def root_with_two(tmp_path, tiny_bundle_path, tiny_dataset, capsys) -> Path:
    root = tmp_path / "index"
    for _ in range(2):
        code, out, err = run(capsys, "rebuild", "--model", str(tiny_bundle_path), "--data", str(tiny_dataset),
                             "--out", str(root), "--no-progress")
        assert code == 0, err
        assert err == ""
        assert Path(out.splitlines()[-1]) == store.read_current(root)  # last stdout line: the version
        assert "stage embed done in" in out  # per-stage timings are logged
    return root


def test_list_verify_rollback(root_with_two, capsys):
    root = root_with_two
    older, newer = (p.name for p in store.list_versions(root))
    code, out, _ = run(capsys, "list", "--root", str(root))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"  {older}") and lines[1].startswith(f"* {newer}") and "index=Flat" in lines[1]
    code, out, _ = run(capsys, "list", "--root", str(root), "--json")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [(r["version"], r["current"]) for r in rows] == [(older, False), (newer, True)]

    code, out, err = run(capsys, "verify", "--root", str(root))
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and res["ok"] and res["version"] == newer and res["item_query_recall"] == 1.0

    code, out, err = run(capsys, "rollback", "--root", str(root))
    assert code == 0 and out.strip().endswith(older) and store.read_current(root).name == older
    code, out, err = run(capsys, "rollback", newer, "--root", str(root))
    assert code == 0 and store.read_current(root).name == newer


def test_errors_are_one_line_with_distinct_codes(root_with_two, tmp_path, tiny_bundle_path, tiny_dataset, capsys):
    root = root_with_two
    older, newer = (p.name for p in store.list_versions(root))
    before = root_snapshot(root)
    rebuild = ["rebuild", "--model", str(tiny_bundle_path), "--data", str(tiny_dataset), "--out", str(root), "--no-progress"]

    def check(expect_code: int, argv: list[str], text: str) -> None:
        code, _, err = run(capsys, *argv)
        assert code == expect_code, err
        assert err.count("\n") == 1 and text in err, err

    check(2, ["rollback", "no-such", "--root", str(root)], "no index version 'no-such'")
    check(2, ["rebuild", "--model", str(tmp_path / "none"), "--data", str(tiny_dataset), "--out", str(root)], "no such directory")
    check(2, [*rebuild, "--index", "IVF99999,Flat"], "inverted lists but the catalog has only")
    check(4, [*rebuild, "--index", "IVF16,Flat", "--nprobe", "1", "--recall-gate", "0.999"], "recall gate failed")
    with store.locked(root):
        check(3, rebuild, "held by another indexer run")
    with pytest.raises(SystemExit) as e:
        cli.main(["rebuild", "--model", "x"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert root_snapshot(root) == before

    # a corrupted version: verify says so (code 5), rollback to it is refused
    p = root / older / "item_ids.txt"
    p.write_text(p.read_text().replace("\n", "\r\n", 1))
    check(5, ["verify", older, "--root", str(root)], "item_ids.txt sha256 mismatch")
    check(5, ["rollback", "--root", str(root)], "sha256 mismatch")
    assert root_snapshot(root) == before


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["rebuild", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for line in ("3  another indexer run holds", "4  recall gate failed", "5  verification failed"):
        assert line in out


def test_console_script(tmp_path):
    """The installed `indexer` entry point runs (and fails cleanly on an empty root)."""
    exe = Path(sys.executable).parent / "indexer"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([str(exe), "verify", "--root", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == f"indexer verify: error: {tmp_path}: no current version to verify"


@pytest.mark.parametrize(
    ("setup", "extra", "text"),
    [
        ("out_is_file", [], "--out {out}: exists and is not a directory"),
        ("current_is_dir", [], "current is not a symlink (a real directory)"),
        ("none", ["--seed", "-1"], "--seed must be an integer"),
        ("none", ["--threads", "0"], "--threads must be a positive integer"),
    ],
)
def test_unusable_out_or_options_exit_2_before_any_work(setup, extra, text, tmp_path, tiny_bundle_path, tiny_dataset, capsys):
    out = tmp_path / "index"
    if setup == "out_is_file":
        out.write_text("not a directory\n")
    elif setup == "current_is_dir":
        (out / store.CURRENT).mkdir(parents=True)
    code, stdout, err = run(capsys, "rebuild", "--model", str(tiny_bundle_path), "--data", str(tiny_dataset),
                            "--out", str(out), "--no-progress", *extra)
    assert code == 2, err
    assert err.count("\n") == 1 and text.format(out=out) in err, err
    assert "stage embed" not in stdout  # refused before the work, so nothing was built ...
    if out.is_dir():  # ... and no orphan version directory is left
        assert sorted(p.name for p in out.iterdir() if p.name != store.LOCK_FILE) in ([], [store.CURRENT])


@pytest.mark.parametrize(
    "error",
    [ValueError("bundle X: config.json: truncated JSON"), KeyError("model"), AttributeError("'list' object has no attribute 'items'")],
)
def test_bundle_loader_errors_exit_2_with_their_message(error, monkeypatch, tmp_path, tiny_bundle_path, tiny_dataset, capsys):
    import indexer.rebuild

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise error

    monkeypatch.setattr(indexer.rebuild, "load_bundle", broken)
    code, _, err = run(capsys, "rebuild", "--model", str(tiny_bundle_path), "--data", str(tiny_dataset),
                       "--out", str(tmp_path / "index"), "--no-progress")
    assert code == 2, err
    assert err.count("\n") == 1 and str(error).strip("'") in err, err
    if not isinstance(error, ValueError):
        assert str(tiny_bundle_path) in err and type(error).__name__ in err
