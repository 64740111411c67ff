"""The Ring: a connected peer's collectives as coroutines, and connect() that makes one."""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Generator, TypeVar

import numpy as np

from ringlib import collectives
from ringlib.collectives import Channel, signature, step_reducers
from ringlib.collectives.ring_schedule import neighbours
from ringlib.dtypes import BY_NAME, DType
from ringlib.errors import CollectiveTimeout, InvalidArgument, RingClosed
from ringlib.ops import Op
from ringlib.transport import Endpoint
from ringlib.transport import addresses
from ringlib.transport.security import Keys

from .buffers import empty_like, like, storage
from .environment import Placement, placement
from .reform import agree
from .rendezvous import bind_and_exchange, greet_neighbours
from .settings import SIDE_SHM_BYTES, WITHDRAW_S, Settings, connect_timeout

T = TypeVar("T")



class Ring:
    """A rank's membership of a ring. Every rank must issue the same collectives in the same
    order; several may be in flight at once (asyncio.gather), and their messages never mix.

    Buffers are C-contiguous numpy arrays or CPU torch tensors of a dtype the compiled core
    supports; ops are "sum", "mean", "min", "max", "prod" or an Op. Every collective takes
    `timeout` (seconds), defaulting to the ring's `collective_timeout`.

    Ranks that pass different shapes, dtypes, ops or roots all raise MismatchError (but a
    rank whose buffer alone is empty skips the collective, and the others time out naming
    it). When a rank dies or is cut off, every pending and later collective raises
    PeerLost within about `peer_timeout` seconds, until reform() rebuilds a ring of the
    survivors.
    """

    def __init__(self, where: Placement, endpoint: Endpoint | None, peers: list[str],
                 executor: ThreadPoolExecutor, settings: Settings) -> None:
        self.rank = where.rank
        self.world_size = where.world_size
        self.local_rank = where.local_rank
        self.peers = peers
        self.generation = 0  # how many times this ring was re-formed
        self._settings = settings
        self.collective_timeout = settings.collective_timeout
        self.segment_bytes = settings.segment_bytes
        self.small_bytes = settings.small_bytes
        self.spin_us = settings.spin_us
        self._endpoint = endpoint
        self._executor = executor
        self._seq = itertools.count(1)
        self._running: set[int] = set()  # seq numbers of the collectives in flight
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
            algorithm = self.all_reduce_algorithm(buf.nbytes)
            sig = signature("all_reduce", dtype.name, tuple(x.shape), op.value,
                            algorithm="pairwise" if algorithm == "pairwise" else "")
            await self._run(sig, dtype, timeout, collectives.all_reduce, buf, dtype, op,
                            algorithm, small=algorithm == "doubling")
        return x

    def all_reduce_algorithm(self, nbytes: int) -> str:
        """The algorithm all_reduce takes for `nbytes`: "doubling", "pairwise" (2 ranks
        that reach each other's memory) or "ring"."""
        reaches = self.world_size == 2 and self._endpoint.shared.reach(1 - self.rank)
        return collectives.all_reduce_algorithm(nbytes, self.world_size, self.small_bytes,
                                                reaches)

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
            sig = signature("reduce_scatter", dtype.name, tuple(x.shape), op.value)
            start, stop = await self._run(sig, dtype, timeout,
                                          collectives.reduce_scatter, work, dtype, op)
        return like(x, work[start:stop])

    async def all_gather(self, x: Any, *, timeout: float | None = None) -> Any:
        """A new array or tensor of shape (world_size, *x.shape): row i is rank i's x."""
        src, dtype = storage(x, "x", writable=False)
        out, out_buf = empty_like(x, (self.world_size, *x.shape))
        out_buf[self.rank * src.size:(self.rank + 1) * src.size] = src
        if self._needs_peers(src.size):
            sig = signature("all_gather", dtype.name, tuple(x.shape))
            await self._run(sig, dtype, timeout, collectives.all_gather, out_buf)
        return out

    async def broadcast(self, x: T, root: int = 0, *, timeout: float | None = None) -> T:
        """Overwrite x on every rank with root's x, in place; return x."""
        if not 0 <= root < self.world_size:
            raise InvalidArgument(f"broadcast root {root} is not a rank of this ring "
                                  f"(world size {self.world_size})")
        buf, dtype = storage(x, "x", writable=self.rank != root)
        if self._needs_peers(buf.size):
            sig = signature("broadcast", dtype.name, tuple(x.shape), root=root)
            await self._run(sig, dtype, timeout, collectives.broadcast,
                            buf, root, self.small_bytes, small=buf.nbytes <= self.small_bytes)
        return x

    async def barrier(self, *, timeout: float | None = None) -> None:
        """Return once every rank has entered the barrier."""
        if self._needs_peers(1):
            await self._run("barrier", BY_NAME["uint8"], timeout, collectives.barrier,
                            small=True)

    def _needs_peers(self, size: int) -> bool:
        """Whether a collective over `size` elements must talk to other ranks. Ranks agree
        on it without talking, since they pass the same sizes; an empty one still takes
        its sequence number, so that a rank whose buffer alone is empty (the others then
        time out naming it) keeps its later collectives in step."""
        if self._closed:
            raise RingClosed(f"rank {self.rank}: the ring is closed")
        if self.world_size > 1 and size == 0:  # what others send for it is dropped
            self._endpoint.inbox.abandon(next(self._seq))
        return self.world_size > 1 and size > 0

    async def _run(self, sig: str, dtype: DType, timeout: float | None,
                   algorithm: Callable[..., Awaitable[T]], *args: Any, small: bool = False) -> T:
        """Run the collective `sig` (a signature()) under its deadline; `small` ones
        (latency-bound) poll for their messages for up to spin_us before yielding."""
        # The sequence number is taken before the first await, so concurrent collectives
        # are numbered in the order they were called, the same on every rank.
        limit = self.collective_timeout if timeout is None else timeout
        ch = Channel(self._endpoint, self.world_size, next(self._seq), sig.split()[0], sig,
                     dtype.storage, self._executor, max(1, self.segment_bytes // dtype.itemsize),
                     asyncio.get_running_loop().time() + limit,
                     spin=self.spin_us * 1e-6 if small else 0.0)
        ch.expect()
        self._running.add(ch.seq)
        try:
            result = await algorithm(ch, *args)
            # Every collective waits here until what it sent from the caller's buffers has
            # left (ZeroMQ) or been read (by address), so the caller may change them.
            await ch.drain()
        except BaseException as exc:
            ch.endpoint.inbox.abandon(ch.seq)  # its late messages must not pile up
            ch.endpoint.mismatches.pop(ch.seq, None)
            await ch.withdraw(WITHDRAW_S)
            if isinstance(exc, TimeoutError):
                raise self._timed_out(ch, limit) from None
            raise
        finally:
            ch.finish()
            self._running.discard(ch.seq)
        self._raise_late_mismatch(ch.endpoint, ch.seq)
        return result

    def _raise_late_mismatch(self, endpoint: Endpoint, seq: int) -> None:
        """Raise MismatchError for a collective up to `seq` that this rank finished while
        another rank found it called differently. Only a sender finishes so (a broadcast's
        root): it learns on the collective it is in when the news comes, or on the next,
        which all ranks still complete, so that none falls out of step."""
        notices = endpoint.mismatches
        if not notices:
            return
        for late in sorted(s for s in notices if s <= seq and s not in self._running):
            exc = notices.pop(late)
            if late < seq:
                exc.args = (f"{exc} (after this rank had finished it; #{seq} completed)",)
            raise exc

    def _timed_out(self, ch: Channel, limit: float) -> CollectiveTimeout:
        where = f"{ch.name} #{ch.seq} on rank {self.rank} ({self.address})"
        if ch.waiting_for is None:
            return CollectiveTimeout(f"{where} timed out after {limit:g} s sending to its peers")
        peer, step = ch.waiting_for
        return CollectiveTimeout(f"{where} timed out after {limit:g} s waiting for rank {peer} "
                                 f"({self.peers[peer]}) at step {step}")

    async def reform(self, *, timeout: float | None = None) -> None:
        """After PeerLost: build a new ring of the ranks still alive and carry on in it.

        Every survivor must call it. They agree on who is left, take new ranks 0..M-1 in
        the order of their old ones (rank, world_size and peers change) and new addresses,
        and meet as connect() does. Survivors may have finished different numbers of
        collectives when the loss struck: broadcast the state to carry on from (say from
        the new rank 0) before training on. `timeout` bounds the wait for the others
        (default: connect()'s start-up timeout).
        """
        if self._closed:
            raise RingClosed(f"rank {self.rank}: the ring is closed")
        if self._endpoint is None:
            return
        old, limit = self._endpoint, connect_timeout() if timeout is None else timeout
        new = Endpoint(self.rank, old.keys)
        try:
            new.bind(addresses.fresh(old.address, self.generation + 1))
            members, peers = await agree(old, self.generation + 1, new.address,
                                         self.world_size, limit)
            new.rank = members.index(self.rank)
            if len(members) > 1:
                await _join(new, peers, self._settings, limit)
        except BaseException:
            await new.close()
            raise
        await old.close()
        if len(members) == 1:
            await new.close()
        self.rank, self.world_size, self.peers = new.rank, len(members), peers
        self._endpoint = new if len(members) > 1 else None
        self._seq = itertools.count(1)
        self.generation += 1

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
    direct_bytes: messages up to this size travel over direct socket links beside ZeroMQ
        where both peers can open one; 0 never (default RINGLIB_DIRECT_BYTES or 256 KiB).
    heartbeat_s, peer_timeout: each rank sends its ring neighbours a heartbeat every
        heartbeat_s seconds, and a neighbour silent for peer_timeout seconds is lost:
        collectives raise PeerLost (defaults RINGLIB_HEARTBEAT_S or 0.5 and
        RINGLIB_PEER_TIMEOUT or 5; a peer_timeout of 0 never declares a peer lost).
    curve_key: path of the ring's secret key file (`ringlib keygen`); every link is then
        authenticated and encrypted with CurveZMQ, and a process without the key can
        neither join nor send (default RINGLIB_CURVE_KEY; none: plain links).
    shm_bytes: ranks on one host pass collective payloads through shared memory (/dev/shm)
        instead of sockets; this is the ring each rank writes for its right neighbour
        (1 MiB for other ranks), and a message that does not fit takes a socket. 0 turns
        shared memory off (default RINGLIB_SHM_BYTES or 32 MiB).
    """
    where = placement(rank, world_size, peers)
    if timeout is None:
        timeout = connect_timeout()
    tunables = Settings(**settings)
    return Connecting(lambda: _open(where, timeout, tunables))


async def _open(where: Placement, timeout: float, settings: Settings) -> Ring:
    executor = ThreadPoolExecutor(1, thread_name_prefix=f"ringlib-rank{where.rank}")
    warm = asyncio.get_running_loop().run_in_executor(executor, _warm_kernels)
    if where.world_size == 1:
        await warm
        return Ring(where, None, [], executor, settings)
    try:
        keys = Keys.load(settings.curve_key) if settings.curve_key else None
        endpoint = Endpoint(where.rank, keys)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    try:
        peers = await bind_and_exchange(endpoint, where, timeout)
        await _join(endpoint, peers, settings, timeout)
        await warm
    except BaseException:
        await endpoint.close()
        executor.shutdown(wait=False)
        raise
    return Ring(where, endpoint, peers, executor, settings)


async def _join(endpoint: Endpoint, peers: list[str], settings: Settings,
                timeout: float) -> None:
    """Meet the neighbours, start watching them, and offer every rank a direct link and
    a shared-memory link (taken by those on this host)."""
    rank, world_size = endpoint.rank, len(peers)
    endpoint.set_peers(peers)
    left, right = neighbours(rank, world_size)
    # Beating starts first: a neighbour that waits for its other, late, neighbour must
    # hear from this rank meanwhile.
    endpoint.watch(sorted({left, right}), settings.heartbeat_s, settings.peer_timeout)
    await greet_neighbours(endpoint, left, right, timeout)
    endpoint.direct_bytes = settings.direct_bytes
    await endpoint.offer_links(r for r in range(world_size) if r != rank)
    others = [r for r in range(world_size) if r != rank]
    endpoint.offer_shared({r: settings.shm_bytes if r == right else
                           min(settings.shm_bytes, SIDE_SHM_BYTES) for r in others})
    await endpoint.settle_shared(others, timeout)


def _warm_kernels() -> None:
    """Load the float32 kernels while the peers gather: the first call pays Numba's set-up."""
    partial, final = step_reducers(BY_NAME["float32"], Op.MEAN, 2)
    buf = np.zeros(2, np.float32)
    partial(buf, buf)
    final(buf, buf)
