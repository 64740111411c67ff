"""The `ringlib` command (also `python -m ringlib`): demo, bench."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = ("kernels", "allreduce")


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]) and run the chosen subcommand."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="ringlib", description="Peer-to-peer ring all-reduce.")
    parser.add_argument("--version", action="version", version=f"ringlib {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the main demonstration job")
    demo.add_argument("--seed", type=int, default=None, help="data seed (default: fresh)")
    bench = commands.add_parser("bench", help="run a benchmark; see `ringlib bench NAME -h`")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.seed)
    importlib.import_module(f"ringlib.bench.{args.name}").main(args.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
