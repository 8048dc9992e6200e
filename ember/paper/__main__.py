"""`python -m ember.paper check|build [--strict]`.

  check            problems of the sources (a macro no experiment writes, a typed number) and what they use
                   that no run has made yet (figures, tables, macros); exit 1 if any
  build            paper/main.pdf (a LaTeX engine installed from Debian packages when missing); missing figures
                   show as "not yet run" boxes, missing macros as red marks
  build --strict   the same, but refuses to build while anything is missing, naming all of it
"""

from __future__ import annotations

import argparse
import sys

from ember.errors import EmberError


def main(argv: list[str] | None = None) -> int:
    """Run the paper command; errors are one `ember: error:` line (exit 2)."""
    from ember.paper.build import build, find_missing
    from ember.paper.runs import known_macros
    from ember.paper.sources import check_sources

    parser = argparse.ArgumentParser(prog="python -m ember.paper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("check", "build"))
    parser.add_argument("--strict", action="store_true", help="fail while a figure, table or macro is missing")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            problems = check_sources(known_macros())
            missing = find_missing()
            for line in problems:
                print(f"source: {line}")
            for line in missing.lines():
                print(f"missing {line}")
            print(f"paper: {len(problems)} source problem(s), {len(missing.lines())} missing")
            return 1 if problems or missing else 0
        build(strict=args.strict)
        return 0
    except EmberError as error:
        print(f"ember: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
