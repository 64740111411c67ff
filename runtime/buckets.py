"""Which gradients travel together: parameters packed into flat buckets, fixed up front.

Parameters go into buckets in reverse order of registration, the order in which backward
usually finishes their gradients (as in torch's DistributedDataParallel), and one bucket
holds one dtype. Each bucket ends with one presence flag per parameter, so a single
all-reduce also tells every rank whether any rank had a gradient for it. Every rank
builds the same plan from the same model, so the ranks' collectives line up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable


@dataclass
class Slot:
    """Where one parameter's gradient sits in its bucket."""

    param: int       # index into the model's parameter list
    offset: int      # first element in the bucket
    numel: int
    flag: int        # index of its presence flag in the bucket


@dataclass
class BucketPlan:
    dtype: Hashable                  # the parameters' dtype (a torch dtype, or its name)
    slots: list[Slot] = field(default_factory=list)

    @property
    def grads(self) -> int:
        """Elements of gradient data, before the presence flags."""
        return sum(s.numel for s in self.slots)

    @property
    def size(self) -> int:
        return self.grads + len(self.slots)


def plan_buckets(params: list[tuple[Hashable, int, int]], bucket_bytes: int) -> list[BucketPlan]:
    """Buckets for parameters given as (dtype, numel, itemsize), in launch order.

    A bucket closes once it holds `bucket_bytes` or more; a parameter larger than that
    gets a bucket of its own. Flags are numbered after all of a bucket's gradients.
    """
    open_buckets: dict[str, BucketPlan] = {}
    closed: list[BucketPlan] = []
    for index in reversed(range(len(params))):
        dtype, numel, itemsize = params[index]
        bucket = open_buckets.setdefault(dtype, BucketPlan(dtype))
        bucket.slots.append(Slot(index, bucket.grads, numel, -1))
        if bucket.grads * itemsize >= bucket_bytes:
            closed.append(open_buckets.pop(dtype))
    closed += open_buckets.values()
    for bucket in closed:
        for k, slot in enumerate(bucket.slots):
            slot.flag = bucket.grads + k
    return closed
