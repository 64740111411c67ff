"""ringlib.torch: data-parallel training with torch over the ring, without a server.

    import ringlib, ringlib.torch as rt
    ring = ringlib.init()
    rt.broadcast_parameters(model, ring, root=0)
    averager = rt.GradientAverager(model, ring, bucket_mb=25, compression=None)
    loss.backward(); averager.synchronize(); optimizer.step(); optimizer.zero_grad()

or wrap the optimizer: `optimizer = rt.DistributedOptimizer(optimizer, averager)`.
"""

from ringlib.runtime.gradients import DistributedOptimizer, GradientAverager, broadcast_parameters

__all__ = ["DistributedOptimizer", "GradientAverager", "broadcast_parameters"]
