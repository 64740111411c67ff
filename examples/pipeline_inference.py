"""Pipeline-parallel inference: an MLP cut into one stage per peer.

    ringlib launch -n 2 -- python examples/pipeline_inference.py
    ringlib launch -n 3 -- python examples/pipeline_inference.py --onnx   # ONNX stages
    ringlib launch -n 3 --elastic -- python examples/pipeline_inference.py --lose-rank 2

Rank 0 feeds batches of random inputs through the pipeline and checks every output
against the whole model run in one piece; the other ranks serve their stage until rank 0
closes the pipeline. Every rank can build every stage of any ring size, so a pipeline
that loses a stage re-splits the model over the survivors and finishes: --lose-rank R
makes rank R's process end itself midway (under `launch --elastic`, which lets the
others go on).
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time

import torch

import ringlib
from ringlib.pipeline import OnnxStage, Pipeline, TorchStage, export_onnx, split_sequential


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--onnx", action="store_true", help="run the stages with onnxruntime")
    parser.add_argument("--lose-rank", type=int, default=None, metavar="R",
                        help="rank R's process kills itself after 5 micro-batches")
    args = parser.parse_args()

    torch.manual_seed(0)  # the same model on every rank
    model = torch.nn.Sequential(*[m for _ in range(6)
                                  for m in (torch.nn.Linear(256, 256), torch.nn.GELU())])
    with ringlib.init() as ring, tempfile.TemporaryDirectory() as tmp:
        doomed, served = ring.rank == args.lose_rank, []

        def build(rank: int, world_size: int):
            """This rank's stage of a ring of world_size ranks."""
            part = split_sequential(model, world_size)[rank]
            stage = (OnnxStage(export_onnx(part, torch.zeros(1, 256), f"{tmp}/stage.onnx"))
                     if args.onnx else TorchStage(part))
            if not doomed:
                return stage

            def dying(x: torch.Tensor) -> torch.Tensor:
                served.append(x)
                if len(served) > 5:
                    os.kill(os.getpid(), signal.SIGKILL)
                return stage(x)
            return dying
        pipe = Pipeline(ring, build=build, micro_batch=args.micro_batch, max_in_flight=4)
        if ring.rank != 0:
            pipe.serve()
            return
        batches = [torch.randn(args.batch, 256) for _ in range(args.batches)]
        start = time.perf_counter()
        outputs = list(pipe.run(batches))
        elapsed = time.perf_counter() - start
        pipe.close()
        with torch.inference_mode():
            worst = max(float((out - model(b)).abs().max()) for out, b in zip(outputs, batches))
        print(f"{len(outputs)} batches of {args.batch} through {ring.world_size} "
              f"{'ONNX' if args.onnx else 'torch'} stages in {elapsed:.2f} s"
              f"{f' on the re-formed ring (generation {ring.generation})' if ring.generation else ''}; "
              f"max |difference| from the whole model: {worst:.1e}")


if __name__ == "__main__":
    main()
