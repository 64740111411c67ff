"""A rank of a pipeline in its own process: `python pipeline_peer.py MODE [SEED]` under
RINGLIB_*.

die    rank 1 serves one micro-batch and then its process ends; rank 0 must get a clear
       error instead of waiting forever, and prints it.
equal  a seeded MLP cut into one stage per rank but the last, whose stage writes into its
       input in place and returns it (equal-onnx: rank 1's part runs as ONNX) (so its output lies in its input's memory); rank 0
       checks every batch against the whole model in float64. Each serving rank prints
       where its inputs lay (shared memory or not), and every rank how many records it
       still holds in its shared-memory links at the end.
survive  the same MLP on 4 ranks, stages made by build(rank, world_size); rank 2 SIGKILLs
         itself in its stage after KILL_AFTER micro-batches; rank 0 checks every batch.
lost     the same without build: the survivors get PeerLost naming the stage.
serve    rank 0 serves requests that 4 threads submit at random times through the
         blocking facade, each checked against the whole model in float64.
serve-lose  the same on 4 ranks, with build, and rank 2 SIGKILLs itself midway.
close-lose  4 ranks, with build: rank 2's process is SIGKILLed 0.2 s after its stage
         returned the last micro-batch's output; rank 0 waits 0.6 s after run() and calls
         close(), which meets the loss; then every survivor all-reduces a one.
stall    2 ranks: rank 1's stage is fast (so it runs on the event loop's thread) until
         one micro-batch takes twice the peer timeout; rank 0 checks every output, and
         rank 1 prints the thread the slow call ran on.
regrow   4 members and a newcomer that asks member 0 to join before the run: rank 2
         dies mid-run, the survivors finish it on 3 ranks with the newcomer still waiting,
         then admit() it, and a new pipeline of 4 (built on every rank, the newcomer's
         too) gives the unsplit model's outputs.
abandon  4 ranks, with build: rank 0 stops a run after its first batch; rank 2 dies on its
         fifth micro-batch, one of those left in the pipe; rank 0's next run drains,
         meets the loss, and runs on the re-formed ring.
"""

import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import torch

import ringlib
from ringlib.runtime.pipeline import Pipeline
from ringlib.runtime.splitting import split_sequential
from ringlib.runtime.stages import OnnxStage, TorchStage, export_onnx

KILL_AFTER = 7


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


def equal(ring, seed: int, onnx: bool) -> None:
    """One stage a rank; the last writes into its input in place and returns it; with
    `onnx`, rank 1 runs its part exported to ONNX, by onnxruntime."""
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
    if onnx and ring.rank == 1:
        exported = export_onnx(parts[1], torch.randn(2, 256),
                               os.path.join(tempfile.mkdtemp(prefix="rl-onnx-"), "stage.onnx"))
        parts[1] = OnnxStage(exported)
        shutil.rmtree(exported.parent)  # onnxruntime has read it
    stage = last if ring.rank == ring.world_size - 1 else \
        parts[0] if ring.rank == 0 else middle(parts[ring.rank])
    pipe = Pipeline(ring, stage, micro_batch=16, max_in_flight=6)
    if ring.rank == 0:
        batches = batches_of(seed)
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


def batches_of(seed: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.standard_normal((int(rows), 256)).astype(np.float32))
            for rows in rng.integers(1, 70, 40)]


def builder(ring, seed: int, kill_after: int = KILL_AFTER):
    """build(rank, world_size) for the MLP's stages; in rank 2's process, a stage that
    SIGKILLs the process after `kill_after` micro-batches."""
    served, victim_process = [], ring.rank == 2

    def build(rank: int, world_size: int):
        stage = TorchStage(split_sequential(mlp(seed), world_size)[rank])
        if not victim_process:
            return stage

        def victim(x: torch.Tensor) -> torch.Tensor:
            served.append(1)
            if len(served) > kill_after:
                time.sleep(0.5)  # rank 0 has abandoned its run meanwhile (abandon)
                os.kill(os.getpid(), signal.SIGKILL)
            return stage(x)
        return victim
    return build


def survive(ring, seed: int, rebuilds: bool) -> None:
    """Rank 2 dies mid-run; with `rebuilds`, the others re-split the model and finish."""
    build = builder(ring, seed)
    options = {"build": build} if rebuilds else {"stage": build(ring.rank, ring.world_size)}
    pipe = Pipeline(ring, micro_batch=16, max_in_flight=4, timeout=30, **options)
    try:
        if ring.rank == 0:
            batches, reference = batches_of(seed), mlp(seed).double()
            outputs = list(pipe.run(batches))  # every one, once, in order
            with torch.inference_mode():
                for batch, out in zip(batches, outputs, strict=True):
                    torch.testing.assert_close(out.double(), reference(batch.double()),
                                               rtol=1e-4, atol=1e-4)
            pipe.close()
            print(f"outputs equal; world {ring.world_size}, generation {ring.generation}",
                  flush=True)
        else:
            pipe.serve()
            print(f"served to the end as rank {ring.rank} of {ring.world_size}", flush=True)
    except ringlib.PeerLost as exc:
        print(f"PeerLost: {exc}", flush=True)


def check_run(pipe: Pipeline, seed: int) -> None:
    """Rank 0: the seeded batches through `pipe`, every output against the model in float64."""
    batches, reference = batches_of(seed), mlp(seed).double()
    outputs = list(pipe.run(batches))
    with torch.inference_mode():
        for batch, out in zip(batches, outputs, strict=True):
            torch.testing.assert_close(out.double(), reference(batch.double()),
                                       rtol=1e-4, atol=1e-4)


def close_lose(ring, seed: int) -> None:
    last = sum(-(-len(b) // 16) for b in batches_of(seed))
    calls = []

    def build(rank: int, world_size: int):
        stage = TorchStage(split_sequential(mlp(seed), world_size)[rank])
        if ring.rank != 2:
            return stage

        def victim(x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            if len(calls) == last:
                threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGKILL)).start()
            return stage(x)
        return victim
    pipe = Pipeline(ring, build=build, micro_batch=16, max_in_flight=4, timeout=30)
    if ring.rank == 0:
        check_run(pipe, seed)
        time.sleep(0.6)
        pipe.close()
        print(f"closed; world {ring.world_size}, generation {ring.generation}", flush=True)
    else:
        pipe.serve()
    total = ring.all_reduce(np.ones(1, np.float32))
    print(f"all-reduced {total[0]:g} on rank {ring.rank} of {ring.world_size}", flush=True)


def stall(ring) -> None:
    """A long call on the loop's thread: the heartbeats come from a thread of their own,
    so nobody takes this rank for lost."""
    calls, slow_on = [], []

    def stage(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 8:
            slow_on.append(threading.current_thread().name)
            time.sleep(2 * ring.ring.settings.peer_timeout)  # the GIL free, as torch's ops leave it
        return x * 2
    pipe = Pipeline(ring, stage if ring.rank == 1 else (lambda x: x + 1), micro_batch=4,
                    timeout=30)
    if ring.rank == 0:
        batches = [torch.full((8, 3), float(k)) for k in range(10)]
        outputs = list(pipe.run(batches))
        assert all(torch.equal(out, (b + 1) * 2) for b, out in zip(batches, outputs, strict=True))
        pipe.close()
        print(f"outputs equal, world {ring.world_size}, generation {ring.generation}", flush=True)
    else:
        pipe.serve()
        print(f"the slow call ran on {slow_on}", flush=True)


def regrow(ring, seed: int) -> None:
    options = {"micro_batch": 16, "max_in_flight": 4, "timeout": 30}
    if "RINGLIB_JOIN" not in os.environ:
        pipe = Pipeline(ring, build=builder(ring, seed), **options)
        if ring.rank == 0:
            while ring.waiting() == 0:  # the newcomer asks before the loss
                time.sleep(0.02)
            check_run(pipe, seed)
            pipe.close()
        else:
            pipe.serve()
        print(f"after the loss: world {ring.world_size}, {ring.waiting()} waiting here",
              flush=True)
        print(f"admitted {ring.admit(timeout=30)}", flush=True)
    pipe = Pipeline(ring, build=lambda rank, world_size: TorchStage(
        split_sequential(mlp(seed), world_size)[rank]), **options)
    if ring.rank == 0:
        check_run(pipe, seed)
        pipe.close()
        print(f"outputs equal after regrowing; world {ring.world_size}, generation "
              f"{ring.generation}", flush=True)
    else:
        pipe.serve()
        print(f"served as rank {ring.rank} of {ring.world_size}", flush=True)


def abandon(ring, seed: int) -> None:
    pipe = Pipeline(ring, build=builder(ring, seed, kill_after=4), micro_batch=16,
                    max_in_flight=4, timeout=30)
    if ring.rank != 0:
        pipe.serve()
        print(f"served to the end as rank {ring.rank} of {ring.world_size}", flush=True)
        return
    batches, reference = batches_of(seed), mlp(seed).double()
    for _ in pipe.run([torch.ones(64, 256)] * 3):
        break  # its other micro-batches are left in the pipe
    outputs = list(pipe.run(batches))
    with torch.inference_mode():
        for batch, out in zip(batches, outputs, strict=True):
            torch.testing.assert_close(out.double(), reference(batch.double()),
                                       rtol=1e-4, atol=1e-4)
    pipe.close()
    print(f"outputs equal; world {ring.world_size}, generation {ring.generation}", flush=True)


def serve(ring, seed: int, lose: bool) -> None:
    """Threads submit requests through the blocking facade; with `lose`, rank 2 dies
    midway and the pipeline re-splits over the others."""
    import random
    import threading

    from ringlib.runtime.serving import Serving
    pipe = Pipeline(ring, build=builder(ring, seed) if lose else
                    lambda rank, world_size: split_sequential(mlp(seed), world_size)[rank],
                    micro_batch=8, timeout=30)
    if ring.rank != 0:
        pipe.serve()
        return
    serving, reference, failures = Serving(pipe, max_rows=24, max_wait=0.002), \
        mlp(seed).double(), []

    def client(n: int) -> None:
        rng = random.Random(seed + n)
        for _ in range(15):
            time.sleep(rng.random() * 0.01)
            x = torch.randn(rng.randint(1, 12), 256)
            y = serving.submit(x).result(timeout=30)
            with torch.inference_mode():
                if not torch.allclose(y.double(), reference(x.double()), rtol=1e-4, atol=1e-4):
                    failures.append(n)
    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    serving.close()
    pipe.close()
    latencies = sorted(serving.latencies)
    print(f"served {len(latencies)} requests, {len(failures)} wrong, world "
          f"{ring.world_size}; latency p50 {latencies[len(latencies) // 2] * 1e3:.2f} ms",
          flush=True)


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
        if mode in ("equal", "equal-onnx"):
            equal(ring, seed, mode == "equal-onnx")
        elif mode == "abandon":
            abandon(ring, seed)
        elif mode == "close-lose":
            close_lose(ring, seed)
        elif mode == "stall":
            stall(ring)
        elif mode == "regrow":
            regrow(ring, seed)
        elif mode in ("serve", "serve-lose"):
            serve(ring, seed, mode == "serve-lose")
        elif mode in ("survive", "lost"):
            survive(ring, seed, mode == "survive")
        else:
            die(ring)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
