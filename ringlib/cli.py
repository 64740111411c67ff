"""The `ringlib` command (also `python -m ringlib`): launch, demo, bench, trace, keygen."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys

# benchmark name -> the module of ringlib.bench that runs it; `ringlib bench NAME -h`
# shows that module's own options.
BENCHMARKS = {
    "kernels": "kernels",
    "allreduce": "sweep", "reduce_scatter": "sweep", "all_gather": "sweep",
    "broadcast": "sweep", "latency": "sweep",
    "trainer": "trainer",
    "ddp": "ddp",
    "pipeline": "pipeline",
    "soak": "soak",
    "chaos": "chaos",
    "netem": "netem",
    "loopback": "loopback",
    "hosts": "hosts",
    "admission": "admission",
    "observing": "observing",
}


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]) and run the chosen subcommand."""
    from . import __version__

    argv = sys.argv[1:] if argv is None else argv
    # These take options of their own, -h included: each parses its arguments itself.
    if argv[:1] == ["launch"]:
        from .runtime.launcher import main as launch

        return launch(argv[1:])
    if argv[:1] == ["trace"]:
        from .runtime.trace_files import main as trace

        return trace(argv[1:])
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in BENCHMARKS:
        return _bench(argv[1], argv[2:])
    parser = argparse.ArgumentParser(prog="ringlib", description="Peer-to-peer ring all-reduce.")
    parser.add_argument("--version", action="version", version=f"ringlib {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("launch", help="start the ranks of a ring; see `ringlib launch -h`")
    commands.add_parser("trace", help="merge the ranks' timelines and summarise them; see "
                                      "`ringlib trace -h`")
    demo = commands.add_parser("demo", help="run the main demonstration job")
    demo.add_argument("--seed", type=int, default=None, help="data seed (default: fresh)")
    _bench_parser(commands)
    keygen = commands.add_parser("keygen", help="write a ring's CurveZMQ key pair")
    keygen.add_argument("directory", help="where to write ring.key and ring.key_secret")
    args = parser.parse_args(argv)

    if args.command == "keygen":
        return _keygen(args.directory)
    from .demo import run_demo

    return run_demo(args.seed)


def _bench(name: str, argv: list[str]) -> int:
    module = importlib.import_module(f"ringlib.bench.{BENCHMARKS[name]}")
    if BENCHMARKS[name] == "sweep":
        return module.main(argv, collective=name) or 0
    return module.main(argv) or 0


def _bench_parser(commands: argparse._SubParsersAction) -> None:
    """`ringlib bench -h`, and the error for a name that is no benchmark (main() hands
    `ringlib bench NAME ARGS...` to the benchmark before this parser sees it)."""
    bench = commands.add_parser("bench", help="run a benchmark; see `ringlib bench -h`",
                                description="Benchmarks that time ringlib beside what it "
                                "replaces, in one run. `ringlib bench NAME -h` lists a "
                                "benchmark's own options.")
    names = bench.add_subparsers(dest="name", required=True, metavar="NAME")
    for name, module in BENCHMARKS.items():
        names.add_parser(name, help=_summary(module))


def _summary(module: str) -> str:
    """The first sentence of a benchmark module's docstring, read without importing it
    (some import torch, which `ringlib bench -h` should not wait for)."""
    spec = importlib.util.find_spec(f"ringlib.bench.{module}")
    with open(spec.origin, encoding="utf-8") as source:
        doc = ast.get_docstring(ast.parse(source.read())) or ""
    return " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")


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
