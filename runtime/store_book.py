"""An AddressBook over a torch.distributed store: how a process group's ranks find each
other with no port of ringlib's own.

c10d hands every backend a store already prefixed with its group's name. Each rank bumps
a counter there, which says which ring of this group it is forming (a group re-created
after destroy_process_group forms a new one, and c10d names groups by a count that
starts again then, so a later group of another size may share the name: the counter
goes by size too), publishes its address under that ring's key, and waits for
everybody else's. A rank that gives up (a timeout, a Ctrl-C) takes its count and its
address back, so that the group's next try finds the ranks in step again.

ringlib.init() trades through a store torch already has (for_torch), under a prefix of
its own, instead of listening at MASTER_PORT + 1: the default process group's where one
is up, or the one torchrun's agent runs at MASTER_ADDR:MASTER_PORT.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from typing import Any, Mapping

from ringlib.errors import RendezvousError, RendezvousTimeout
from ringlib.transport import addresses

from .environment import CHOSEN_MEETING

POLL_S = 0.5  # how long one wait in the store lasts, between looks at abandon()


def for_torch(env: Mapping[str, str], timeout: float) -> StoreBook | None:
    """A StoreBook over a store torch already has, where may_apply(env): the default
    process group's where one is up in this process (Ray Train's workers, a script that
    called init_process_group first), else torchrun's agent store; else None."""
    if not may_apply(env):
        return None
    if _group_up():
        dist = sys.modules["torch.distributed"]
        store = dist.distributed_c10d._get_default_store()  # private, but what c10d uses
        return StoreBook(dist.PrefixStore("ringlib-init/", store), dist.get_rank(),
                         dist.get_world_size())
    return _agent_book(env, timeout)


def may_apply(env: Mapping[str, str]) -> bool:
    """Whether for_torch() finds a book, told without connecting anywhere: no way of
    meeting was chosen (CHOSEN_MEETING), and a torch group is up, or torchrun keeps its
    agent's store for its workers (TORCHELASTIC_USE_AGENT_STORE)."""
    if any(k in env for k in CHOSEN_MEETING):
        return False
    return _group_up() or (env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                           and env.get("WORLD_SIZE", "1") not in ("0", "1"))


def _group_up() -> bool:
    """Whether this process has a torch.distributed default group of several ranks (torch
    loaded already, or there is none)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized() and \
        dist.get_world_size() > 1


def _agent_book(env: Mapping[str, str], timeout: float) -> StoreBook:
    """A StoreBook over torchrun's agent store. Its keys go under the run and the restart
    count: the agent keeps one store across restarts, and what a killed try left there
    (its count, its address) must not reach the next."""
    import torch.distributed as dist

    rank, where = env.get("RANK", "?"), f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
    try:
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))
        prefix = (f"ringlib-init/{env.get('TORCHELASTIC_RUN_ID', '')}/"
                  f"{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
        return StoreBook(dist.PrefixStore(prefix, store), int(env["RANK"]),
                         int(env["WORLD_SIZE"]))
    except (KeyError, ValueError, RuntimeError) as exc:  # c10d's errors are RuntimeErrors
        raise RendezvousError(f"rank {rank} could not use torchrun's store at {where}: "
                              f"{exc!r}") from None


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
