"""What a benchmark run leaves behind besides its table: a JSON document with the machine
it ran on, and a PNG plot of bandwidth and latency against size, one line per system."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from .timing import format_size

PACKAGES = ("ringlib", "numpy", "pyzmq", "numba", "msgpack", "torch", "mpi4py")


def machine() -> dict[str, Any]:
    """The host, Python and library versions, for comparing runs across machines."""
    import zmq

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"host": platform.node(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "memory_gib": _memory_gib(),
            "kernel": platform.release(), "python": platform.python_version(),
            "libzmq": zmq.zmq_version(), "packages": versions}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    return round(pages * size / (1 << 30), 1)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps({**document, "machine": machine()}, indent=1) + "\n")


def plot(path: Path, title: str, series: dict[str, list[tuple[int, float, float]]],
         bandwidth: str) -> None:
    """Two panels against size: `bandwidth` (GB/s) and median time (us), a line per system.
    series: label -> [(bytes, GB/s, seconds)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bw_ax, lat_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, points in series.items():
        sizes = [p[0] for p in points]
        bw_ax.plot(sizes, [p[1] for p in points], marker="o", label=label)
        lat_ax.plot(sizes, [p[2] * 1e6 for p in points], marker="o", label=label)
    for ax, ylabel in ((bw_ax, f"{bandwidth} GB/s"), (lat_ax, "median time (us)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ticks = sorted({p[0] for points in series.values() for p in points})
        ticks = ticks[::-(-len(ticks) // 8)]  # at most 8 labels
        ax.set_xticks(ticks)
        ax.set_xticklabels([format_size(t) for t in ticks], rotation=30)
        ax.legend()
    lat_ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
