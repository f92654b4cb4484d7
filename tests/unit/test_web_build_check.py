"""The asset-freshness check (scripts/check_web_build.py) fails on a stale build.

`make test` runs the full check (npm ci + build of web/ in a temporary copy, compared
with app/web/static).  Here the comparison and the exit status are exercised without
npm: the committed build stands in for a fresh one, and a copy of it is made stale."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_web_build.py"
COMMITTED = REPO / "app" / "web" / "static"


def check(build_dir: Path, committed: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--build-dir", str(build_dir), "--committed", str(committed)],
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    target = tmp_path / "static"
    shutil.copytree(COMMITTED, target)
    return target


def test_the_committed_build_has_the_board_and_graphiql():
    assert (COMMITTED / "board" / "index.html").is_file()
    assert (COMMITTED / "graphiql" / "index.html").is_file()
    assert (COMMITTED / "assets" / "board.js").is_file()


def test_an_identical_build_passes(copy):
    result = check(COMMITTED, copy)
    assert result.returncode == 0, result.stderr
    assert "matches a fresh build" in result.stdout


def test_a_changed_file_fails_and_is_named(copy):
    board = copy / "assets" / "board.js"
    board.write_bytes(board.read_bytes() + b"\n// edited by hand\n")
    result = check(COMMITTED, copy)
    assert result.returncode == 1
    assert "stale" in result.stderr
    assert "differs: assets/board.js" in result.stderr


def test_a_missing_or_extra_file_fails(copy):
    (copy / "board" / "index.html").unlink()
    (copy / "assets" / "old-chunk.js").write_text("// left over from an older build\n")
    result = check(COMMITTED, copy)
    assert result.returncode == 1
    assert "missing from the committed build: board/index.html" in result.stderr
    assert "not produced by the build: assets/old-chunk.js" in result.stderr
