"""Data-parallel training through ringlib.torch: 2 and 3 real processes, each on its shard,
must end where one process training on the whole batch ends, bit-identical to each other."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

import ringlib
import ringlib.torch as rt
from ring_harness import ringlib_env, run_ranks
from ringlib import InvalidArgument, RingError
from ringlib.runtime.buckets import plan_buckets
from ringlib.transport.addresses import local_addresses
from train_peer import new_model, reference

pytestmark = pytest.mark.timeout(180)
PEER = str(Path(__file__).with_name("train_peer.py"))


def train(tmp_path: Path, world: int, mode: str, seed: int) -> list[list[torch.Tensor]]:
    peers = local_addresses(world, "tcp", "")
    finished = run_ranks([PEER, mode, str(seed), str(tmp_path)],
                         [ringlib_env(r, world, peers) for r in range(world)], timeout=150)
    assert all(f.returncode == 0 for f in finished), "\n".join(f.stderr[-3000:] for f in finished)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def assert_identical_across_ranks(per_rank: list[list[torch.Tensor]]) -> None:
    for rank, params in enumerate(per_rank[1:], start=1):
        for a, b in zip(per_rank[0], params):
            assert torch.equal(a, b), f"rank {rank} differs from rank 0"


# 2 ranks train in the compressed tests below (plain steps, compressed); the rest with
# make test-long
@pytest.mark.parametrize("world, mode", [
    (3, "accumulate"), *(pytest.param(w, m, marks=pytest.mark.long)
                         for w, m in ((2, "plain"), (2, "accumulate"), (3, "plain")))])
def test_shards_on_peers_train_like_one_process_on_the_whole_batch(tmp_path, world, mode, seed):
    per_rank = train(tmp_path, world, mode, seed)
    assert_identical_across_ranks(per_rank)
    expected = reference(seed, world, mode)
    for got, want in zip(per_rank[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The layer no shard uses kept rank 0's initial weights: no gradient, so no weight decay.
    initial = list(new_model(seed).parameters())
    assert torch.equal(per_rank[0][-1], initial[-1]) and torch.equal(per_rank[0][-2], initial[-2])
    assert not torch.equal(per_rank[0][-3], initial[-3]), "the rank-0-only branch must train"


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_compressed_gradients_stay_close_and_identical(tmp_path, mode, seed):
    per_rank = train(tmp_path, 2, mode, seed)
    assert_identical_across_ranks(per_rank)
    expected = reference(seed, 2, "plain")
    tolerance = {"fp16": 2e-3, "bf16": 2e-2}[mode]
    for got, want in zip(per_rank[0], expected):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_buckets_follow_reverse_registration_order_one_dtype_each():
    params = [("float32", 100, 4), ("float64", 10, 8), ("float32", 300, 4), ("float32", 50, 4)]
    plans = plan_buckets(params, bucket_bytes=1000)
    assert [(p.dtype, [s.param for s in p.slots]) for p in plans] == \
        [("float32", [3, 2]), ("float64", [1]), ("float32", [0])]
    first = plans[0]
    assert [(s.offset, s.flag) for s in first.slots] == [(0, 350), (50, 351)]
    assert first.size == 352


def test_the_averager_refuses_what_it_cannot_do():
    model = torch.nn.Linear(3, 3)
    with ringlib.init(0, 1) as ring:
        with pytest.raises(InvalidArgument, match="compression"):
            rt.GradientAverager(model, ring, compression="int8")
        averager = rt.GradientAverager(model, ring, bucket_mb=1e-6)
        model(torch.ones(2, 3)).sum().backward()
        with pytest.raises(RingError, match="no_sync"):
            model(torch.ones(2, 3)).sum().backward()  # twice without synchronize
        averager.remove()

    async def with_async_ring():
        async with ringlib.connect(0, 1) as ring:
            rt.GradientAverager(model, ring)
    with pytest.raises(InvalidArgument, match="ringlib.init"):
        asyncio.run(with_async_ring())


def test_a_ring_of_one_leaves_gradients_as_backward_made_them():
    model = torch.nn.Linear(4, 2)
    with ringlib.init(0, 1) as ring:
        averager = rt.GradientAverager(model, ring)
        model(torch.ones(3, 4)).sum().backward()
        expected = [p.grad.clone() for p in model.parameters()]
        averager.synchronize()
        assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected))
