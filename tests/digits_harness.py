"""The digits example as the tests run it: its path, the single process's run to compare
with, the last epoch's figures, and a port with the one above it held (to show that a
run needs no MASTER_PORT + 1)."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from ringlib.transport.addresses import free_tcp_ports

DIGITS = str(Path(__file__).parents[1] / "examples" / "train_digits.py")


def alone(epochs: int) -> subprocess.CompletedProcess:
    """The example in one process, for `epochs`: what a ring of several must match."""
    done = subprocess.run([sys.executable, DIGITS, "--epochs", str(epochs)],
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(1 peer)" in done.stdout
    return done


def last_epoch(output: str) -> tuple[float, float]:
    """(loss, test accuracy in %) printed for the last epoch."""
    line = [text for text in output.splitlines() if "epoch" in text][-1]
    match = re.search(r"loss ([\d.]+), test accuracy ([\d.]+)%", line)
    return float(match[1]), float(match[2])


def assert_follows_one_process(output: str, epochs: int) -> None:
    """The run printed in `output` reached the single process's accuracy, on its path."""
    (loss, accuracy), (alone_loss, alone_accuracy) = last_epoch(output), \
        last_epoch(alone(epochs).stdout)
    assert accuracy == alone_accuracy > 85
    assert abs(loss - alone_loss) <= 2e-4  # the same path, up to float rounding


@contextlib.contextmanager
def held_above_a_free_port() -> Iterator[int]:
    """A free port P, with P + 1 bound and listening here meanwhile."""
    for _ in range(100):
        port = free_tcp_ports(1)[0]
        with socket.socket() as taken:
            try:
                taken.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            taken.listen()
            yield port
            return
    raise AssertionError("no free port with a free one above it in 100 tries")
