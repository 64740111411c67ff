"""An AddressBook over a dask.distributed scheduler: how the ranks of ringlib.dask.run find
each other with no port of ringlib's own.

Each rank publishes its address in a Dask Variable named for its run and rank, then reads
every other rank's; the client deletes the run's variables once the run is over, and
publishes GONE for a rank whose worker died, so that nobody waits for its address. The
variables live in the scheduler the workers already talk to, so nothing else listens.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from distributed import Variable

from ringlib.errors import RendezvousError, RendezvousTimeout
from ringlib.transport import addresses

GONE = "gone:"  # what the client publishes for a rank whose worker died, before its address
POLL_S = 0.5  # how long one wait in the scheduler lasts, between looks at abandon()


def variable_name(run: str, rank: int) -> str:
    """The Variable that holds rank `rank`'s address in run `run`."""
    return f"ringlib/{run}/{rank}"


class DaskBook:
    """Trades the addresses of `size` ranks of run `run` through the scheduler of `client`
    (the worker's own client, taken on the task's thread: trade() runs on another)."""

    def __init__(self, client: Any, run: str, rank: int, size: int, host: str) -> None:
        self.client, self.run, self.rank, self.size, self.host = client, run, rank, size, host
        self._abandoned = threading.Event()

    def trade(self, address: str, timeout: float) -> list[str]:
        """Every rank's address, in rank order (AddressBook.trade)."""
        Variable(variable_name(self.run, self.rank), client=self.client).set(address)
        deadline = time.monotonic() + timeout
        return [self._address_of(rank, address, timeout, deadline) for rank in range(self.size)]

    def abandon(self) -> None:
        """Make a trade() waiting in another thread give up within POLL_S."""
        self._abandoned.set()

    def _address_of(self, rank: int, address: str, timeout: float, deadline: float) -> str:
        """Rank `rank`'s address once it is published; waits in slices of POLL_S, between
        looks at abandon() and the deadline."""
        variable = Variable(variable_name(self.run, rank), client=self.client)
        while True:
            if self._abandoned.is_set():
                raise RendezvousError(f"rank {self.rank} ({address}) gave up forming its ring")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RendezvousTimeout(
                    f"rank {self.rank} ({address}) waited {timeout:g} s in the Dask scheduler "
                    f"for rank {rank}'s address: was its worker busy with other tasks, or "
                    "gone?")
            try:
                got = variable.get(timeout=max(0.001, min(POLL_S, left)))  # (0: for ever)
                break
            except TimeoutError:
                continue
        if got.startswith(GONE):
            raise RendezvousError(f"rank {self.rank} ({address}): rank {rank}'s Dask worker "
                                  f"{got[len(GONE):]} died before it joined")
        return addresses.check(got)
