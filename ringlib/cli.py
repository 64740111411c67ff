"""The `ringlib` command (also `python -m ringlib`): launch, demo, bench, keygen."""

from __future__ import annotations

import argparse
import importlib
import sys

SWEEPS = ("allreduce", "reduce_scatter", "all_gather", "broadcast", "latency")  # bench.sweep
BENCHMARKS = ("kernels", *SWEEPS, "trainer", "pipeline", "soak", "netem")


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
    keygen = commands.add_parser("keygen", help="write a ring's CurveZMQ key pair")
    keygen.add_argument("directory", help="where to write ring.key and ring.key_secret")
    args = parser.parse_args(argv)

    if args.command == "keygen":
        return _keygen(args.directory)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.seed)
    if args.name in SWEEPS:
        from .bench.sweep import main as sweep

        sweep(args.args, collective=args.name)
        return 0
    return importlib.import_module(f"ringlib.bench.{args.name}").main(args.args) or 0


def _keygen(directory: str) -> int:
    from .errors import Unauthorized
    from .transport.security import generate

    try:
        public, secret = generate(directory)
    except (Unauthorized, OSError) as exc:
        print(f"ringlib keygen: {exc}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret} (give it to every rank: "
          f"`ringlib launch --keys {secret}` or RINGLIB_CURVE_KEY={secret})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
