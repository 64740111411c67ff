"""The Ring: a connected peer's collectives as coroutines, and connect() that makes one."""

from __future__ import annotations

import asyncio
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generator, TypeVar

import numpy as np

from ringlib import collectives
from ringlib.collectives import Channel, step_reducers
from ringlib.collectives.ring_schedule import neighbours
from ringlib.dtypes import BY_NAME, DType
from ringlib.errors import CollectiveTimeout, InvalidArgument, RingClosed
from ringlib.ops import Op
from ringlib.transport import DIRECT_BYTES, Endpoint

from .buffers import empty_like, like, storage
from .environment import Placement, placement
from .rendezvous import bind_and_exchange, greet_neighbours

T = TypeVar("T")

CONNECT_TIMEOUT = 60.0       # seconds to wait for the neighbours at start-up
COLLECTIVE_TIMEOUT = 300.0   # default deadline of one collective
SEGMENT_BYTES = 4 << 20      # the largest message a ring step sends; pieces pipeline
SPIN_US = 200                # how long small collectives poll for a message before yielding


class Ring:
    """A rank's membership of a ring. Every rank must issue the same collectives in the same
    order; several may be in flight at once (asyncio.gather), and their messages never mix.

    Buffers are C-contiguous numpy arrays or CPU torch tensors of a dtype the compiled core
    supports; ops are "sum", "mean", "min", "max", "prod" or an Op. Every collective takes
    `timeout` (seconds), defaulting to the ring's `collective_timeout`.
    """

    def __init__(self, where: Placement, endpoint: Endpoint | None, peers: list[str],
                 executor: ThreadPoolExecutor, settings: Settings) -> None:
        self.rank = where.rank
        self.world_size = where.world_size
        self.local_rank = where.local_rank
        self.peers = peers
        self.collective_timeout = settings.collective_timeout
        self.segment_bytes = settings.segment_bytes
        self.small_bytes = settings.small_bytes
        self.spin_us = settings.spin_us
        self._endpoint = endpoint
        self._executor = executor
        self._seq = itertools.count(1)
        self._streams = itertools.count()
        self._closed = False

    def __repr__(self) -> str:
        return f"<Ring rank {self.rank} of {self.world_size} at {self.address}>"

    def new_stream(self) -> int:
        """A number for a new stream between neighbours (a pipeline); ranks that open their
        streams in the same order agree on the numbers, as they do on collectives'."""
        return next(self._streams)

    @property
    def endpoint(self) -> Endpoint | None:
        """This rank's transport endpoint (None in a ring of one), for runtime features that
        stream to the neighbours outside the collectives, such as pipeline stages."""
        return self._endpoint

    @property
    def direct_bytes(self) -> int:
        """Messages up to this size go over direct links where they are up (see connect)."""
        return self._endpoint.direct_bytes if self._endpoint else 0

    @direct_bytes.setter
    def direct_bytes(self, value: int) -> None:
        if self._endpoint:
            self._endpoint.direct_bytes = value

    @property
    def address(self) -> str | None:
        """The address this rank receives at (None in a ring of one)."""
        return self._endpoint.address if self._endpoint else None

    async def all_reduce(self, x: T, op: Op | str = Op.SUM, *, timeout: float | None = None) -> T:
        """Reduce x element-wise across all ranks, in place; return x."""
        op = Op.parse(op)
        buf, dtype = storage(x, "x", writable=True)
        step_reducers(dtype, op, self.world_size)  # an integer mean fails here, before sending
        if self._needs_peers(buf.size):
            await self._run("all_reduce", dtype, timeout, collectives.all_reduce,
                            buf, dtype, op, self.small_bytes,
                            small=buf.nbytes <= self.small_bytes)
        return x

    async def reduce_scatter(self, x: Any, op: Op | str = Op.SUM, *,
                             timeout: float | None = None) -> Any:
        """This rank's chunk of the reduction of flattened x (chunk sizes differ by at most
        one element; see ringlib.chunk_bounds). x itself is left unchanged."""
        op = Op.parse(op)
        src, dtype = storage(x, "x", writable=False)
        step_reducers(dtype, op, self.world_size)
        work = src.copy()
        start, stop = 0, work.size
        if self._needs_peers(work.size):
            start, stop = await self._run("reduce_scatter", dtype, timeout,
                                          collectives.reduce_scatter, work, dtype, op)
        return like(x, work[start:stop])

    async def all_gather(self, x: Any, *, timeout: float | None = None) -> Any:
        """A new array or tensor of shape (world_size, *x.shape): row i is rank i's x."""
        src, dtype = storage(x, "x", writable=False)
        out, out_buf = empty_like(x, (self.world_size, *x.shape))
        out_buf[self.rank * src.size:(self.rank + 1) * src.size] = src
        if self._needs_peers(src.size):
            await self._run("all_gather", dtype, timeout, collectives.all_gather, out_buf)
        return out

    async def broadcast(self, x: T, root: int = 0, *, timeout: float | None = None) -> T:
        """Overwrite x on every rank with root's x, in place; return x."""
        if not 0 <= root < self.world_size:
            raise InvalidArgument(f"broadcast root {root} is not a rank of this ring "
                                  f"(world size {self.world_size})")
        buf, dtype = storage(x, "x", writable=self.rank != root)
        if self._needs_peers(buf.size):
            await self._run("broadcast", dtype, timeout, collectives.broadcast,
                            buf, root, self.small_bytes, small=buf.nbytes <= self.small_bytes)
        return x

    async def barrier(self, *, timeout: float | None = None) -> None:
        """Return once every rank has entered the barrier."""
        if self._needs_peers(1):
            await self._run("barrier", BY_NAME["uint8"], timeout, collectives.barrier,
                            small=True)

    def _needs_peers(self, size: int) -> bool:
        """Whether a collective over `size` elements must talk to other ranks. Ranks agree
        on it without talking, since they pass the same sizes."""
        if self._closed:
            raise RingClosed(f"rank {self.rank}: the ring is closed")
        return self.world_size > 1 and size > 0

    async def _run(self, name: str, dtype: DType, timeout: float | None,
                   algorithm: Callable[..., Awaitable[T]], *args: Any, small: bool = False) -> T:
        """Run one collective under its deadline; `small` ones (latency-bound) poll for
        their messages for up to spin_us before yielding to the event loop."""
        # The sequence number is taken before the first await, so concurrent collectives
        # are numbered in the order they were called, the same on every rank.
        ch = Channel(self._endpoint, self.world_size, next(self._seq), name, dtype.name,
                     dtype.storage, self._executor, max(1, self.segment_bytes // dtype.itemsize),
                     spin=self.spin_us * 1e-6 if small else 0.0)
        limit = self.collective_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await algorithm(ch, *args)
        except TimeoutError:
            self._endpoint.inbox.abandon(ch.seq)
            raise self._timed_out(ch, limit) from None
        except BaseException:
            self._endpoint.inbox.abandon(ch.seq)  # its late messages must not pile up
            raise

    def _timed_out(self, ch: Channel, limit: float) -> CollectiveTimeout:
        where = f"{ch.name} #{ch.seq} on rank {self.rank} ({self.address})"
        if ch.waiting_for is None:
            return CollectiveTimeout(f"{where} timed out after {limit:g} s sending to its peers")
        peer, step = ch.waiting_for
        return CollectiveTimeout(f"{where} timed out after {limit:g} s waiting for rank {peer} "
                                 f"({self.peers[peer]}) at step {step}")

    async def close(self) -> None:
        """Leave the ring: close the sockets (queued messages are still delivered) and the
        worker thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._endpoint is not None:
            await self._endpoint.close()
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> Ring:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class Connecting:
    """What connect() returns: await it for a Ring, or use it as `async with`."""

    def __init__(self, opening: Callable[[], Awaitable[Ring]]) -> None:
        self._opening = opening
        self._ring: Ring | None = None

    def __await__(self) -> Generator[Any, None, Ring]:
        return self._opening().__await__()

    async def __aenter__(self) -> Ring:
        self._ring = await self._opening()
        return self._ring

    async def __aexit__(self, *exc_info: object) -> None:
        await self._ring.close()


@dataclass(frozen=True)
class Settings:
    """A ring's tunables; see connect()."""

    collective_timeout: float = COLLECTIVE_TIMEOUT
    segment_bytes: int = field(default_factory=lambda: _env_number("RINGLIB_SEGMENT_BYTES",
                                                                SEGMENT_BYTES))
    small_bytes: int = field(default_factory=lambda: _env_number("RINGLIB_SMALL_BYTES",
                                                              collectives.SMALL_BYTES))
    spin_us: int = field(default_factory=lambda: _env_number("RINGLIB_SPIN_US", SPIN_US))
    direct_bytes: int = field(default_factory=lambda: _env_number("RINGLIB_DIRECT_BYTES",
                                                               DIRECT_BYTES))


def _env_number(name: str, default: float) -> float:
    try:
        return type(default)(os.environ.get(name, default))
    except ValueError:
        raise InvalidArgument(f"{name}={os.environ[name]!r} is not an integer") from None


def connect(rank: int | None = None, world_size: int | None = None,
            peers: list[str] | None = None, *, timeout: float | None = None,
            **settings: Any) -> Connecting:
    """Join the ring: `ring = await connect(...)` or `async with connect(...) as ring`.

    rank, world_size, peers: this process's rank, the number of ranks, and every rank's
        address (tcp://host:port, ipc:///path, inproc://name); whatever is not given comes
        from the environment (RINGLIB_*, torchrun, mpirun or srun variables; see
        ringlib.runtime.environment). With none at all the process is a ring of one.
    timeout: seconds to wait for the peers at start-up before RendezvousTimeout, which
        names the ranks and addresses that were not reached (default
        RINGLIB_CONNECT_TIMEOUT, which `ringlib launch --timeout` sets, or 60).
    collective_timeout: the default deadline of each collective (CollectiveTimeout).
    segment_bytes: the largest message of a ring step; larger chunks travel in pieces that
        pipeline (default RINGLIB_SEGMENT_BYTES or 4 MiB).
    small_bytes: buffers up to this size take the latency-optimal algorithms (default
        RINGLIB_SMALL_BYTES or collectives.SMALL_BYTES).
    spin_us: how long a small collective polls its socket for each message before it
        yields to the event loop; 0 never polls (default RINGLIB_SPIN_US or 200). Polling
        spares the event loop's wake-ups and burns a core meanwhile.
    """
    where = placement(rank, world_size, peers)
    if timeout is None:
        timeout = float(_env_number("RINGLIB_CONNECT_TIMEOUT", CONNECT_TIMEOUT))
    tunables = Settings(**settings)
    return Connecting(lambda: _open(where, timeout, tunables))


async def _open(where: Placement, timeout: float, settings: Settings) -> Ring:
    executor = ThreadPoolExecutor(1, thread_name_prefix=f"ringlib-rank{where.rank}")
    warm = asyncio.get_running_loop().run_in_executor(executor, _warm_kernels)
    if where.world_size == 1:
        await warm
        return Ring(where, None, [], executor, settings)
    endpoint = Endpoint(where.rank)
    try:
        peers = await bind_and_exchange(endpoint, where, timeout)
        endpoint.set_peers(peers)
        await greet_neighbours(endpoint, *neighbours(where.rank, where.world_size), timeout)
        endpoint.direct_bytes = settings.direct_bytes
        await endpoint.offer_links(r for r in range(where.world_size) if r != where.rank)
        await warm
    except BaseException:
        await endpoint.close()
        executor.shutdown(wait=False)
        raise
    return Ring(where, endpoint, peers, executor, settings)


def _warm_kernels() -> None:
    """Load the float32 kernels while the peers gather: the first call pays Numba's set-up."""
    partial, final = step_reducers(BY_NAME["float32"], Op.MEAN, 2)
    buf = np.zeros(2, np.float32)
    partial(buf, buf)
    final(buf, buf)
