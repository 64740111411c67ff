"""An AddressBook over a torch.distributed store: how a process group's ranks find each
other with no port of ringlib's own.

c10d hands every backend a store already prefixed with its group's name. Each rank bumps
a counter there, which says which ring of this group it is forming (a group re-created
after destroy_process_group forms a new one, and c10d names groups by a count that
starts again then, so a later group of another size may share the name: the counter
goes by size too), publishes its address under that ring's key, and waits for
everybody else's.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from ringlib.errors import RendezvousTimeout
from ringlib.transport import addresses



class StoreBook:
    """Trades the addresses of `size` ranks through `store` (a c10d Store)."""

    def __init__(self, store: Any, rank: int, size: int) -> None:
        self.store, self.rank, self.size = store, rank, size
        self.host = os.environ.get("RINGLIB_HOST") or _host_towards(store)

    def trade(self, address: str, timeout: float) -> list[str]:
        ring = (self.store.add(f"ringlib/rings-of-{self.size}", 1) - 1) // self.size
        keys = [f"ringlib/{self.size}/{ring}/{rank}" for rank in range(self.size)]
        self.store.set(keys[self.rank], address)
        try:
            self.store.wait(keys, datetime.timedelta(seconds=timeout))
        except Exception:  # c10d raises DistStoreError or RuntimeError, depending on store
            missing = [rank for rank, key in enumerate(keys) if not self.store.check([key])]
            raise RendezvousTimeout(
                f"rank {self.rank} ({address}) waited {timeout:g} s in the torch.distributed "
                f"store for the addresses of ranks {missing} of its group; did they call "
                "init_process_group / new_group?") from None
        return [addresses.check(self.store.get(key).decode()) for key in keys]


def _host_towards(store: Any) -> str:
    """This host's address on the interface that routes to the store's server (so to the
    other hosts); loopback for a store without one (FileStore, HashStore)."""
    while hasattr(store, "underlying_store"):  # a PrefixStore
        store = store.underlying_store
    host = getattr(store, "host", None)
    return addresses.route_to(host) if host else "127.0.0.1"
