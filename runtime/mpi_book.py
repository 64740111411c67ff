"""An AddressBook over MPI itself, for ranks that mpirun started and that can load mpi4py:
the addresses travel by MPI_Allgather, so ranks on several hosts need no MASTER_ADDR and
no port derived from the job id.

Each rank binds the interface that routes towards the other hosts of the job (the first
rank's on another host, by MPI's processor names), loopback where all share one host, or
RINGLIB_HOST's where set. The gathers are non-blocking requests polled until a deadline,
so a rank that never joins makes the others raise RendezvousTimeout instead of waiting
for ever.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Mapping

import numpy as np

from ringlib.errors import RendezvousError, RendezvousTimeout
from ringlib.transport import addresses

from .environment import CHOSEN_MEETING

WORD_BYTES = 256  # room for one address or host name in a gather
POLL_S = 0.001
# Gathers given up on, with their buffers: MPI cannot cancel a collective, and a late rank
# still writes into them, so they live as long as the process.
_LEFT_ACTIVE: list[Any] = []


def may_apply(env: Mapping[str, str]) -> bool:
    """Whether for_mpirun() may find a book, told from `env` alone: Open MPI's mpirun
    started this process (its PMIx server is there to join) with more than one rank, and
    no way of meeting was chosen (CHOSEN_MEETING, MASTER_ADDR)."""
    return _under_mpirun(env) and not any(k in env for k in (*CHOSEN_MEETING, "MASTER_ADDR"))


def for_mpirun(env: Mapping[str, str], timeout: float) -> MpiBook | None:
    """An MpiBook where may_apply(env) and mpi4py loads; else None. It starts MPI and
    gathers the hosts' names: it blocks until every rank is there."""
    if not may_apply(env):
        return None
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError):  # no mpi4py, or no MPI library for it to load
        return None
    if MPI.COMM_WORLD.Get_size() != int(env["OMPI_COMM_WORLD_SIZE"]):
        return None  # not the world mpirun described
    return MpiBook(MPI.COMM_WORLD, timeout, env)


def _under_mpirun(env: Mapping[str, str]) -> bool:
    """Whether mpirun started this process as one of several ranks: a process that only
    carries its variables (copied, or set by hand) has no PMIx server to join."""
    try:
        size = int(env.get("OMPI_COMM_WORLD_SIZE", "1"))
    except ValueError:
        return False  # placement() names the bad variable
    return size > 1 and any(k.startswith("PMIX_SERVER_URI") for k in env)


class MpiBook:
    """Trades the ranks' addresses through the MPI communicator `comm`; learns the hosts
    first, to pick the interface to bind."""

    def __init__(self, comm: Any, timeout: float, env: Mapping[str, str] = os.environ) -> None:
        from mpi4py import MPI

        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        self._abandoned = threading.Event()
        self.names = self._gather(MPI.Get_processor_name(), "host names")
        self.host = env.get("RINGLIB_HOST") or self._towards_others()

    def trade(self, address: str, timeout: float) -> list[str]:
        """Every rank's address, in rank order (AddressBook.trade), within the deadline
        set at construction: both gathers share one start-up timeout."""
        return [addresses.check(a) for a in self._gather(address, "addresses")]

    def abandon(self) -> None:
        """Make a trade() polling in another thread give up within POLL_S."""
        self._abandoned.set()

    def _towards_others(self) -> str:
        mine = self.names[self.rank]
        other = next((name for name in self.names if name != mine), None)
        if other is None:
            return "127.0.0.1"
        try:
            return addresses.route_to(other)
        except RendezvousError as exc:
            raise RendezvousError(f"rank {self.rank} on {mine}: {exc}; set RINGLIB_IFNAME "
                                  "or RINGLIB_HOST to the interface the hosts share") from None

    def _gather(self, word: str, what: str) -> list[str]:
        """`word` from every rank, by an Iallgather of fixed-size byte rows."""
        data = word.encode()
        if len(data) >= WORD_BYTES:
            raise RendezvousError(f"rank {self.rank}: {word!r} is too long to share through MPI")
        send = np.zeros(WORD_BYTES, np.uint8)
        send[:len(data)] = np.frombuffer(data, np.uint8)
        got = np.zeros((self.size, WORD_BYTES), np.uint8)
        request = self.comm.Iallgather(send, got)
        while not request.Test():
            if self._abandoned.is_set() or time.monotonic() > self._deadline:
                _LEFT_ACTIVE.append((request, send, got))
                if self._abandoned.is_set():
                    raise RendezvousError(f"rank {self.rank} gave up forming its ring")
                raise RendezvousTimeout(
                    f"rank {self.rank} waited {self._timeout:g} s for the {what} of every "
                    "rank through MPI: did every rank of the mpirun job call ringlib.init()?")
            time.sleep(POLL_S)
        return [bytes(row).rstrip(b"\0").decode() for row in got]
