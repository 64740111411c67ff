"""Training on through changes of membership, as Horovod's `hvd.elastic.run` does: when a
rank is lost the survivors reform(), when newcomers ask the members admit() them, and
either way every rank then takes rank 0's state, so that all carry on alike.

    state = ElasticState(model, optimizer, step=0)
    def train_step(state):
        loss = model(next_batch(state.step)).sum(); loss.backward()
        averager.synchronize(); optimizer.step(); optimizer.zero_grad()
    run_elastic(train_step, ring, state, steps=1000, admit_every=50)

A newcomer (ringlib.init(join=ADDRESS)) runs the same call: its first sync takes the
members' state, step included.
"""

from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np
import torch

from ringlib.errors import InvalidArgument, PeerLost

from .blocking import BlockingRing
from .gradients import broadcast_parameters


class ElasticState:
    """What a rank carries on from after a change of membership: the model's parameters
    and buffers, the optimizer's state, `step`, and whatever else was given (as
    attributes), all taken from rank `root` by sync()."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 step: int = 0, **extra: Any) -> None:
        self.model, self.optimizer, self.step = model, optimizer, step
        self._extra = list(extra)
        self.__dict__.update(extra)

    def sync(self, ring: BlockingRing, root: int = 0) -> None:
        """Make this rank's state rank `root`'s: parameters and buffers in place, the
        optimizer's state and the rest through one serialized message (torch.save, read
        back with weights_only: tensors, numbers, strings and containers of them); then
        the gradients are zeroed: what a failed step left there is nobody's."""
        if not isinstance(ring, BlockingRing):
            raise InvalidArgument("ElasticState.sync needs the blocking ring of ringlib.init(), "
                                  f"not {type(ring).__name__}")
        broadcast_parameters(self.model, ring, root)
        blob = self._packed() if ring.rank == root else b""
        size = ring.broadcast(np.array([len(blob)], np.int64), root=root)
        buf = np.frombuffer(blob, np.uint8).copy() if ring.rank == root else \
            np.zeros(int(size[0]), np.uint8)
        ring.broadcast(buf, root=root)
        if ring.rank != root:
            self._unpack(buf.tobytes())
        self.model.zero_grad()

    def _packed(self) -> bytes:
        out = io.BytesIO()
        torch.save({"optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                    "step": self.step, "extra": {k: getattr(self, k) for k in self._extra}},
                   out)
        return out.getvalue()

    def _unpack(self, blob: bytes) -> None:
        state = torch.load(io.BytesIO(blob), weights_only=True)
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.__dict__.update(state["extra"])


def run_elastic(train_step: Callable[[ElasticState], Any], ring: BlockingRing,
                state: ElasticState, steps: int, *, admit_every: int = 1,
                timeout: float | None = None) -> None:
    """Call train_step(state) until state.step reaches `steps`, counting each step. Every
    `admit_every` steps the members admit() the newcomers waiting (it costs one small
    all-reduce when none waits); a PeerLost makes the survivors reform(), which admits the
    waiting too. After either, and first of all, every rank takes rank 0's state (sync):
    survivors may have finished different steps when the loss struck."""
    if admit_every < 1:
        raise InvalidArgument(f"admit_every must be 1 or more, not {admit_every}")
    synced = False
    while True:
        try:
            if not synced:
                state.sync(ring)
                synced = True
            if state.step >= steps:
                return
            train_step(state)
            state.step += 1
            if state.step % admit_every == 0 and ring.admit(timeout=timeout):
                synced = False
        except PeerLost:
            ring.reform(timeout=timeout)
            synced = False
