"""The Ring: a connected peer's collectives as coroutines, and connect() that makes one."""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import contextlib
import contextvars
import dataclasses
import itertools
import logging
import numbers
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Generator, TypeVar

import numpy as np

from ringlib import collectives
from ringlib.collectives import Plan, Sessions, signature, step_reducers
from ringlib.collectives.choose import EMPTY_PLAN
from ringlib.collectives.compiled import CompiledPath, Pending, Prepared, warm_compiled
from ringlib.collectives.flight import FlightRecorder
from ringlib.collectives.hierarchical_allreduce import host_groups
from ringlib.collectives.mesh_path import MeshPath, MeshPending, MeshPrepared
from ringlib.partition import chunk
from ringlib.dtypes import BY_NAME, DType
from ringlib.errors import (CollectiveTimeout, InvalidArgument, MismatchError,
                            RendezvousError, RingClosed, UsageError)
from ringlib.ops import Op
from ringlib.transport import Endpoint, Kind, Stream, wait_sent
from ringlib.transport.security import Keys

from . import admission, signals
from .admission import Doorway
from .arena_meeting import meet
from .clock import Clocks, same_host
from .mesh_meeting import meet_mesh
from .buffers import empty_like, flat_view, like, storage
from .environment import Placement, placement
from .reform import Attempt, reform
from .rendezvous import (AddressBook, bind_and_exchange, engine_book, engine_may_have_book,
                         join)
from .settings import Settings, connect_timeout, seconds
from .timeline import Timeline, path_for

T = TypeVar("T")
log = logging.getLogger(__name__)
# The name of the thread a blocking ring's collective was called from ("" for asyncio
# callers and the thread that made the ring), set by the facade (blocking.py); collectives
# carry it in their signatures, so that two threads' collectives never pair up across ranks.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("ringlib_caller", default="")
# The stream point-to-point messages travel on (Ring.send, Ring.recv): one new_stream(),
# which counts from 0, never reaches.
POINT_TO_POINT = (1 << 31) - 1
# A run of compiled collectives that never waits gives the event loop a turn this often,
# so that heartbeats still go out (collectives/compiled.py).
BREATH_S = 0.01
PREPARED_KEPT = 256  # signatures whose compiled preparation a ring keeps
_NOTHING = np.zeros(0, np.uint8)  # a barrier's buffer


class _Tunable:
    """A Ring attribute that reads and writes the ring's Settings, its one source of truth:
    what is set holds for later collectives and after reform()."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.__doc__ = f"The ring's {name} (see Settings); settable."

    def __get__(self, ring: Ring | None, owner: type | None = None) -> Any:
        return self if ring is None else getattr(ring.settings, self.name)

    def __set__(self, ring: Ring, value: Any) -> None:
        ring.configure(**{self.name: value})


class Ring:
    """A rank's membership of a ring. Every rank must issue the same collectives in the same
    order; several may be in flight at once (asyncio.gather), and their messages never mix.

    Buffers are C-contiguous numpy arrays or CPU torch tensors of a dtype the compiled core
    supports; ops are "sum", "mean", "min", "max", "prod" or an Op. Every collective takes
    `timeout` (seconds), defaulting to the ring's `collective_timeout`.

    Ranks that pass different shapes, dtypes, ops or roots all raise MismatchError, a rank
    whose buffer alone is empty too: an empty collective still meets the other ranks (a
    barrier's worth of empty messages). When a rank dies or is cut off, every pending and
    later collective raises PeerLost within about `peer_timeout` seconds, until reform()
    rebuilds a ring of the survivors. A ring runs on the event loop it was made on.
    """

    collective_timeout = _Tunable()
    segment_bytes = _Tunable()
    small_bytes = _Tunable()
    spin_us = _Tunable()
    direct_bytes = _Tunable()
    compiled_bytes = _Tunable()
    mesh_bytes = _Tunable()
    mesh_ring = _Tunable()

    def __init__(self, where: Placement, endpoint: Endpoint | None, peers: list[str],
                 executor: ThreadPoolExecutor, settings: Settings) -> None:
        self.rank = where.rank
        self.world_size = where.world_size
        self.local_rank = where.local_rank
        self.peers = peers
        self._hosts = host_groups(peers)  # the ranks of each host, for hierarchical_allreduce
        self.generation = 0  # how many times its membership changed (reform, admit)
        self.settings = settings
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        self.flight = FlightRecorder(self.rank, settings.flight_kept, settings.flight_dir)
        self.timeline: Timeline | None = None  # see start_timeline()
        signals.watch(self.flight)
        signals.install()
        self._doorway = Doorway(lambda: f"rank {self.rank} ({self.address})")
        self._use(endpoint)
        self._streams = itertools.count()
        self._attempt: Attempt | None = None  # the try at re-forming, after one failed
        self._closed = False

    def _use(self, endpoint: Endpoint | None) -> None:
        """Run the collectives over `endpoint` (None: a ring of one), numbered from 1."""
        self._endpoint = endpoint
        if endpoint is not None:
            endpoint.on(Kind.ADMIT, self._doorway.heard)
        self._sessions = None if endpoint is None else \
            Sessions(endpoint, self.world_size, self._executor, self.flight)
        self._clocks = None if endpoint is None else Clocks(endpoint)
        self._compiled: CompiledPath | None = None  # see _meet()
        self._mesh: MeshPath | None = None  # see _meet()
        self._prepared: dict[tuple, Prepared | MeshPrepared | None] = {}
        self._breath = time.monotonic()
        # point-to-point messages so far, by (peer, tag), which number the next
        self._sent: collections.Counter[tuple[int, int]] = collections.Counter()
        self._received: collections.Counter[tuple[int, int]] = collections.Counter()

    def __repr__(self) -> str:
        return f"<Ring rank {self.rank} of {self.world_size} at {self.address}>"

    def configure(self, **changes: Any) -> None:
        """Change some of the ring's settings (fields of Settings, checked as there); they
        hold for the collectives that start later, and after reform()."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(Settings)}
        if unknown:
            raise InvalidArgument(f"no such setting: {', '.join(sorted(unknown))}")
        if all(getattr(self.settings, k) == v for k, v in changes.items()):
            return  # the benchmarks set the same values before every call: keep that cheap
        self.settings = dataclasses.replace(self.settings, **changes)
        self._prepared.clear()
        if self._endpoint is not None:
            self._endpoint.direct_bytes = self.settings.direct_bytes

    def new_stream(self) -> Stream | None:
        """A new stream between this rank and others (a pipeline), outside the collectives;
        ranks that open their streams in the same order since the ring's last change of
        membership agree on their numbers, as they do on collectives' (so a newcomer's
        first stream meets the members' next one). None in a ring of one, which has
        nobody to stream to."""
        number = next(self._streams)
        return None if self._endpoint is None else Stream(self._endpoint, number)

    @property
    def endpoint(self) -> Endpoint | None:
        """This rank's transport endpoint (None in a ring of one)."""
        return self._endpoint

    @property
    def address(self) -> str | None:
        """The address this rank receives at (None in a ring of one)."""
        return self._endpoint.address if self._endpoint else None

    def plan(self, collective: str, nbytes: int) -> Plan:
        """How `collective` ("all_reduce", "broadcast", ...) over `nbytes` runs on this ring
        now: its algorithm, and whether it is latency-bound (collectives.plan)."""
        compiled = self._compiled
        limit = 0 if compiled is None else min(self.settings.compiled_bytes, compiled.capacity)
        hosts = self._hosts if self.settings.hierarchical else None
        mesh = 0 if self._mesh is None else self.settings.mesh_bytes
        return collectives.plan(collective, nbytes, self.world_size, self.settings.small_bytes,
                                self._reaches_peer, limit, hosts, mesh,
                                self._mesh is not None and self.settings.mesh_ring)

    def _reaches_peer(self) -> bool:
        """Whether this rank and the other of a ring of two reach each other's memory."""
        return self._endpoint is not None and self._endpoint.reaches(1 - self.rank)

    async def all_reduce(self, x: T, op: Op | str = Op.SUM, *, timeout: float | None = None) -> T:
        """Reduce x element-wise across all ranks, in place; return x."""
        pending = self._on_loop() and self._start_all_reduce(x, op, timeout=timeout,
                                                                 caller=CALLER.get())
        if pending:
            return pending.value() if self._done_now(pending) else \
                await self._compiled_result(pending)
        op = Op.parse(op)
        buf, dtype = storage(x, "x", writable=True)
        step_reducers(dtype, op, self.world_size)  # an integer mean fails here, before sending
        if not self._alone(timeout):
            plan = self.plan("all_reduce", buf.nbytes)
            sig = signature("all_reduce", dtype.name, tuple(x.shape), op.value,
                            algorithm=plan.tag, caller=CALLER.get())
            await self._run(buf.size, plan, sig, dtype, timeout, collectives.all_reduce, buf,
                            dtype, op, plan.algorithm, self._hosts)
        return x

    async def reduce_scatter(self, x: Any, op: Op | str = Op.SUM, *,
                             timeout: float | None = None) -> Any:
        """This rank's chunk of the reduction of flattened x (chunk sizes differ by at most
        one element; see ringlib.chunk_bounds). x itself is left unchanged."""
        pending = self._on_loop() and self._start_reduce_scatter(
            x, op, timeout=timeout, caller=CALLER.get())
        if pending:
            return pending.value() if self._done_now(pending) else \
                await self._compiled_result(pending)
        op = Op.parse(op)
        src, dtype = storage(x, "x", writable=False)
        step_reducers(dtype, op, self.world_size)
        work = src.copy()
        start, stop = 0, work.size
        if not self._alone(timeout):
            sig = signature("reduce_scatter", dtype.name, tuple(x.shape), op.value,
                            caller=CALLER.get())
            bounds = await self._run(work.size, self.plan("reduce_scatter", work.nbytes), sig,
                                     dtype, timeout, collectives.reduce_scatter, work, dtype, op)
            if bounds is not None:  # None: it was empty
                start, stop = bounds
        return like(x, work[start:stop])

    async def all_gather(self, x: Any, *, timeout: float | None = None) -> Any:
        """A new array or tensor of shape (world_size, *x.shape): row i is rank i's x."""
        pending = self._on_loop() and self._start_all_gather(x, timeout=timeout,
                                                                 caller=CALLER.get())
        if pending:
            return pending.value() if self._done_now(pending) else \
                await self._compiled_result(pending)
        src, dtype = storage(x, "x", writable=False)
        out, out_buf = empty_like(x, (self.world_size, *x.shape))
        out_buf[self.rank * src.size:(self.rank + 1) * src.size] = src
        if not self._alone(timeout):
            sig = signature("all_gather", dtype.name, tuple(x.shape), caller=CALLER.get())
            await self._run(src.size, self.plan("all_gather", out_buf.nbytes), sig, dtype,
                            timeout, collectives.all_gather, out_buf)
        return out

    async def broadcast(self, x: T, root: int = 0, *, timeout: float | None = None) -> T:
        """Overwrite x on every rank with root's x, in place; return x."""
        pending = self._on_loop() and self._start_broadcast(x, root, timeout=timeout,
                                                                caller=CALLER.get())
        if pending:
            return pending.value() if self._done_now(pending) else \
                await self._compiled_result(pending)
        self._check_rank("broadcast root", root)
        buf, dtype = storage(x, "x", writable=self.rank != root)
        if not self._alone(timeout):
            plan = self.plan("broadcast", buf.nbytes)
            sig = signature("broadcast", dtype.name, tuple(x.shape), root=root,
                            caller=CALLER.get())
            await self._run(buf.size, plan, sig, dtype, timeout, collectives.broadcast, buf,
                            root, plan.algorithm)
        return x

    # --- the compiled path (collectives/compiled.py) and the mesh (mesh_path.py) --------
    # Each _start_* starts its collective over the shared arena or the mesh and returns
    # its Pending, or None where it takes messages (neither, too large, a ring of one); it
    # is synchronous, so the blocking facade calls it on its caller's thread.

    def _start_all_reduce(self, x: Any, op: Op | str = Op.SUM, *, timeout: float | None = None,
                          caller: str = "") -> Pending | MeshPending | None:
        prepared = self._prepared_for("all_reduce", x, op, 0, caller)
        return prepared and self._launch(prepared, flat_view(x, prepared.storage, True),
                                         timeout, lambda: x)

    def _start_broadcast(self, x: Any, root: int = 0, *, timeout: float | None = None,
                         caller: str = "") -> Pending | None:
        prepared = self._prepared_for("broadcast", x, Op.SUM, root, caller)
        writable = self.rank != root
        return prepared and self._launch(prepared, flat_view(x, prepared.storage, writable),
                                         timeout, lambda: x)

    def _start_all_gather(self, x: Any, *, timeout: float | None = None,
                          caller: str = "") -> Pending | None:
        prepared = self._prepared_for("all_gather", x, Op.SUM, 0, caller)
        if not prepared:
            return None
        src = flat_view(x, prepared.storage, False)
        out, out_buf = empty_like(x, (self.world_size, *x.shape))
        out_buf[self.rank * src.size:(self.rank + 1) * src.size] = src
        return self._launch(prepared, out_buf, timeout, lambda: out)

    def _start_reduce_scatter(self, x: Any, op: Op | str = Op.SUM, *,
                              timeout: float | None = None, caller: str = "") -> Pending | None:
        prepared = self._prepared_for("reduce_scatter", x, op, 0, caller)
        if not prepared:
            return None
        work = flat_view(x, prepared.storage, False).copy()
        start, stop = chunk(work.size, self.world_size, self.rank)
        return self._launch(prepared, work, timeout, lambda: like(x, work[start:stop]))

    def _start_barrier(self, *, timeout: float | None = None,
                       caller: str = "") -> Pending | MeshPending | None:
        prepared = self._prepared_for("barrier", None, Op.SUM, 0, caller)
        return prepared and self._launch(prepared, _NOTHING, timeout, lambda: None)

    @property
    def idle(self) -> bool:
        """Whether no collective is in flight on this ring."""
        return (self._sessions is None or not self._sessions.running) and \
            (self._compiled is None or self._compiled.idle) and \
            (self._mesh is None or self._mesh.idle)

    def _prepared_for(self, collective: str, x: Any, op: Any, root: Any,
                      caller: str) -> Prepared | MeshPrepared | None:
        """The compiled or mesh preparation of this call's signature, made on its first
        call and kept (None: it takes messages); the first call also checks what the
        message path checks, so that both raise alike."""
        if self._compiled is None and self._mesh is None:
            return None
        key = (collective, getattr(x, "dtype", None), getattr(x, "shape", None), op, root,
               caller)
        try:
            return self._prepared[key]
        except (KeyError, TypeError):  # TypeError: an unhashable op; checked below
            pass
        prepared = self._prepare(collective, x, Op.parse(op), root, caller)
        if len(self._prepared) >= PREPARED_KEPT:
            self._prepared.clear()
        self._prepared[key] = prepared
        return prepared

    def _prepare(self, collective: str, x: Any, op: Op, root: Any,
                 caller: str) -> Prepared | MeshPrepared | None:
        if collective == "barrier":
            plan = self.plan("barrier", 0)
            sig = signature("barrier", algorithm=plan.tag, caller=caller)
            if plan.algorithm == "mesh":
                return self._mesh.prepare(sig, None, None)
            return self._compiled.prepare(sig, "barrier", _NOTHING.dtype) if plan.tag else None
        if collective == "broadcast":
            self._check_rank("broadcast root", root)
        buf, dtype = storage(x, "x", writable=False)
        step_reducers(dtype, op, self.world_size)  # an integer mean fails here
        plan = self.plan(collective, buf.nbytes * (self.world_size if collective ==
                                                   "all_gather" else 1))
        if not plan.tag.startswith(("compiled", "mesh")):
            return None
        reduces = collective in ("all_reduce", "reduce_scatter")
        sig = signature(collective, dtype.name, tuple(x.shape), op.value if reduces else "",
                        root=root if collective == "broadcast" else None,
                        algorithm=plan.tag, caller=caller)
        if plan.algorithm.startswith("mesh"):
            return self._mesh.prepare(sig, dtype, step_reducers(dtype, op, self.world_size),
                                      streamed=plan.algorithm == "mesh-ring")
        kind = "split_all_reduce" if plan.algorithm == "compiled-split" else collective
        paired = collective == "all_reduce" and dtype.pair_storage is not None and \
            buf.size % 2 == 0
        count = dtype.arith(self.world_size) if dtype.is_float else 0
        return self._compiled.prepare(sig, kind, dtype.pair_storage if paired else dtype.storage,
                                      op.value, root, count)

    def _launch(self, prepared: Prepared | MeshPrepared, buf: np.ndarray,
                timeout: float | None, then: Callable[[], Any]) -> Pending | MeshPending:
        if timeout is not None:
            seconds("timeout", timeout)
        if isinstance(prepared, MeshPrepared):
            return self._mesh.start(prepared, buf, self._deadline(timeout),
                                    self.settings.spin_us, then)
        return self._compiled.start(prepared, buf, self._deadline(timeout),
                                    self.settings.spin_us, then)

    def _on_loop(self) -> bool:
        """True, or UsageError where a collective is called from another event loop."""
        if asyncio.get_running_loop() is not self._loop:
            self._alone(None)  # raises
        return True

    def _done_now(self, pending: Pending) -> bool:
        """Whether a compiled collective finished in its first call and the event loop
        had a turn within BREATH_S: then its result is returned with no turn at all."""
        return pending.done and time.monotonic() - self._breath < BREATH_S

    async def _compiled_result(self, pending: Pending) -> Any:
        """The result of a compiled collective after a turn of the event loop: a wait on
        it, or a turn given to the loop (see BREATH_S)."""
        if pending.done:
            await asyncio.sleep(0)
        else:
            await pending.finish()
        self._breath = time.monotonic()
        return pending.value()

    async def _meet(self) -> None:
        """Every rank, once the ring is up (and after reform): map the shared arena with
        the others where all can (meet), which the compiled path then runs over."""
        if self._endpoint is None:
            return
        arena = await meet(self, self.settings)
        if arena is not None:
            self._compiled = CompiledPath(arena, self._sessions, self._endpoint)
            self._prepared.clear()
            return
        mesh = await meet_mesh(self, self.settings)
        if mesh is not None:
            self._mesh = MeshPath(mesh, self._sessions, self._endpoint)
            self._prepared.clear()

    async def send(self, x: Any, to: int, tag: int = 0, *, timeout: float | None = None) -> None:
        """Send x to rank `to` alone, outside the collectives; return once x may change.

        It arrives at `to`'s recv(..., frm=this rank, tag=tag): between two ranks, the
        messages of one tag arrive in the order they were sent, whatever the other
        tags and collectives do meanwhile. `tag` is a whole number, 0 or more.
        """
        self._check_peer("send to", to, tag)
        src, dtype = storage(x, "x", writable=False)
        if self._alone(timeout):
            return
        item = self._sent[to, tag]
        self._sent[to, tag] += 1
        stream = Stream(self._endpoint, POINT_TO_POINT)
        async with self._point_to_point(f"send to rank {to}", to, timeout):
            tracker = await stream.send(to, item, tag, src, dtype.name)
            if tracker is not None:
                await wait_sent([tracker], self._endpoint.inbox)

    async def recv(self, x: T, frm: int, tag: int = 0, *, timeout: float | None = None) -> T:
        """Receive into x, in place, what rank `frm` sent this rank with send(..., tag);
        return x. A message of another dtype or size raises MismatchError."""
        self._check_peer("receive from", frm, tag)
        buf, dtype = storage(x, "x", writable=True)
        if self._alone(timeout):
            return x
        item = self._received[frm, tag]
        self._received[frm, tag] += 1
        stream = Stream(self._endpoint, POINT_TO_POINT)
        try:
            async with self._point_to_point(f"receive from rank {frm}", frm, timeout):
                message = await stream.recv(frm, item, tag)
        except BaseException:
            if self._received[frm, tag] == item + 1:  # no later recv took a number
                self._received[frm, tag] = item       # the next one waits for this message
            raise
        if message.header.sig != dtype.name or message.header.nbytes != buf.nbytes:
            raise MismatchError(
                f"rank {self.rank}: message {item} with tag {tag} from rank {frm} "
                f"({self.peers[frm]}) holds {message.header.nbytes} bytes of "
                f"{message.header.sig}, but recv was given {buf.nbytes} bytes of {dtype.name}")
        if buf.nbytes:
            buf[:] = np.frombuffer(message.payload.buffer, dtype=buf.dtype)
        return x

    @contextlib.asynccontextmanager
    async def _point_to_point(self, what: str, peer: int,
                              timeout: float | None) -> AsyncIterator[None]:
        """Bound a send or receive by its deadline: CollectiveTimeout past it."""
        limit = self._deadline(timeout)
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            raise CollectiveTimeout(f"rank {self.rank}: {what} ({self.peers[peer]}) did not "
                                    f"finish within {limit:g} s") from None

    def _check_peer(self, what: str, rank: Any, tag: Any) -> None:
        self._check_rank(what, rank)
        if rank == self.rank:
            raise InvalidArgument(f"rank {self.rank}: cannot {what} itself")
        if isinstance(tag, bool) or not isinstance(tag, numbers.Integral) or tag < 0:
            raise InvalidArgument(f"rank {self.rank}: {what} rank {rank}: tag {tag!r} must "
                                  "be a whole number, 0 or more")

    def _check_rank(self, what: str, rank: Any) -> None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or \
                not 0 <= rank < self.world_size:
            raise InvalidArgument(f"rank {self.rank}: {what} {rank!r} is not a rank of this "
                                  f"ring (an integer 0..{self.world_size - 1})")

    def _deadline(self, timeout: float | None) -> float:
        return self.settings.collective_timeout if timeout is None else timeout

    async def barrier(self, *, timeout: float | None = None) -> None:
        """Return once every rank has entered the barrier."""
        pending = self._on_loop() and self._start_barrier(timeout=timeout,
                                                              caller=CALLER.get())
        if pending:
            return pending.value() if self._done_now(pending) else \
                await self._compiled_result(pending)
        if not self._alone(timeout):
            await self._run(1, self.plan("barrier", 0), signature("barrier", caller=CALLER.get()),
                            BY_NAME["uint8"], timeout, collectives.barrier)

    def _alone(self, timeout: Any) -> bool:
        """Whether this rank is a ring of one, and exchanges nothing; first, that the ring
        may be used here and now, with this `timeout`."""
        if self._closed:
            raise RingClosed(f"rank {self.rank}: the ring is closed")
        if asyncio.get_running_loop() is not self._loop:
            raise UsageError(f"rank {self.rank}: this ring runs on the event loop it was made "
                             "on; a collective was called from another one (make a ring per "
                             "event loop, or use ringlib.init()'s from any one thread)")
        if timeout is not None:
            seconds("timeout", timeout)
        return self.world_size == 1

    def _run(self, size: int, plan: Plan, sig: str, dtype: DType, timeout: float | None,
             algorithm: Callable[..., Awaitable[T]], *args: Any) -> Awaitable[T]:
        """Open the collective `sig` (a signature()) over `size` elements now, so that it
        takes its number in call order, and return its run under its deadline to await;
        latency-bound ones poll for their messages for up to spin_us before yielding. An
        empty one exchanges empty messages as a barrier does, under its own signature, so
        that ranks whose sizes differ find it out."""
        if size == 0:
            plan, algorithm, args = EMPTY_PLAN, collectives.barrier, ()
        settings = self.settings
        session = self._sessions.open(
            sig, dtype.storage, self._deadline(timeout),
            settings.spin_us * 1e-6 if plan.latency_bound else 0.0,
            max(1, settings.segment_bytes // dtype.itemsize), size * dtype.itemsize,
            plan.algorithm)
        return session.run(algorithm, *args)

    async def reform(self, *, timeout: float | None = None, admit: bool = True) -> None:
        """After PeerLost: build a new ring of the ranks still alive and carry on in it.

        Every survivor must call it. They agree on who is left, take new ranks 0..M-1 in
        the order of their old ones (rank, world_size and peers change) and new addresses,
        and meet as connect() does. Survivors may have finished different numbers of
        collectives when the loss struck: broadcast the state to carry on from (say from
        the new rank 0) before training on. Newcomers waiting to join are admitted too
        (admit()); one that cannot be met is logged, and the re-formed ring stands. With
        `admit=False` they wait on for a later admit() (a Pipeline re-forms so: a newcomer
        runs no stage of the pipeline in flight). `timeout` bounds the wait for the others
        (default: connect()'s start-up timeout).
        """
        if self._closed:
            raise RingClosed(f"rank {self.rank}: the ring is closed")
        if self._endpoint is None:
            return
        limit = connect_timeout(timeout)
        if self._attempt is None or self._attempt.generation != self.generation + 1:
            self._attempt = Attempt(self.generation + 1)
        endpoint, peers = await reform(self._endpoint, self._attempt, self.world_size,
                                       self.settings, limit)
        self._attempt = None
        await self._renew(endpoint, peers, "reform")
        if admit and self._endpoint is not None:
            try:
                await self.admit(timeout=limit)
            except RendezvousError as exc:  # the re-formed ring stands: that is reform's job
                log.warning("%s", exc)

    async def admit(self, *, timeout: float | None = None) -> int:
        """Let in the newcomers that asked any member (connect(join=...)) before this
        call; return how many joined, 0 if nobody waits (then it costs one small
        all-reduce). A collective: every member calls it at the same point of its loop.

        The newcomers take the ranks from world_size on, in an order all members agree
        on; every rank binds a fresh address, and generation counts the change. After a
        count above 0, broadcast the state to carry on from (say from rank 0): the
        newcomers wait for it. RendezvousError if the newcomers could not be met (one died
        while being admitted, say): the ring is then as it was. `timeout` bounds each step
        (default: the ring's collective_timeout for the count, connect()'s start-up
        timeout for the rest). See runtime/admission.py.
        """
        if self._alone(None):
            return 0
        mine = self._asked()
        most = await self.all_reduce(np.array([len(mine)], np.int64), op="max",
                                     timeout=timeout)
        return await self._grow(mine, int(most[0]), timeout=timeout)

    async def _grow(self, mine: list[str], most: int, *, timeout: float | None = None) -> int:
        """admit() once its first step counted `most` newcomers at some member (`mine`
        here): the rest of it, if there is any."""
        if most == 0:
            return 0
        limit = connect_timeout(timeout)
        endpoint, peers, newcomers = await admission.admit(self, self._doorway, mine, most,
                                                           limit)
        await self._renew(endpoint, peers, "admit")
        await self.barrier(timeout=limit)  # the newcomers' sign that they are in
        return len(newcomers)

    def waiting(self) -> int:
        """How many newcomers asked this member to be admitted and wait, without a word to
        the others: a loop may call admit() only when some member's count is above 0."""
        return len(self._asked())

    def _asked(self) -> list[str]:
        """The newcomers that asked this member, and wait."""
        return self._doorway.waiting(self.peers)

    async def _renew(self, endpoint: Endpoint | None, peers: list[str], change: str) -> None:
        """Go on in the ring of `endpoint` (None: a ring of one) and `peers`, after a
        `change` of membership ("reform", "admit")."""
        self.world_size, self.peers = len(peers), peers
        self._hosts = host_groups(peers)
        self.rank = endpoint.rank if endpoint is not None else 0
        self._drop_fast_paths()
        self._use(endpoint)
        self._streams = itertools.count()  # a fresh endpoint: no older stream reaches it
        self.generation += 1
        self.flight.rank, self.flight.generation = self.rank, self.generation
        if self.timeline is not None:
            self.timeline.generation = self.generation
            self.timeline.instant(change, {"generation": self.generation, "rank": self.rank,
                                           "world_size": self.world_size})
        await self._meet()

    async def start_timeline(self, path: str) -> None:
        """Record this rank's timeline to `path` from now on ("{rank}" in it replaced by
        the rank; a path without it not ending in .json is a directory that gets
        trace-{rank}.json), with times on rank 0's clock (runtime/timeline.py); a
        timeline already on is stopped first. Each rank starts
        its own: call it on those whose timeline is wanted."""
        self.stop_timeline()
        where = path_for(os.fspath(path), self.rank, self.world_size)
        try:
            timeline = Timeline(where, self.rank)
        except OSError as exc:
            raise InvalidArgument(f"rank {self.rank}: cannot write the timeline {where}: "
                                  f"{exc.strerror}") from None
        signals.install(timeline=True)
        timeline.generation = self.generation
        if self._endpoint is not None and self.rank != 0:
            if same_host(self.peers[0], self.peers[self.rank]):
                timeline.clock = "rank 0's (one host: one wall clock)"
            else:
                offset = await self._clocks.offset_to(0)
                timeline.offset_us = offset or 0.0
                timeline.clock = ("rank 0's, measured at start" if offset is not None else
                                  "this host's wall clock: rank 0 did not answer")
        self.timeline = self.flight.timeline = timeline

    def stop_timeline(self) -> None:
        """Stop recording the timeline, and write its file a last time."""
        timeline, self.timeline = self.timeline, None
        self.flight.timeline = None
        if timeline is not None:
            timeline.close()

    async def close(self) -> None:
        """Leave the ring: close the sockets (queued messages are still delivered) and the
        worker thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._endpoint is not None:  # BYE first: the peers take the mesh's EOF for a close
            await self._endpoint.close()
        self._drop_fast_paths()
        self._executor.shutdown(wait=False)
        self.stop_timeline()

    def _drop_fast_paths(self) -> None:
        """Unmap the arena, close the mesh: the ring closes or re-forms."""
        self._prepared.clear()  # they view the arena
        if self._compiled is not None:
            self._compiled.close()
            self._compiled = None
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None

    async def __aenter__(self) -> Ring:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class Connecting(collections.abc.Coroutine):
    """What connect() returns: await it for a Ring, use it as `async with`, or hand it to
    asyncio.run() as the coroutine it is. Nothing starts before one of these."""

    def __init__(self, opening: Callable[[], Coroutine[Any, Any, Ring]]) -> None:
        self._opening = opening
        self._coro: Coroutine[Any, Any, Ring] | None = None
        self._ring: Ring | None = None

    def _started(self) -> Coroutine[Any, Any, Ring]:
        if self._coro is None:
            self._coro = self._opening()
        return self._coro

    def send(self, value: Any) -> Any:
        return self._started().send(value)

    def throw(self, *exc_info: Any) -> Any:
        return self._started().throw(*exc_info)

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()

    def __await__(self) -> Generator[Any, None, Ring]:
        return self._started().__await__()

    async def __aenter__(self) -> Ring:
        self._ring = await self._started()
        return self._ring

    async def __aexit__(self, *exc_info: object) -> None:
        await self._ring.close()


def connect(rank: int | None = None, world_size: int | None = None,
            peers: list[str] | None = None, *, timeout: float | None = None,
            address_book: AddressBook | None = None, join: str | None = None,
            **settings: Any) -> Connecting:
    """Join the ring: `ring = await connect(...)` or `async with connect(...) as ring`.

    rank, world_size, peers: this process's rank, the number of ranks, and every rank's
        address (tcp://host:port, ipc:///path, inproc://name); whatever is not given comes
        from the environment (`RINGLIB_*`, torchrun, mpirun or srun variables; see
        ringlib.runtime.environment). With none at all the process is a ring of one.
    timeout: seconds to wait for the peers at start-up before RendezvousTimeout, which
        names the ranks and addresses that were not reached (default
        RINGLIB_CONNECT_TIMEOUT, which `ringlib launch --timeout` sets, or 60).
    address_book: where the ranks trade their addresses instead of meeting at a seed
        (rendezvous.AddressBook; the torch backend passes c10d's store this way). With
        none and no seed set: under mpirun, where mpi4py loads, MPI itself
        (mpi_book.py); a store torch has, the default process group's or torchrun's
        agent's (store_book.py).
    join: the address of a member of a running ring (its `address`; default RINGLIB_JOIN)
        to ask to be admitted into, as a newcomer: connect() returns once the members
        admit() it, with its rank and peers theirs to give (admission.py), or raises
        RendezvousTimeout after `timeout`.
    settings: any of the ring's tunables, the fields of Settings (collective_timeout,
        segment_bytes, small_bytes, spin_us, direct_bytes, heartbeat_s, peer_timeout,
        curve_key, shm_bytes, compiled_bytes, mesh_bytes, mesh_ring, hierarchical, ifname, timeline,
        flight_dir, flight_kept), each defaulting to its `RINGLIB_*` variable; see
        Settings.
    """
    timeout = connect_timeout(timeout)
    tunables = Settings(**settings)
    join = join or os.environ.get("RINGLIB_JOIN") or None
    if join is not None:
        if rank is not None or world_size is not None or peers is not None or \
                address_book is not None:
            raise InvalidArgument("a newcomer that joins a running ring gets its rank and "
                                  "peers from the members: give join alone, not rank, "
                                  "world_size, peers or address_book")
        return Connecting(lambda: _open_joining(join, timeout, tunables))
    if address_book is None and peers is None and rank is None and \
            engine_may_have_book(os.environ):
        return Connecting(lambda: _open_in_engine(world_size, timeout, tunables))
    where = placement(rank, world_size, peers, seedless=address_book is not None)
    return Connecting(lambda: _open(where, timeout, tunables, address_book))


async def _open_in_engine(world_size: int | None, timeout: float, settings: Settings) -> Ring:
    """_open, with the addresses traded where the engine that started this process has a
    place for them (rendezvous.engine_book), whose ranks are then the ring's; found in a
    worker thread, as starting MPI or connecting to a store blocks."""
    loop = asyncio.get_running_loop()
    book = await loop.run_in_executor(None, engine_book, os.environ, timeout)
    if book is None:
        return await _open(placement(None, world_size), timeout, settings, None)
    where = placement(book.rank, book.size, seedless=True)
    return await _open(where, timeout, settings, book)


async def _open(where: Placement, timeout: float, settings: Settings,
                book: AddressBook | None) -> Ring:
    executor = ThreadPoolExecutor(1, thread_name_prefix=f"ringlib-rank{where.rank}")
    warm = asyncio.get_running_loop().run_in_executor(executor, _warm_kernels)
    if where.world_size == 1:
        await warm
        ring = Ring(where, None, [], executor, settings)
        if settings.timeline:
            await ring.start_timeline(settings.timeline)
        return ring
    try:
        keys = Keys.load(settings.curve_key) if settings.curve_key else None
        endpoint = Endpoint(where.rank, keys)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    try:
        peers = await bind_and_exchange(endpoint, where, timeout, book, settings.ifname)
        await join(endpoint, peers, settings, timeout)
    except BaseException as exc:
        if book is not None:
            book.abandon()  # a cancel (Ctrl-C): a trade waiting in its thread stops too
        await endpoint.close(f"it gave up starting: {exc}")
        executor.shutdown(wait=False)
        raise
    return await _become(where, endpoint, peers, executor, warm, settings)


async def _open_joining(address: str, timeout: float, settings: Settings) -> Ring:
    """connect(join=address): ask to be admitted into a running ring, and become a
    member once the members admit() it (admission.py)."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="ringlib-newcomer")
    warm = asyncio.get_running_loop().run_in_executor(executor, _warm_kernels)
    try:
        keys = Keys.load(settings.curve_key) if settings.curve_key else None
        endpoint, peers, generation = await admission.ask(address, keys, settings, timeout)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    rank = endpoint.rank
    local = sum(same_host(a, peers[rank]) for a in peers[:rank])
    where = Placement(rank, len(peers), local, peers, None, f"admitted at {address}")
    return await _become(where, endpoint, peers, executor, warm, settings, generation,
                         first_barrier=timeout)


async def _become(where: Placement, endpoint: Endpoint, peers: list[str],
                  executor: ThreadPoolExecutor, warm: Awaitable[None], settings: Settings,
                  generation: int = 0, first_barrier: float | None = None) -> Ring:
    """The Ring of a rank whose endpoint has met its peers: its fast paths met, its
    timeline started where asked, after the first barrier of an admitted newcomer (the
    members' sign that it is in: see admission.py). On failure, whatever it holds is let
    go."""
    ring = None
    try:
        await warm
        ring = Ring(where, endpoint, peers, executor, settings)
        ring.generation = ring.flight.generation = generation
        await ring._meet()
        if first_barrier is not None:
            await ring.barrier(timeout=first_barrier)
        if settings.timeline:
            await ring.start_timeline(settings.timeline)
    except BaseException as exc:
        if ring is not None:
            ring._drop_fast_paths()
        await endpoint.close(f"it gave up starting: {exc}")
        executor.shutdown(wait=False)
        raise
    return ring


def _warm_kernels() -> None:
    """Load the float32 kernels while the peers gather: the first call pays Numba's set-up."""
    partial, final = step_reducers(BY_NAME["float32"], Op.MEAN, 2)
    buf = np.zeros(2, np.float32)
    partial(buf, buf)
    final(buf, buf)
    warm_compiled()
