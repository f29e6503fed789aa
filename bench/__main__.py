"""Run the benchmarks in bench/ and print a table (or JSON) of figures and ratios."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

import bench


def load_all() -> None:
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not mod.name.startswith("_"):
            importlib.import_module(f"bench.{mod.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help="run the benchmarks whose name starts with one of these")
    parser.add_argument("--quick", action="store_true", help="a short version of each")
    parser.add_argument("--json", action="store_true", help="print a JSON list of figures")
    args = parser.parse_args(argv)
    load_all()
    wanted = [n for n in bench.REGISTRY if not args.names or any(n.startswith(p) for p in args.names)]
    if not wanted:
        print(f"no benchmark matches {args.names}; there are: {', '.join(sorted(bench.REGISTRY))}",
              file=sys.stderr)
        return 2
    figures = []
    done = set()
    for name in wanted:
        fn = bench.REGISTRY[name]
        if fn in done:
            continue
        done.add(fn)
        for fig in fn(args.quick):
            if not args.names or any(fig.name.startswith(p) for p in args.names):
                figures.append(fig)
                if not args.json:
                    print(_row(fig), flush=True)
    if args.json:
        print(json.dumps([f.as_dict() for f in figures], indent=1))
    return 0


def _row(f: bench.Figure) -> str:
    base = f"{f.baseline} {f.baseline_value:,.4g}" if f.baseline else "-"
    ratio = f"{f.ratio:.2f}x" if f.ratio is not None else "-"
    return f"{f.name:28s} {f.value:>14,.4g} {f.unit:12s} {ratio:>8s}  vs {base}"


if __name__ == "__main__":
    sys.exit(main())
