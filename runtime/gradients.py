"""Data-parallel training with torch: average gradients across the ring while backward runs.

GradientAverager registers a post-accumulate-grad hook on every parameter. As a gradient
is finished, the hook copies it into its bucket; a full bucket is all-reduced at once on
the ring's loop thread (BlockingRing.all_reduce_async, or a ringlib process group's
allreduce) while backward carries on, and
buckets always start in plan order, so every rank issues the same collectives in the
same order. synchronize() sends what is left (gradients that never came count as zeros),
waits, and points each .grad at its mean inside the bucket, so no copy is made on the
way back (with compression, the mean is converted back instead). A parameter that had no
gradient on any rank gets .grad None, as it would in one process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ringlib.errors import InvalidArgument, RingError
from ringlib.ops import Op

from .blocking import BlockingRing
from .process_group import TORCH_OPS, RingProcessGroup
from .buckets import BucketPlan, Slot, plan_buckets
from .timeline import GRADIENTS

COMPRESSION = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}


class _OnGroup:
    """A ringlib torch.distributed group, started on as a BlockingRing is: each call
    returns what .result() waits on (a RingWork)."""

    def __init__(self, group: RingProcessGroup) -> None:
        self.group = group

    @property
    def timeline(self) -> Any:
        return self.group.ring.timeline

    def all_reduce_async(self, tensor: torch.Tensor, op: str) -> Any:
        opts = dist.AllreduceOptions()
        opts.reduceOp = TORCH_OPS[Op.parse(op)]
        return self.group.allreduce([tensor], opts)

    def broadcast_async(self, tensor: torch.Tensor, root: int) -> Any:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        return self.group.broadcast([tensor], opts)


def _ring_of(ring: BlockingRing | RingProcessGroup, who: str) -> BlockingRing | _OnGroup:
    if isinstance(ring, BlockingRing):
        return ring
    if isinstance(ring, RingProcessGroup):
        return _OnGroup(ring)
    raise InvalidArgument(f"{who} needs the blocking ring from ringlib.init() or a ringlib "
                          "torch.distributed group (dist.group.WORLD after "
                          f"init_process_group('ringlib')), not {type(ring).__name__}")


def broadcast_parameters(model: torch.nn.Module, ring: BlockingRing | RingProcessGroup,
                         root: int = 0) -> None:
    """Overwrite every parameter and buffer of `model` with rank `root`'s, in place."""
    ring = _ring_of(ring, "broadcast_parameters")
    with torch.no_grad():
        tensors = [t.detach() for t in [*model.parameters(), *model.buffers()]]
        for future in [ring.broadcast_async(t, root) for t in tensors]:
            future.result()


class _Bucket:
    """A plan's flat buffer on the wire, and what this step has put into it."""

    def __init__(self, plan: BucketPlan, wire: torch.dtype) -> None:
        self.plan = plan
        self.buffer = torch.zeros(plan.size, dtype=wire)
        self.ready = 0
        self.future: concurrent.futures.Future | None = None
        self.started = 0  # when its all-reduce started (monotonic ns), on a timeline

    def record(self, timeline: Any, index: int) -> None:
        """Put this bucket's all-reduce, from its start to now, on `timeline`."""
        timeline.span(f"bucket {index} all-reduce", GRADIENTS, self.started,
                      time.monotonic_ns(), {"bucket": index, "bytes": self.buffer.nbytes,
                                            "gradients": self.ready})

    def grad_view(self, slot: Slot) -> torch.Tensor:
        return self.buffer[slot.offset:slot.offset + slot.numel]

    def zero_missing(self) -> None:
        """Zero the gradients that did not arrive this step (their flags are 0)."""
        if self.ready < len(self.plan.slots):
            present = self.buffer[self.plan.grads:].tolist()
            for slot, flag in zip(self.plan.slots, present):
                if flag == 0:
                    self.grad_view(slot).zero_()


class GradientAverager:
    """Averages the gradients of `model` across `ring`: the BlockingRing from ringlib.init(),
    or a ringlib torch.distributed group (both start their all-reduces on the ring's loop
    thread, from the thread that runs backward).

    bucket_mb: megabytes of gradients per all-reduce; smaller buckets start sooner,
        larger ones pay fewer per-message costs.
    compression: None, "fp16" or "bf16": floating-point gradients travel as half
        precision, and each reduction step adds in float32 in the compiled core.
    """

    def __init__(self, model: torch.nn.Module, ring: BlockingRing | RingProcessGroup,
                 bucket_mb: float = 25, compression: str | None = None) -> None:
        ring = _ring_of(ring, "GradientAverager")
        if compression not in COMPRESSION:
            raise InvalidArgument(f"compression must be None, 'fp16' or 'bf16', not {compression!r}")
        self.ring = ring
        self.params = [p for p in model.parameters() if p.requires_grad]
        layout = [(p.dtype, p.numel(), p.element_size()) for p in self.params]
        self.buckets = [_Bucket(plan, self._wire(plan.dtype, compression))
                        for plan in plan_buckets(layout, int(bucket_mb * (1 << 20)))]
        self._where = {slot.param: (bucket, slot) for bucket in self.buckets
                       for slot in bucket.plan.slots}
        self._next = 0  # the first bucket not started yet
        self._syncing = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i))
                       for i, p in enumerate(self.params)]

    @staticmethod
    def _wire(dtype: torch.dtype, compression: str | None) -> torch.dtype:
        return COMPRESSION[compression] if compression and dtype.is_floating_point else dtype

    def _hook(self, index: int) -> Any:
        def on_grad(param: torch.Tensor) -> None:
            if self._syncing:
                self._add(index, param.grad)
        return on_grad

    def _add(self, index: int, grad: torch.Tensor) -> None:
        bucket, slot = self._where[index]
        if bucket.future is not None:
            raise RingError("a gradient arrived for a bucket already sent: call synchronize() "
                            "after each backward, or accumulate inside no_sync()")
        view = bucket.grad_view(slot)
        if grad.data_ptr() != view.data_ptr():  # autograd did not accumulate into the bucket
            view.copy_(grad.reshape(-1))
        bucket.buffer[slot.flag] = 1
        bucket.ready += 1
        self._start_ready()

    def _start_ready(self, everything: bool = False) -> None:
        """Start buckets in plan order, as far as they are full (or all, at the end)."""
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if not everything and bucket.ready < len(bucket.plan.slots):
                return
            bucket.zero_missing()
            if self.ring.timeline is not None:
                bucket.started = time.monotonic_ns()
                self.ring.timeline.instant(f"bucket {self._next} ready", {
                    "bucket": self._next, "full": bucket.ready == len(bucket.plan.slots)},
                    tid=GRADIENTS)
            bucket.future = self.ring.all_reduce_async(bucket.buffer, "mean")
            self._next += 1

    def synchronize(self) -> None:
        """Wait until every bucket is averaged; then each .grad holds the mean over ranks.

        Inside no_sync() it does nothing. Call it after every backward that should sync,
        before the optimizer step.
        """
        if not self._syncing:
            return
        self._start_ready(everything=True)
        timeline, waiting = self.ring.timeline, time.monotonic_ns()
        try:
            for index, bucket in enumerate(self.buckets):
                bucket.future.result()
                if timeline is not None and bucket.started:
                    bucket.record(timeline, index)
                self._write_back(bucket)
        finally:
            self._reset()
        if timeline is not None:
            timeline.span("synchronize() wait", GRADIENTS, waiting, time.monotonic_ns(),
                          {"buckets": len(self.buckets)})

    def _write_back(self, bucket: _Bucket) -> None:
        """Point each .grad at its mean in the bucket (no copy), or convert it back from
        the compressed wire dtype; a parameter no rank had a gradient for gets None."""
        present = bucket.buffer[bucket.plan.grads:].tolist()
        for slot, flag in zip(bucket.plan.slots, present):
            param = self.params[slot.param]
            if flag == 0:
                param.grad = None
            elif bucket.buffer.dtype == param.dtype:
                param.grad = bucket.grad_view(slot).view(param.shape)
            else:
                param.grad = bucket.grad_view(slot).view(param.shape).to(param.dtype)

    def _reset(self) -> None:
        for bucket in self.buckets:
            bucket.buffer[bucket.plan.grads:] = 0
            bucket.ready, bucket.future, bucket.started = 0, None, 0
        self._next = 0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate into .grad locally; the first synced backward
        after it averages the accumulated gradients, as with DDP's no_sync()."""
        previous, self._syncing = self._syncing, False
        try:
            yield
        finally:
            self._syncing = previous

    def remove(self) -> None:
        """Unhook from the model."""
        for handle in self._hooks:
            handle.remove()


class DistributedOptimizer:
    """Wraps an optimizer so that step() first waits for the averaged gradients."""

    def __init__(self, optimizer: torch.optim.Optimizer, averager: GradientAverager) -> None:
        self.optimizer = optimizer
        self.averager = averager

    def step(self, closure: Any = None) -> Any:
        self.averager.synchronize()
        return self.optimizer.step(closure)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)
