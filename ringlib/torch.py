"""ringlib.torch: data-parallel training with torch over the ring, without a server.

Importing it registers ringlib as a torch.distributed backend, so that torch's own
trainers run on the ring unchanged:

    import torch.distributed as dist, ringlib.torch
    dist.init_process_group("ringlib")          # under torchrun, or with a store
    model = torch.nn.parallel.DistributedDataParallel(model)

or, without torch.distributed, average gradients with ringlib's own ring:

    import ringlib, ringlib.torch as rt
    ring = ringlib.init()
    rt.broadcast_parameters(model, ring, root=0)
    averager = rt.GradientAverager(model, ring, bucket_mb=25, compression=None)
    loss.backward(); averager.synchronize(); optimizer.step(); optimizer.zero_grad()

or wrap the optimizer: `optimizer = rt.DistributedOptimizer(optimizer, averager)`; and to
train on through lost ranks and newcomers that join (ringlib.init(join=ADDRESS)):
`rt.run_elastic(train_step, ring, rt.ElasticState(model, optimizer), steps=1000)`.
"""

import torch.distributed as dist

from ringlib.runtime.gradients import DistributedOptimizer, GradientAverager, broadcast_parameters
from ringlib.runtime.ddp_hooks import refuse_builtin_comm_hooks
from ringlib.runtime.elastic import ElasticState, run_elastic
from ringlib.runtime.process_group import RingProcessGroup, create_process_group

BACKEND = "ringlib"


def register() -> None:
    """Register the "ringlib" backend in this process, once; importing this module does it
    already. For engines that take a setup hook to run in each worker process before
    torch.distributed starts there (Ray's `worker_process_setup_hook`)."""
    if not hasattr(dist.Backend, BACKEND.upper()):
        dist.Backend.register_backend(BACKEND, create_process_group, extended_api=True,
                                      devices=["cpu"])
        refuse_builtin_comm_hooks()


register()

__all__ = ["BACKEND", "DistributedOptimizer", "ElasticState", "GradientAverager",
           "RingProcessGroup", "broadcast_parameters", "register", "run_elastic"]
