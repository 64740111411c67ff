"""Run a script under a real torchrun on a free port, and check it left nothing behind:
no process (each run's environment carries a tag, leftovers.py) and no shared-memory
segment of its job (RINGLIB_JOB names them)."""

from __future__ import annotations

import glob
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from leftovers import assert_none_left, tagged_env
from ringlib.runtime import processes
from ringlib.transport.addresses import free_tcp_ports
from ringlib.transport.segment_names import DIRECTORY, PREFIX


@dataclass
class Run:
    returncode: int | None
    output: str
    results: dict[int, Path]   # rank -> its OUT/rank{R}.json


def torchrun(tmp: Path, nproc: int, script: Path, args: list[str], timeout: float = 120,
             env: dict[str, str] | None = None, monitor_interval: float | None = None,
             expected: int | None = None) -> Run:
    """Run `script args OUT` on `nproc` ranks; OUT is a folder under `tmp` where each rank
    writes rank{R}.json. With `expected`, stop torchrun as soon as that many ranks wrote
    theirs (for runs where a rank dies: torchrun only notices at its next monitor poll)."""
    out = tmp / "out"
    out.mkdir()
    job = f"t{uuid.uuid4().hex[:10]}"
    tag, environment = tagged_env(tmp / "tmp", RINGLIB_JOB=job, **(env or {}))
    port = free_tcp_ports(1)[0]
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1", f"--master-port={port}"]
    if monitor_interval is not None:
        argv.append(f"--monitor-interval={monitor_interval}")
    log = (tmp / "torchrun.log").open("w+")
    proc = processes.start([*argv, str(script), *args, str(out)], environment,
                           stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if expected is not None and len(list(out.glob("rank*.json"))) >= expected:
                time.sleep(0.5)  # let the ranks that wrote theirs leave on their own
                break
            time.sleep(0.1)
    finally:
        processes.stop([proc], grace=10)
        log.seek(0)
        output = log.read()
        log.close()
    assert_none_left(tag)
    assert not glob.glob(f"{DIRECTORY}/{PREFIX}{job}-*"), "shared memory left in /dev/shm"
    results = {int(p.stem.removeprefix("rank")): p for p in out.glob("rank*.json")}
    return Run(proc.returncode, output, results)
