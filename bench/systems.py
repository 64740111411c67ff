"""The systems a sweep times side by side in the same processes: ringlib (one column per
setting under test), torch.distributed with the Gloo backend, and Open MPI through mpi4py.

Each system runs one collective (`allreduce`, `reduce_scatter`, `all_gather`,
`broadcast`) or a `latency` ping-pong between ranks 0 and 1 (as the OSU micro-benchmarks
do) on buffers of its own, filled from the same pattern, so every result can be checked
against one float64 reference. Sizes are the whole buffer, as nccl-tests counts them: the
input of allreduce, reduce_scatter and broadcast, the output of all_gather, the message.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import zmq

import ringlib
from ringlib.dtypes import BY_NAME
from ringlib.runtime.buffers import storage
from ringlib.transport import wait_sent

COLLECTIVES = ("allreduce", "reduce_scatter", "all_gather", "broadcast", "latency")
RING_NAMES = {"allreduce": "all_reduce"}  # where the Ring spells a collective otherwise
SPLIT = ("reduce_scatter", "all_gather")  # each rank holds 1/n of the buffer on one side
IN_PLACE = ("allreduce", "broadcast")
FROM_RANK_0 = ("broadcast", "latency")    # only rank 0's input matters
BUS_FACTOR = {  # busbw = algbw x this (nccl-tests' PERFORMANCE.md), n ranks
    "allreduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "latency": lambda n: 1.0,
}
STORE_VARIABLE = "RINGLIB_BENCH_STORE"  # host:port of the Gloo comparison's TCPStore
# The CurveZMQ comparison's ring: its secret key file, and its ranks' addresses.
CURVE_KEY_VARIABLE, CURVE_PEERS_VARIABLE = "RINGLIB_BENCH_CURVE_KEY", "RINGLIB_BENCH_CURVE_PEERS"
BLOCKING_PEERS_VARIABLE = "RINGLIB_BENCH_BLOCKING_PEERS"  # the blocking facade's ring
EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23,
       "float64": 2.0 ** -52}


class Unavailable(Exception):
    """A compared system cannot run here (not installed, no such dtype or op); the sweep
    goes on without it and says why."""


@dataclass(frozen=True)
class Case:
    """One collective over one size, as every system runs it."""

    collective: str
    count: int      # elements in the whole buffer
    dtype: str
    op: str
    rank: int
    world: int

    @property
    def part(self) -> int:
        """Elements each rank holds of a split buffer."""
        return self.count // self.world


# --- inputs and the reference ---------------------------------------------------------

def new_array(dtype: str, count: int) -> Any:
    """A zeroed numpy array, or a torch tensor for bfloat16 (numpy has none)."""
    if dtype == "bfloat16":
        import torch

        return torch.zeros(count, dtype=torch.bfloat16)
    return np.zeros(count, dtype)


def pattern(rank: int, count: int, op: str = "sum") -> np.ndarray:
    """Rank `rank`'s input: small integers, exact in every dtype, drawn from a generator
    seeded by rank and count, so that no two chunks look alike and a misplaced chunk shows.
    Factors of a product are 1 or 2, so that it neither overflows nor rounds."""
    high = 2 if op == "prod" else 5
    return np.random.default_rng([rank, count]).integers(1, high, count, endpoint=True
                                                         ).astype(np.float64)


def reference(case: Case) -> np.ndarray:
    """The float64 result this rank must hold."""
    n, r = case.world, case.rank
    if case.collective in FROM_RANK_0:
        return pattern(0, case.count)
    if case.collective == "all_gather":
        return np.concatenate([pattern(i, case.part) for i in range(n)])
    reduced = pattern(0, case.count, case.op)
    for i in range(1, n):  # one input at a time: a stack of n float64 copies is too big
        other = pattern(i, case.count, case.op)
        {"sum": np.add, "mean": np.add, "prod": np.multiply, "min": np.minimum,
         "max": np.maximum}[case.op](reduced, other, out=reduced)
    if case.op == "mean":
        reduced /= n
    return reduced[r * case.part:(r + 1) * case.part] if case.collective == "reduce_scatter" \
        else reduced


def fill(buf: Any, values: np.ndarray) -> None:
    if isinstance(buf, np.ndarray):
        buf[...] = values
    else:
        import torch

        buf.copy_(torch.from_numpy(values))


def as_float64(buf: Any) -> np.ndarray:
    return buf.astype(np.float64) if isinstance(buf, np.ndarray) else buf.double().numpy()


def check(label: str, case: Case, result: Any) -> None:
    """Raise AssertionError naming the system, rank and size unless `result` matches the
    float64 reference (exactly for integers, within a few roundings for floats)."""
    got, want = as_float64(result).ravel(), reference(case)
    rtol = 4 * case.world * EPS.get(case.dtype, 0.0)
    bad = np.flatnonzero(~np.isclose(got, want, rtol=rtol, atol=0)) if got.shape == want.shape \
        else [0]
    if len(bad):
        i = int(bad[0])
        raise AssertionError(
            f"rank {case.rank}: {label} {case.collective} {case.op} of {case.count} "
            f"{case.dtype}: {len(bad)} wrong elements, first at {i}: got "
            f"{got[i] if got.shape == want.shape else got.shape}, expected "
            f"{want[i] if got.shape == want.shape else want.shape}")


# --- the systems ----------------------------------------------------------------------

class System:
    """One column of the sweep: buffers of its own and one collective call on them."""

    label: str
    case: Case
    inp: Any
    out: Any

    def prepare(self, case: Case) -> None:
        """Allocate this case's buffers and fill the input from the pattern."""
        c = self.case = case
        self.inp = new_array(c.dtype, c.part if c.collective == "all_gather" else c.count)
        self.out = self.inp if c.collective in IN_PLACE else \
            new_array(c.dtype, c.part if c.collective == "reduce_scatter" else c.count)
        fill(self.inp, np.zeros(len(self.inp)) if c.collective in FROM_RANK_0 and c.rank
             else pattern(c.rank, len(self.inp), c.op))

    def zero(self) -> None:
        """Zeros stay zeros under every op: repeated calls neither overflow nor denormalise."""
        fill(self.inp, np.zeros(len(self.inp)))

    async def call(self) -> None:
        """Run the collective once on this system's buffers."""
        raise NotImplementedError

    def release(self) -> None:
        self.inp = self.out = None

    def close(self) -> None:
        """Leave whatever group this system joined."""


class RinglibSystem(System):
    """ringlib's asyncio API. `settings` (small_bytes, segment_bytes, spin_us,
    direct_bytes) are set on the shared ring before every call, so that several settings
    can take turns on one ring."""

    def __init__(self, ring: ringlib.Ring, label: str = "ringlib", **settings: int) -> None:
        self.ring, self.label, self.settings = ring, label, settings
        self.version = f"ringlib {ringlib.__version__}, libzmq {zmq.zmq_version()}" + \
            (" with CurveZMQ" if ring.endpoint is not None and ring.endpoint.keys else "")
        self._stream = ring.new_stream()
        self._round = itertools.count()

    def _apply(self) -> None:
        for name, value in self.settings.items():
            setattr(self.ring, name, value)

    def algorithm(self, case: Case) -> str:
        """The algorithm ringlib picks for this case under this setting."""
        self._apply()
        if case.collective == "latency":
            return "p2p"
        nbytes = case.count * BY_NAME[case.dtype].itemsize
        return self.ring.plan(RING_NAMES.get(case.collective, case.collective), nbytes).algorithm

    async def call(self) -> None:
        self._apply()
        c = self.case
        if c.collective == "allreduce":
            await self._do("all_reduce", self.inp, c.op)
        elif c.collective == "reduce_scatter":
            self.out = await self._do("reduce_scatter", self.inp, c.op)
        elif c.collective == "all_gather":
            self.out = (await self._do("all_gather", self.inp)).reshape(-1)
        elif c.collective == "broadcast":
            await self._do("broadcast", self.inp, 0)
        else:
            await self._pingpong()

    async def _do(self, collective: str, *args: Any) -> Any:
        return await getattr(self.ring, collective)(*args)

    async def _pingpong(self) -> None:
        """Rank 0 sends its input to rank 1 and waits for it to come back, on ringlib's
        transport (stream messages, as pipeline stages use): the OSU latency pattern."""
        rank, i = self.ring.rank, next(self._round)
        if rank > 1:
            return
        peer = 1 - rank
        nbytes = self.case.count * BY_NAME[self.case.dtype].itemsize
        settings = self.ring.settings
        spin = settings.spin_us * 1e-6 if nbytes <= settings.small_bytes else 0.0
        if rank == 0:
            await self._stream.send(peer, i, 0, storage(self.inp, "x", writable=False)[0])
        message = await self._stream.recv(peer, i, 0, spin)
        out = storage(self.out, "out", writable=True)[0]
        out.view(np.uint8)[...] = np.frombuffer(message.payload.buffer, np.uint8)
        if rank == 1:
            tracker = await self._stream.send(peer, i, 0, out)
            if tracker is not None:  # ZeroMQ shares `out` until it has sent it
                await wait_sent([tracker])


class BlockingSystem(RinglibSystem):
    """ringlib's blocking facade (ringlib.init), as a training loop calls it, on a ring of
    its own: its loop runs in its own thread, and this one calls from the sweep's."""

    def __init__(self, blocking: ringlib.BlockingRing, label: str = "blocking",
                 **settings: int) -> None:
        super().__init__(blocking.ring, label, **settings)
        self.blocking = blocking

    async def _do(self, collective: str, *args: Any) -> Any:
        return getattr(self.blocking, collective)(*args)

    async def _pingpong(self) -> None:
        """Rank 0 sends to rank 1 and receives it back (Ring.send and recv)."""
        rank, ring = self.ring.rank, self.blocking
        if rank == 0:
            ring.send(self.inp, 1)
            ring.recv(self.out, 1)
        elif rank == 1:
            ring.recv(self.out, 0)
            ring.send(self.out, 0)

    def close(self) -> None:
        self.blocking.close()


class GlooSystem(System):
    """torch.distributed with the Gloo backend, its group met through a TCPStore at the
    address the benchmark's parent put in RINGLIB_BENCH_STORE."""

    label = "gloo"

    def __init__(self, rank: int, world: int) -> None:
        try:
            import torch
            import torch.distributed as dist
        except ImportError as exc:
            raise Unavailable(f"torch is not installed ({exc})") from None
        if STORE_VARIABLE not in os.environ:
            raise Unavailable(f"{STORE_VARIABLE} is not set")
        torch.set_num_threads(1)  # one core per rank, as ringlib's kernels use
        self.torch, self.dist, self.world = torch, dist, world
        dist.init_process_group("gloo", init_method=f"tcp://{os.environ[STORE_VARIABLE]}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=60))
        self.version = f"torch {torch.__version__}"

    def prepare(self, case: Case) -> None:
        super().prepare(case)
        as_tensor = lambda a: a if isinstance(a, self.torch.Tensor) else self.torch.from_numpy(a)
        self.t_inp, self.t_out = as_tensor(self.inp), as_tensor(self.out)
        op = "sum" if case.op == "mean" else case.op  # Gloo has no mean: sum, then divide
        self.op = getattr(self.dist.ReduceOp, {"prod": "PRODUCT"}.get(op, op.upper()))

    async def call(self) -> None:
        c, dist = self.case, self.dist
        if c.collective == "allreduce":
            dist.all_reduce(self.t_inp, self.op)
        elif c.collective == "reduce_scatter":
            dist.reduce_scatter_single(self.t_out, self.t_inp, self.op)
        elif c.collective == "all_gather":
            dist.all_gather_single(self.t_out, self.t_inp)
        elif c.collective == "broadcast":
            dist.broadcast(self.t_inp, 0)
        elif c.rank == 0:
            dist.send(self.t_inp, 1)
            dist.recv(self.t_out, 1)
        elif c.rank == 1:
            dist.recv(self.t_out, 0)
            dist.send(self.t_out, 0)
        if c.op == "mean" and c.collective in ("allreduce", "reduce_scatter"):
            self.t_out.div_(self.world)

    def close(self) -> None:
        self.dist.destroy_process_group()


class MpiSystem(System):
    """Open MPI (or any MPI) through mpi4py's buffer collectives; the ranks must have been
    started by mpirun, which the benchmark does when --compare names mpi."""

    label = "mpi"

    def __init__(self) -> None:
        if "OMPI_COMM_WORLD_SIZE" not in os.environ and "PMI_SIZE" not in os.environ:
            raise Unavailable("the ranks were not started by mpirun")
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise Unavailable(f"mpi4py is not installed ({exc})") from None
        self.mpi, self.comm = MPI, MPI.COMM_WORLD
        self.version = MPI.Get_library_version().splitlines()[0].split(",")[0]

    def prepare(self, case: Case) -> None:
        if case.dtype == "bfloat16":
            raise Unavailable("MPI has no bfloat16")
        super().prepare(case)
        op = "sum" if case.op == "mean" else case.op  # MPI has no mean: sum, then divide
        self.op = getattr(self.mpi, op.upper())

    async def call(self) -> None:
        c, comm, mpi = self.case, self.comm, self.mpi
        if c.collective == "allreduce":
            comm.Allreduce(mpi.IN_PLACE, self.inp, self.op)
        elif c.collective == "reduce_scatter":
            comm.Reduce_scatter_block(self.inp, self.out, self.op)
        elif c.collective == "all_gather":
            comm.Allgather(self.inp, self.out)
        elif c.collective == "broadcast":
            comm.Bcast(self.inp, 0)
        elif c.rank == 0:
            comm.Send(self.inp, 1)
            comm.Recv(self.out, 1)
        elif c.rank == 1:
            comm.Recv(self.out, 0)
            comm.Send(self.out, 0)
        if c.op == "mean" and c.collective in ("allreduce", "reduce_scatter"):
            self.out /= c.world
