"""ringlib as a torch.distributed backend: a ProcessGroup whose ops run on a ring.

c10d calls create_process_group() for every group this rank belongs to (the default
group, each new_group) with the group's own store: the group's ranks trade their
addresses there (store_book.py) and form a ring of their own, which a loop thread of its
own runs. An op checks and stages its tensors in the calling thread (staging.py), starts
one task per ring collective on that loop at once, so in call order, and returns a
RingWork (works.py); a synchronous dist.* call is that Work, waited on. c10d's timeout is
the ring's collective timeout. What the ring does not offer raises NotSupported, never
hangs.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import threading
from typing import Any, Coroutine

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from ringlib.errors import InvalidArgument, NotSupported, RingClosed, UnsupportedOp
from ringlib.ops import Op

from .blocking import LoopThread
from .ring import Ring, connect
from .staging import Staged, by_dtype, write
from .store_book import StoreBook
from . import torch_spans
from .works import RingWork, joined

TORCH_OPS = {Op.SUM: ReduceOp.SUM, Op.MEAN: ReduceOp.AVG, Op.MIN: ReduceOp.MIN,
             Op.MAX: ReduceOp.MAX, Op.PROD: ReduceOp.PRODUCT}
_REDUCTIONS = {**{torch_op: op for op, torch_op in TORCH_OPS.items()},
               ReduceOp.PREMUL_SUM: Op.SUM}


def _reduction(reduce_op: Any) -> tuple[Op, float | None]:
    """The ring's Op for c10d's `reduce_op`, and PREMUL_SUM's factor (else None)."""
    kind = reduce_op.op if isinstance(reduce_op, ReduceOp) else reduce_op
    if kind not in _REDUCTIONS:
        raise UnsupportedOp(f"the ringlib backend does not reduce with {kind.name}; it "
                            "offers SUM, AVG, MIN, MAX, PRODUCT and PREMUL_SUM")
    return _REDUCTIONS[kind], float(reduce_op.factor) if kind == ReduceOp.PREMUL_SUM else None


def _timeout(opts: Any) -> float | None:
    """An op's own timeout in seconds, where its options set one (else the ring's)."""
    timeout = getattr(opts, "timeout", None)
    return timeout.total_seconds() if timeout and timeout.total_seconds() > 0 else None


@dataclasses.dataclass(frozen=True)
class _Options:
    """What an op's c10d options ask for, read (and checked) when the op is called."""

    op: Op = Op.SUM
    factor: float | None = None   # PREMUL_SUM's
    timeout: float | None = None  # the op's own deadline, else the ring's
    root: int = 0

    @classmethod
    def of(cls, opts: Any) -> _Options:
        op, factor = _reduction(opts.reduceOp) if hasattr(opts, "reduceOp") else (Op.SUM, None)
        return cls(op, factor, _timeout(opts), getattr(opts, "rootRank", 0))


def _not_supported(name: str) -> Any:
    def op(self: RingProcessGroup, *args: Any, **kwargs: Any) -> Any:
        raise NotSupported(f"rank {self.rank()}: the ringlib backend does not offer {name}")
    op.__name__ = name
    return op


class RingProcessGroup(dist.ProcessGroup):
    """A torch.distributed process group over `ring`, which `loop` runs."""

    def __init__(self, ring: Ring, loop: LoopThread) -> None:
        super().__init__(ring.rank, ring.world_size)
        self.ring, self._loop = ring, loop
        self._lock = threading.Lock()  # between ops starting and shutdown()
        self._name = self._desc = ""
        atexit.register(self.shutdown)

    def __repr__(self) -> str:
        return f"<RingProcessGroup {self._name!r} rank {self.ring.rank} of {self.ring.world_size}>"

    def getBackendName(self) -> str:
        return "ringlib"

    # c10d and DeviceMesh name every group; C++ callers reach these too.
    def setGroupName(self, name: str) -> None:
        self._name = name

    def getGroupName(self) -> str:
        return self._name

    def setGroupDesc(self, desc: str) -> None:
        self._desc = desc

    def getGroupDesc(self) -> str:
        return self._desc

    def _start(self, what: str, outputs: list[torch.Tensor],
               parts: list[Coroutine[Any, Any, None]]) -> RingWork:
        """Start `parts` (one ring collective each) on the ring's loop now, one task each
        in this order: each takes its number in call order, as a collective of one part
        does, whatever else is in flight. The Work fills `outputs`."""
        span = torch_spans.span(what.split()[0]) or contextlib.nullcontext()
        with self._lock, span:
            if self._loop is None:
                for part in parts:
                    part.close()
                raise RingClosed(f"rank {self.rank()}: {what} on process group "
                                 f"{self._name!r}, which was destroyed")
            running = [self._loop.submit(part) for part in parts]
        return RingWork(joined(running), outputs, f"rank {self.rank()}: {what}")

    def _stage(self, tensors: list[torch.Tensor], what: str, how: _Options,
               copy: bool = False) -> Staged:
        """`tensors` staged for the ring (staging.py), premultiplied for PREMUL_SUM."""
        staged = Staged(tensors, f"rank {self.rank()}: {what}", copy)
        if how.factor is not None:
            if not staged.buffer.is_floating_point():
                raise UnsupportedOp(f"rank {self.rank()}: {what} with PREMUL_SUM needs "
                                    f"floating-point tensors, not {tensors[0].dtype}")
            staged.buffer.mul_(how.factor)
        return staged

    def _one(self, tensors: list[Any], what: str) -> Any:
        """The single tensor (or list) of `tensors`: c10d's lists hold one per device."""
        if len(tensors) != 1:
            raise InvalidArgument(f"rank {self.rank()}: {what} takes one tensor per call on "
                                  f"the ringlib backend, not {len(tensors)}")
        return tensors[0]

    # -- reductions ---------------------------------------------------------------------

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> RingWork:
        how = _Options.of(opts)
        staged = self._stage([self._one(tensors, "allreduce")], "allreduce", how)
        return self._start("allreduce", tensors, [self._all_reduce(staged, how)])

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> RingWork:
        how = _Options.of(opts)
        staged = [self._stage(group, "allreduce_coalesced", how) for group in by_dtype(tensors)]
        return self._start("allreduce_coalesced", tensors,
                           [self._all_reduce(s, how) for s in staged])

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> RingWork:
        """Every rank reduces (an all-reduce); only the root keeps the result."""
        how = _Options.of(opts)
        root = self.rank() == how.root
        staged = self._stage([self._one(tensors, "reduce")], "reduce", how, copy=not root)
        return self._start("reduce", tensors, [self._all_reduce(staged, how, keep=root)])

    async def _all_reduce(self, staged: Staged, how: _Options, keep: bool = True) -> None:
        await self.ring.all_reduce(staged.buffer, how.op, timeout=how.timeout)
        if keep:
            staged.write_back()

    def reduce_scatter(self, outputs: list[torch.Tensor],
                       input_lists: list[list[torch.Tensor]], opts: Any = None) -> RingWork:
        how = _Options.of(opts)
        output = self._one(outputs, "reduce_scatter")
        parts = self._one(input_lists, "reduce_scatter")
        self._per_rank(parts, output, "reduce_scatter", same_sizes=False)
        staged = self._stage(parts, "reduce_scatter", how, copy=True)
        sizes = [p.numel() for p in parts]
        return self._start("reduce_scatter", outputs,
                           [self._reduce_scatter(output, staged, sizes, how)])

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,
                              opts: Any = None) -> RingWork:
        return self._per_pair([output], [input], opts, "reduce_scatter_tensor", gather=False)

    def reduce_scatter_tensor_coalesced(self, outputs: list[torch.Tensor],
                                        inputs: list[torch.Tensor], opts: Any = None) -> RingWork:
        return self._per_pair(outputs, inputs, opts, "reduce_scatter_tensor_coalesced",
                              gather=False)

    async def _reduce_scatter(self, output: torch.Tensor, staged: Staged, sizes: list[int],
                              how: _Options) -> None:
        """Reduce the flat concatenation of every rank's `sizes`-long pieces, and write
        piece `rank` into `output`: a reduce-scatter where the pieces are equal (the
        ring's chunks), else an all-reduce of the whole."""
        flat = staged.buffer.reshape(-1)
        if len(set(sizes)) == 1:
            write(output, await self.ring.reduce_scatter(flat, how.op, timeout=how.timeout))
            return
        await self.ring.all_reduce(flat, how.op, timeout=how.timeout)
        start = sum(sizes[:self.rank()])
        write(output, flat[start:start + sizes[self.rank()]])

    # -- gathers and broadcasts ---------------------------------------------------------

    def allgather(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor],
                  opts: Any = None) -> RingWork:
        return self._all_gather_lists([self._one(output_lists, "allgather")],
                                      [self._one(inputs, "allgather")], opts, "allgather")

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]],
                            inputs: list[torch.Tensor], opts: Any = None) -> RingWork:
        return self._all_gather_lists(output_lists, inputs, opts, "allgather_coalesced")

    def _all_gather_lists(self, output_lists: list[list[torch.Tensor]],
                          inputs: list[torch.Tensor], opts: Any, what: str) -> RingWork:
        """Gather each input into its list of one output per rank."""
        how = _Options.of(opts)
        parts = []
        for outputs, input in zip(output_lists, inputs, strict=True):
            self._per_rank(outputs, input, what)
            parts.append(self._all_gather(outputs, self._stage([input], what, how), how))
        return self._start(what, [t for ts in output_lists for t in ts], parts)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,
                          opts: Any = None) -> RingWork:
        return self._per_pair([output], [input], opts, "all_gather_into_tensor", gather=True)

    def allgather_into_tensor_coalesced(self, outputs: list[torch.Tensor],
                                        inputs: list[torch.Tensor], opts: Any = None) -> RingWork:
        return self._per_pair(outputs, inputs, opts, "allgather_into_tensor_coalesced",
                              gather=True)

    async def _all_gather(self, outputs: list[torch.Tensor], staged: Staged,
                          how: _Options) -> None:
        """Gather every rank's buffer into `outputs`: one tensor per rank, or one for all."""
        gathered = await self.ring.all_gather(staged.buffer, timeout=how.timeout)
        if len(outputs) == 1:
            write(outputs[0], gathered)
        else:
            for output, row in zip(outputs, gathered):
                write(output, row)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> RingWork:
        how = _Options.of(opts)
        staged = self._stage([self._one(tensors, "broadcast")], "broadcast", how)
        return self._start("broadcast", tensors, [self._broadcast(staged, how)])

    async def _broadcast(self, staged: Staged, how: _Options) -> None:
        await self.ring.broadcast(staged.buffer, how.root, timeout=how.timeout)
        staged.write_back()

    # -- barrier and point-to-point -----------------------------------------------------

    def barrier(self, opts: Any = None) -> RingWork:
        how = _Options.of(opts)
        return self._start("barrier", [], [self.ring.barrier(timeout=how.timeout)])

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> RingWork:
        staged = self._stage([self._one(tensors, "send")], "send", _Options())
        return self._start(f"send to rank {dst}", tensors,
                           [self.ring.send(staged.buffer, dst, tag)])

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> RingWork:
        staged = self._stage([self._one(tensors, "recv")], "recv", _Options())
        return self._start(f"recv from rank {src}", tensors, [self._recv(staged, src, tag)])

    async def _recv(self, staged: Staged, src: int, tag: int) -> None:
        await self.ring.recv(staged.buffer, src, tag)
        staged.write_back()

    # -- parts and checks ---------------------------------------------------------------

    def _per_pair(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any,
                  what: str, gather: bool) -> RingWork:
        """One collective per (output, input) pair: gather each input into its output of
        world_size times its elements, or reduce-scatter each input of world_size times
        its output's elements into it."""
        how = _Options.of(opts)
        parts = []
        for output, input in self._pairs(outputs, inputs, what, gather):
            staged = self._stage([input], what, how, copy=not gather)
            parts.append(self._all_gather([output], staged, how) if gather else
                         self._reduce_scatter(output, staged, [output.numel()] * self.size(),
                                              how))
        return self._start(what, outputs, parts)

    def _per_rank(self, tensors: list[torch.Tensor], like: torch.Tensor, what: str,
                  same_sizes: bool = True) -> None:
        """One tensor per rank, each of `like`'s dtype (and size, if `same_sizes`; else
        this rank's own is)."""
        if len(tensors) != self.size():
            raise InvalidArgument(f"rank {self.rank()}: {what} takes one tensor per rank of "
                                  f"the group ({self.size()}), not {len(tensors)}")
        for tensor in tensors:
            self._alike(tensor, like, what)
        sized = tensors if same_sizes else [tensors[self.rank()]]
        if any(t.numel() != like.numel() for t in sized):
            raise InvalidArgument(f"rank {self.rank()}: {what} needs tensors of "
                                  f"{like.numel()} elements, not {[t.numel() for t in sized]}")

    def _pairs(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], what: str,
               gather: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(output, input) pairs, checked: a gather's output holds world_size times its
        input's elements, a reduce-scatter's input world_size times its output's."""
        pairs = list(zip(outputs, inputs, strict=True))
        for output, input in pairs:
            whole, piece = (output, input) if gather else (input, output)
            self._alike(output, input, what)
            if whole.numel() != piece.numel() * self.size():
                raise InvalidArgument(
                    f"rank {self.rank()}: {what} needs a tensor of {self.size()} x "
                    f"{piece.numel()} elements, not {whole.numel()}")
        return pairs

    def _alike(self, tensor: torch.Tensor, like: torch.Tensor, what: str) -> None:
        if tensor.dtype != like.dtype:
            raise InvalidArgument(f"rank {self.rank()}: {what} got a {tensor.dtype} tensor "
                                  f"beside a {like.dtype} one; all must be of one dtype")

    # The C++ names of the same ops, which some torch versions call instead.
    _allgather_base = all_gather_single
    _reduce_scatter_base = reduce_scatter_single

    alltoall = _not_supported("alltoall")
    alltoall_base = _not_supported("alltoall_base (all_to_all_single)")
    all_to_all_single = _not_supported("all_to_all_single")
    gather = _not_supported("gather")
    scatter = _not_supported("scatter")
    recv_anysource = _not_supported("recv from any source (recv with src=None)")
    split_group = _not_supported("split_group")
    merge_remote_group = _not_supported("merge_remote_group")

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self.ring.configure(collective_timeout=timeout.total_seconds())

    def shutdown(self) -> None:
        """Close the ring and stop its loop thread (destroy_process_group calls this);
        ops still in flight raise RingClosed."""
        atexit.unregister(self.shutdown)
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            try:
                loop.run(self.ring.close())
            finally:
                loop.stop()

    abort = shutdown


def create_process_group(opts: Any, backend_options: Any = None) -> RingProcessGroup:
    """c10d's creator (extended API): a ring of the group's ranks, met through its store."""
    timeout = opts.timeout.total_seconds()
    book = StoreBook(opts.store, opts.group_rank, opts.group_size)
    loop = LoopThread(f"ringlib-group-{opts.group_id}")
    try:
        ring = loop.run(_form(opts.group_rank, opts.group_size, timeout, book))
    except BaseException:
        book.abandon()  # a Ctrl-C: the wait in the store stops too
        loop.stop()
        raise
    return RingProcessGroup(ring, loop)


async def _form(rank: int, size: int, timeout: float, book: StoreBook) -> Ring:
    """A ring of the group, whose collectives' deadline is c10d's timeout."""
    return await connect(rank, size, timeout=timeout, address_book=book,
                         collective_timeout=timeout)
