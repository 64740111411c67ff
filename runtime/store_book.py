"""An AddressBook over a torch.distributed store: how a process group's ranks find each
other with no port of ringlib's own.

c10d hands every backend a store already prefixed with its group's name. Each rank bumps
a counter there, which says which ring of this group it is forming (a group re-created
after destroy_process_group forms a new one, and c10d names groups by a count that
starts again then, so a later group of another size may share the name: the counter
goes by size too), publishes its address under that ring's key, and waits for
everybody else's. A rank that gives up (a timeout, a Ctrl-C) takes its count and its
address back, so that the group's next try finds the ranks in step again.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from typing import Any

from ringlib.errors import RendezvousError, RendezvousTimeout
from ringlib.transport import addresses

POLL_S = 0.5  # how long one wait in the store lasts, between looks at abandon()

class StoreBook:
    """Trades the addresses of `size` ranks through `store` (a c10d Store)."""

    def __init__(self, store: Any, rank: int, size: int) -> None:
        self.store, self.rank, self.size = store, rank, size
        self.host = os.environ.get("RINGLIB_HOST") or _host_towards(store)
        self._abandoned = threading.Event()

    def trade(self, address: str, timeout: float) -> list[str]:
        counter = f"ringlib/rings-of-{self.size}"
        ring = (self.store.add(counter, 1) - 1) // self.size
        keys = [f"ringlib/{self.size}/{ring}/{rank}" for rank in range(self.size)]
        self.store.set(keys[self.rank], address)
        try:
            self._wait(keys, address, timeout)
        except BaseException:
            self.store.delete_key(keys[self.rank])
            self.store.add(counter, -1)
            raise
        return [addresses.check(self.store.get(key).decode()) for key in keys]

    def abandon(self) -> None:
        """Make a trade() waiting in another thread give up within POLL_S."""
        self._abandoned.set()

    def _wait(self, keys: list[str], address: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.store.check(keys):
            left = deadline - time.monotonic()
            if self._abandoned.is_set():
                raise RendezvousError(f"rank {self.rank} ({address}) gave up forming its group")
            if left <= 0:
                missing = [r for r, key in enumerate(keys) if not self.store.check([key])]
                raise RendezvousTimeout(
                    f"rank {self.rank} ({address}) waited {timeout:g} s in the "
                    f"torch.distributed store for the addresses of ranks {missing} of its "
                    "group; did they call init_process_group / new_group?")
            try:  # (a timeout that rounds to 0 would be c10d's "no timeout")
                self.store.wait(keys, datetime.timedelta(seconds=max(0.01, min(POLL_S, left))))
            except Exception:  # c10d's timeout: DistStoreError or RuntimeError, by store
                pass


def _host_towards(store: Any) -> str:
    """This host's address on the interface that routes to the store's server (so to the
    other hosts); loopback for a store without one (FileStore, HashStore)."""
    while hasattr(store, "underlying_store"):  # a PrefixStore
        store = store.underlying_store
    host = getattr(store, "host", None)
    return addresses.route_to(host) if host else "127.0.0.1"
