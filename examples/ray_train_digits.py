"""The digits classifier trained under Ray Train, on ringlib's torch.distributed backend.

    python examples/ray_train_digits.py --workers 2                # a local Ray instance
    python examples/ray_train_digits.py --address auto --workers 8 # a running Ray cluster

Ray Train's TorchTrainer places the workers, sets MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE and LOCAL_RANK on each, and calls init_process_group with TorchConfig's
backend: "ringlib" here (--backend gloo to compare). The group forms through the store
that torch opens at MASTER_PORT, so ringlib needs no port of its own. Each worker
process registers the backend before that, from Ray's worker_process_setup_hook
(ringlib.torch.register). The training loop is train_digits.py's, with torch's unmodified
DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import os
import sys

import ray
from ray.train import ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

HERE = os.path.dirname(os.path.abspath(__file__))


def train_loop(config: dict) -> None:
    import torch.distributed as dist
    from train_digits import ddp_parts, fit

    accuracy = fit(ddp_parts(config["seed"]), config["epochs"], config["batch"], config["seed"])
    if dist.get_rank() == 0:
        print(f"backend {dist.get_backend()}: final test accuracy {accuracy:.2%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=60, help="global batch (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["ringlib", "gloo"], default="ringlib")
    parser.add_argument("--address", help="a Ray cluster to join (default: start one here)")
    args = parser.parse_args()

    # The workers import train_digits from here, and register "ringlib" when they start.
    runtime_env = {"worker_process_setup_hook": "ringlib.torch.register",
                   "env_vars": {"PYTHONPATH": os.pathsep.join([HERE, *sys.path])}}
    ray.init(address=args.address, runtime_env=runtime_env, include_dashboard=False,
             num_cpus=None if args.address else max(2, args.workers))
    try:
        trainer = TorchTrainer(
            train_loop, train_loop_config=vars(args),
            scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
            torch_config=TorchConfig(backend=args.backend))
        trainer.fit()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
