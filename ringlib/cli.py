"""The `ringlib` command (also `python -m ringlib`): launch, demo, bench."""

from __future__ import annotations

import argparse
import importlib
import sys

SWEEPS = ("allreduce", "reduce_scatter", "all_gather", "broadcast", "latency")  # bench.sweep
BENCHMARKS = ("kernels", *SWEEPS, "trainer", "pipeline")


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]) and run the chosen subcommand."""
    from . import __version__

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # its arguments start with options of its own: parse them there
        from .runtime.launcher import main as launch

        return launch(argv[1:])
    parser = argparse.ArgumentParser(prog="ringlib", description="Peer-to-peer ring all-reduce.")
    parser.add_argument("--version", action="version", version=f"ringlib {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("launch", help="start the ranks of a ring; see `ringlib launch -h`")
    demo = commands.add_parser("demo", help="run the main demonstration job")
    demo.add_argument("--seed", type=int, default=None, help="data seed (default: fresh)")
    bench = commands.add_parser("bench", help="run a benchmark; see `ringlib bench NAME -h`")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.seed)
    if args.name in SWEEPS:
        from .bench.sweep import main as sweep

        sweep(args.args, collective=args.name)
    else:
        importlib.import_module(f"ringlib.bench.{args.name}").main(args.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
