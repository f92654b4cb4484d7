"""Fail when the committed browser build (app/web/static) is not what web/ builds.

Like the SDL check: CI rebuilds the assets from web/ and its lockfile with
`npm ci && npm run build` in a temporary copy (the worktree is left alone) and compares
the result with the committed files byte for byte.  The build is deterministic (no
content hashes or timestamps in the output), so any difference means the committed
build is stale: run `make web` and commit app/web/static.

    python scripts/check_web_build.py                  # rebuild and compare
    python scripts/check_web_build.py --build-dir D    # compare D with the committed build
    python scripts/check_web_build.py --committed C    # compare against C instead

Exit status: 0 fresh, 1 stale, 2 the build itself failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"
COMMITTED = REPO / "app" / "web" / "static"
SKIP = {"node_modules", "dist"}


def tree(root: Path) -> dict[str, bytes]:
    """Relative path → bytes of every file under `root` ({} when it does not exist)."""
    if not root.is_dir():
        return {}
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def differences(built: dict[str, bytes], committed: dict[str, bytes]) -> list[str]:
    """Human-readable differences, one a line; empty when the trees are identical."""
    lines = [f"missing from the committed build: {name}"
             for name in sorted(built.keys() - committed.keys())]
    lines += [f"not produced by the build: {name}"
              for name in sorted(committed.keys() - built.keys())]
    lines += [
        f"differs: {name}" for name in sorted(built.keys() & committed.keys())
        if built[name] != committed[name]
    ]
    return lines


def build(workdir: Path) -> Path:
    """Copy web/ into `workdir`, `npm ci && npm run build` there; returns the output dir."""
    source = workdir / "web"
    shutil.copytree(WEB, source, ignore=lambda _dir, names: [n for n in names if n in SKIP])
    out = workdir / "out"
    env = {**os.environ, "FLEET_WEB_OUT": str(out), "npm_config_fund": "false",
           "npm_config_audit": "false", "npm_config_update_notifier": "false"}
    install = ["npm", "ci", "--prefer-offline", "--no-audit", "--no-fund"]
    for command in (install, ["npm", "run", "build"]):
        result = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
            raise SystemExit(
                f"`{' '.join(command)}` failed in a copy of web/ (exit {result.returncode})"
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, help="a finished build to compare (skips npm)")
    parser.add_argument("--committed", type=Path, default=COMMITTED)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-web-") as tmp:
        try:
            built_dir = args.build_dir or build(Path(tmp))
        except SystemExit as exc:
            print(exc, file=sys.stderr)
            return 2
        problems = differences(tree(built_dir), tree(args.committed))
    if problems:
        print(f"{args.committed} is stale: run `make web` and commit it.", file=sys.stderr)
        for line in problems[:50]:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"{args.committed} matches a fresh build of web/ ({len(tree(args.committed))} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
