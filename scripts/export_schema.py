"""Export the GraphQL SDL to `schema/schema.graphql`.

    python scripts/export_schema.py           # (re)write the file
    python scripts/export_schema.py --check   # exit 1 when the file is stale

The checked-in SDL is the contract clients read; CI runs `--check` so it can never
drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script from any directory
    sys.path.insert(0, str(ROOT))

SCHEMA_PATH = ROOT / "schema" / "schema.graphql"


def render_sdl() -> str:
    from app.graphql.schema import schema

    return schema.as_str() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 when the file differs from the schema")
    parser.add_argument("--path", type=Path, default=SCHEMA_PATH, help="where the SDL lives")
    args = parser.parse_args(argv)
    sdl = render_sdl()
    current = args.path.read_text(encoding="utf-8") if args.path.exists() else None
    if args.check:
        if current != sdl:
            print(f"{args.path} is stale; run `make schema` (python scripts/export_schema.py)",
                  file=sys.stderr)
            return 1
        print(f"{args.path} is up to date", file=sys.stderr)
        return 0
    if current != sdl:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(sdl, encoding="utf-8")
        print(f"wrote {args.path}", file=sys.stderr)
    else:
        print(f"{args.path} already up to date", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
