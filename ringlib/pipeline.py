"""ringlib.pipeline: pipeline-parallel inference over the ring's transport.

    from ringlib.pipeline import Pipeline, TorchStage, OnnxStage, split_sequential
    ring = ringlib.init()
    parts = split_sequential(model, ring.world_size)  # or split_traced(model, example, at=[...])
    pipe = Pipeline(ring, TorchStage(parts[ring.rank]), micro_batch=8, max_in_flight=4)
    if ring.rank == 0:
        for out in pipe.run(batches): ...
        pipe.close()
    else:
        pipe.serve()
"""

from ringlib.errors import StageError
from ringlib.runtime.onnx_splitting import split_onnx
from ringlib.runtime.pipeline import Pipeline
from ringlib.runtime.serving import Serving
from ringlib.runtime.splitting import split_sequential
from ringlib.runtime.stages import OnnxStage, TorchStage, as_stage, export_onnx
from ringlib.runtime.traced_splitting import split_traced

__all__ = ["OnnxStage", "Pipeline", "Serving", "StageError", "TorchStage", "as_stage", "export_onnx",
           "split_onnx", "split_sequential", "split_traced"]
