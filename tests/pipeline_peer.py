"""A rank of a pipeline in its own process: `python pipeline_peer.py MODE` under RINGLIB_*.

die   rank 1 serves one micro-batch and then its process ends; rank 0 must get a clear
      error instead of waiting forever, and prints it.
"""

import os
import sys

import torch

import ringlib
from ringlib.runtime.pipeline import Pipeline


def main(mode: str) -> None:
    with ringlib.init() as ring:
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


if __name__ == "__main__":
    main(sys.argv[1])
