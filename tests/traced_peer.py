"""A rank of a pipeline over a model cut by split_traced: `python traced_peer.py SEED`
under RINGLIB_*.

Every rank builds the same seeded Branchy (dicts in and out, skip connections across the
cuts) and cuts it into one stage per rank at the same points; rank 0 runs batches
through the pipeline, checks each against the whole model in float64 and prints
"outputs equal".
"""

import copy
import sys

import torch

import ringlib
from ringlib.pipeline import Pipeline, TorchStage, split_traced
from traced_models import branchy, inputs

POINTS = ["blocks.1", "right.1", "head"]  # where stages 1, 2, 3 start


def main(seed: int) -> None:
    model = branchy(seed)
    generator = torch.Generator().manual_seed(seed)
    with ringlib.init() as ring:
        stages = split_traced(model, inputs(generator, 2), at=POINTS[:ring.world_size - 1])
        pipe = Pipeline(ring, TorchStage(stages[ring.rank]), micro_batch=4)
        if ring.rank != 0:
            pipe.serve()
            return
        batches = [inputs(generator, rows) for rows in (1, 7, 12)]
        reference = copy.deepcopy(model).double()
        with torch.inference_mode():
            for batch, out in zip(batches, pipe.run(batches), strict=True):
                expected = reference(**{name: t.double() for name, t in batch.items()})
                for name in expected:
                    torch.testing.assert_close(out[name].double(), expected[name],
                                               rtol=1e-4, atol=1e-4)
        pipe.close()
        print("outputs equal", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
