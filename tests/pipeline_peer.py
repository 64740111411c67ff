"""A rank of a pipeline in its own process: `python pipeline_peer.py MODE [SEED]` under
RINGLIB_*.

die    rank 1 serves one micro-batch and then its process ends; rank 0 must get a clear
       error instead of waiting forever, and prints it.
equal  a seeded MLP cut into one stage per rank but the last, whose stage writes into its
       input in place and returns it (so its output lies in its input's memory); rank 0
       checks every batch against the whole model in float64. Each serving rank prints
       where its inputs lay (shared memory or not), and every rank how many records it
       still holds in its shared-memory links at the end.
"""

import os
import sys

import numpy as np
import torch

import ringlib
from ringlib.runtime.pipeline import Pipeline
from ringlib.runtime.splitting import split_sequential


def in_shared_memory(tensor: torch.Tensor) -> bool:
    """Whether the tensor's memory lies in a /dev/shm mapping of this process."""
    address = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, *rest = line.split()
            low, high = (int(x, 16) for x in span.split("-"))
            if low <= address < high:
                return len(rest) >= 5 and rest[4].startswith("/dev/shm/")
    return False


def mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 256))


def equal(ring, seed: int) -> None:
    model = mlp(seed)
    parts = split_sequential(model, ring.world_size - 1) if ring.world_size > 2 else [model]
    seen = []

    def last(x: torch.Tensor) -> torch.Tensor:
        seen.append(in_shared_memory(x))
        return x.mul_(1.0)  # in place, into what it received

    def middle(part):
        def stage(x: torch.Tensor) -> torch.Tensor:
            seen.append(in_shared_memory(x))
            return part(x)
        return stage
    stage = last if ring.rank == ring.world_size - 1 else \
        parts[0] if ring.rank == 0 else middle(parts[ring.rank])
    pipe = Pipeline(ring, stage, micro_batch=16, max_in_flight=6)
    if ring.rank == 0:
        rng = np.random.default_rng(seed)
        batches = [torch.from_numpy(rng.standard_normal((int(rows), 256)).astype(np.float32))
                   for rows in rng.integers(1, 70, 40)]
        reference = mlp(seed).double()
        with torch.inference_mode():
            for batch, out in zip(batches, pipe.run(batches), strict=True):
                torch.testing.assert_close(out.double(), reference(batch.double()),
                                           rtol=1e-4, atol=1e-4)
        pipe.close()
        print("outputs equal", flush=True)
    else:
        pipe.serve()
        print(f"inputs in shared memory: {sum(seen)} of {len(seen)}; last {seen[-1]}",
              flush=True)
    print(f"held at the end: {ring.ring.endpoint.shared.held()}", flush=True)


def die(ring) -> None:
    if ring.rank == 0:
        pipe = Pipeline(ring, lambda x: x, micro_batch=1, timeout=3)
        try:
            for out in pipe.run([torch.ones(1, 2), torch.ones(3, 2)]):
                print("output", tuple(out.shape), flush=True)
        except ringlib.CollectiveTimeout as exc:
            print(f"CollectiveTimeout: {exc}", flush=True)
        return
    served = []

    def once(x):
        if served:
            os._exit(0)  # the process is gone, mid-pipeline
        served.append(x)
        return x
    Pipeline(ring, once).serve()


def main(mode: str, seed: int) -> None:
    with ringlib.init() as ring:
        equal(ring, seed) if mode == "equal" else die(ring)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
