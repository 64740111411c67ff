"""The package as users get it: the wheel, the import namespace, the layering, the CLI."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ringlib.cli import BENCHMARKS

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("transport", "collectives", "runtime", "bench")


def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_built_wheel_installs_everything_inside_the_ringlib_namespace(tmp_path):
    # setuptools writes build/ into the source tree: build from a private copy.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w",
                str(tmp_path / "dist"), str(source), cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("ringlib-*.whl")
    site = tmp_path / "site"
    installed = run(sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                    str(site), str(wheel), cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    top_level = {p.name for p in site.iterdir() if not p.name.endswith(".dist-info")}
    assert top_level == {"ringlib", "bin"}, f"the wheel installs top-level names {top_level}"
    assert (site / "bin" / "ringlib").exists(), "the console script is missing"

    probe = ("import importlib, ringlib, sys; "
             f"mods = [importlib.import_module('ringlib.' + m) for m in {SUBPACKAGES!r}]; "
             "print('\\n'.join(m.__file__ for m in [ringlib, *mods]))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    imported = run(sys.executable, "-c", probe, cwd=tmp_path, env=env)
    assert imported.returncode == 0, imported.stderr
    files = imported.stdout.split()
    assert len(files) == 1 + len(SUBPACKAGES)
    assert all(f.startswith(str(site)) for f in files), files
    assert (site / "ringlib" / "py.typed").exists()


# Which first-party modules each layer may import: runtime -> collectives -> transport,
# collectives -> the compiled core; the core and the transport stand on their own, and
# only the transport speaks ZeroMQ.
CORE = {"ringlib.kernels", "ringlib.reduce", "ringlib.dtypes", "ringlib.partition", "ringlib.ops"}
FORBIDDEN = {
    "transport": {"ringlib.collectives", "ringlib.runtime", "ringlib.bench"} | CORE,
    "collectives": {"ringlib.runtime", "ringlib.bench", "zmq"},
    "runtime": {"ringlib.bench", "zmq"},
    "ringlib/core": {"ringlib.transport", "ringlib.collectives", "ringlib.runtime", "ringlib.bench",
                     "zmq", "torch"},
}
CORE_FILES = ["ringlib/" + m.split(".")[1] + ".py" for m in CORE] + ["ringlib/errors.py"]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what a module imports, resolving relative imports."""
    package = ".".join(("ringlib",) + path.relative_to(ROOT).parent.parts[-1:])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}".rstrip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downward(layer):
    files = ([ROOT / f for f in CORE_FILES] if layer == "ringlib/core"
             else sorted((ROOT / layer).rglob("*.py")))
    assert files, f"no modules found for layer {layer}"
    for path in files:
        bad = {name for name in imported_modules(path)
               for banned in FORBIDDEN[layer] if name == banned or name.startswith(banned + ".")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)} against the layering"


@pytest.mark.parametrize("package", ["ringlib", "ringlib.transport", "ringlib.collectives",
                                     "ringlib.runtime"])
def test_a_fresh_interpreter_that_imports_a_layer_loads_nothing_above_it(package, tmp_path):
    """What the static check above cannot see: an import chain through a package's
    __init__ (ringlib's own, say) that drags in a layer above."""
    above = {"ringlib": {"ringlib.transport", "ringlib.collectives", "ringlib.runtime",
                         "ringlib.bench"} | CORE,
             "ringlib.transport": {"ringlib.collectives", "ringlib.runtime", "ringlib.bench"}
             | CORE,
             "ringlib.collectives": {"ringlib.runtime", "ringlib.bench"},
             "ringlib.runtime": {"ringlib.bench"}}[package]
    probe = f"import json, sys, {package}; print(json.dumps(sorted(sys.modules)))"
    loaded = run(sys.executable, "-c", probe, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    modules = json.loads(loaded.stdout)
    bad = sorted(m for m in modules for banned in above if m == banned or m.startswith(banned + "."))
    assert not bad, f"import {package} loaded {bad}"
    assert package in modules


def test_a_fresh_process_loads_the_kernels_from_numbas_cache_instead_of_compiling(tmp_path):
    probe = ("import numpy as np, torch, ringlib; "
             "[ringlib.reduce_into(np.ones(3, d), np.ones(3, d), op) "
             " for d in ('float32', 'int8') for op in ('sum', 'max')]; "
             "ringlib.reduce_into(torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16))")
    warm = run(sys.executable, "-c", probe, cwd=tmp_path)
    assert warm.returncode == 0, warm.stderr
    env = {**os.environ, "NUMBA_DEBUG_CACHE": "1"}
    fresh = run(sys.executable, "-c", probe, cwd=tmp_path, env=env)
    assert fresh.returncode == 0, fresh.stderr
    log = fresh.stdout + fresh.stderr
    assert "data loaded from" in log
    assert "data saved to" not in log, "a warm cache should not need to save new code:\n" + log


def test_python_dash_m_and_the_console_script_agree(tmp_path):
    module = run(sys.executable, "-m", "ringlib", "--version", cwd=tmp_path)
    script = run(str(Path(sys.executable).with_name("ringlib")), "--version", cwd=tmp_path)
    assert module.returncode == script.returncode == 0
    assert module.stdout == script.stdout == "ringlib 0.1.0\n"


def test_the_demo_runs_4_peers_checks_every_collective_and_prints_the_sweep(tmp_path):
    demo = run(sys.executable, "-m", "ringlib", "demo", "--seed", "7", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "[0] ringlib demo: 4 peers on this host, one process each, seed 7" in demo.stdout
    checks = [line for line in demo.stdout.splitlines() if line.startswith("[0]   ok ")]
    assert len(checks) == 6 and "FAILED" not in demo.stdout
    for row in ("8 B", "64 KiB", "1 MiB", "16 MiB"):
        assert re.search(rf"\[0\] +{row} +[\d.]+ +[\d.]+$", demo.stdout, re.M), row


def test_the_kernel_benchmark_prints_a_row_per_case_with_a_ratio(tmp_path):
    bench = run(sys.executable, "-m", "ringlib", "bench", "kernels", "--sizes", "1KiB,4KiB",
                "--no-cold-start", cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    rows = [line for line in bench.stdout.splitlines() if line.rstrip().endswith("x")]
    assert len(rows) == 2 * 11, bench.stdout
    assert all("numpy" in r or "torch" in r for r in rows)


def test_unknown_subcommands_fail_with_usage(tmp_path):
    bad = run(sys.executable, "-m", "ringlib", "launchh", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    bad = run(sys.executable, "-m", "ringlib", "bench", "allreducee", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'allreducee'" in bad.stderr


def test_bench_help_lists_every_benchmark_and_each_shows_its_own_options(tmp_path):
    listing = run(sys.executable, "-m", "ringlib", "bench", "-h", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    # every benchmark's -h in one process (a process each costs the suite seconds), each
    # through the CLI's own main, its output cut apart by a marker line
    helps = ("import contextlib\nfrom ringlib.cli import main\n"
             f"for name in {list(BENCHMARKS)!r}:\n"
             "    print('=== ' + name, flush=True)\n"
             "    with contextlib.suppress(SystemExit):\n"
             "        main(['bench', name, '-h'])\n")
    helped = run(sys.executable, "-c", helps, cwd=tmp_path)
    assert helped.returncode == 0 and not helped.stderr, helped.stderr
    own = dict(part.split("\n", 1) for part in helped.stdout.split("=== ")[1:])
    for name in BENCHMARKS:
        assert re.search(rf"^    {name}\b", listing.stdout, re.M), (name, listing.stdout)
        assert own[name].startswith(f"usage: ringlib bench {name} "), (name, own[name][:200])
        assert "--" in own[name].split("options:")[-1], f"{name} -h lists no options"
