"""Pipeline-parallel inference: stages on ranks of a real ring (inproc sockets in one
process here, real processes at the end), against the unsplit model."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import ringlib
from netns import can_unshare, namespaced
from ring_harness import Finished, ringlib_env, run_ranks
from ringlib import StageError
from ringlib.runtime.pipeline import Pipeline
from ringlib.runtime.serving import Serving
from ringlib.runtime.splitting import split_sequential
from ringlib.runtime.stages import OnnxStage, TorchStage, export_onnx
from ringlib.transport.addresses import local_addresses

pytestmark = pytest.mark.timeout(120)
PEER = Path(__file__).with_name("pipeline_peer.py")
FAST = {"RINGLIB_PEER_TIMEOUT": "1.5", "RINGLIB_HEARTBEAT_S": "0.25"}


def mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                               torch.nn.Tanh(), torch.nn.Linear(32, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 5))


@contextlib.asynccontextmanager
async def ring_of(n: int):
    peers = [f"inproc://{uuid.uuid4().hex[:8]}-{i}" for i in range(n)]
    rings = await asyncio.gather(*[ringlib.connect(r, n, peers, timeout=10) for r in range(n)])
    try:
        yield rings
    finally:
        await asyncio.gather(*[r.close() for r in rings])


async def run_pipeline(stages: list, batches: list, return_exceptions: bool = False,
                       **kwargs) -> list:
    """Rank 0 runs `batches` through one stage per rank; the others serve until it closes."""
    async with ring_of(len(stages)) as rings:
        pipes = [Pipeline(ring, stage, **kwargs) for ring, stage in zip(rings, stages)]
        servers = [asyncio.ensure_future(p.aserve()) for p in pipes[1:]]
        try:
            outputs = [out async for out in pipes[0].arun(batches,
                                                          return_exceptions=return_exceptions)]
        finally:
            await pipes[0].aclose()
            await asyncio.gather(*servers)
        return outputs


def batches_of(rng: np.random.Generator, sizes: list[int]) -> list[torch.Tensor]:
    return [torch.from_numpy(rng.standard_normal((n, 12)).astype(np.float32)) for n in sizes]


@pytest.mark.parametrize("world", [1, 2, 3])
async def test_torch_stages_give_the_unsplit_models_outputs_in_order(world, seed, rng):
    model = mlp(seed)
    batches = batches_of(rng, [1, 7, 8, 13, 20])  # partial last micro-batches included
    outputs = await run_pipeline(split_sequential(model, world), batches, micro_batch=4)
    with torch.inference_mode():
        for out, batch in zip(outputs, batches, strict=True):
            torch.testing.assert_close(out, model(batch), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kinds", [("onnx", "onnx"), ("torch", "onnx", "torch"),
                                   ("onnx", "torch", "onnx")])
async def test_onnx_and_mixed_pipelines_match_the_model(kinds, tmp_path, seed, rng):
    model = mlp(seed)
    parts = split_sequential(model, len(kinds))
    example = torch.zeros(3, 12)
    stages = []
    for i, (kind, part) in enumerate(zip(kinds, parts)):
        if kind == "onnx":
            stages.append(OnnxStage(export_onnx(part, example, tmp_path / f"stage{i}.onnx")))
        else:
            stages.append(TorchStage(part))
        with torch.inference_mode():
            example = part(example)
    batches = batches_of(rng, [5, 8, 3])
    outputs = await run_pipeline(stages, batches, micro_batch=3)
    with torch.inference_mode():
        for out, batch in zip(outputs, batches, strict=True):
            torch.testing.assert_close(out, model(batch), rtol=1e-5, atol=1e-5)


async def test_order_holds_when_stages_take_random_time(seed, rng):
    model = mlp(seed)
    parts = split_sequential(model, 3)
    delays = random.Random(seed)

    def slow(part):
        def stage(x):
            time.sleep(delays.random() * 0.01)
            with torch.inference_mode():
                return part(x)
        return stage
    batches = batches_of(rng, [9, 2, 11, 4, 6, 1])
    outputs = await run_pipeline([slow(p) for p in parts], batches, micro_batch=2, max_in_flight=3)
    with torch.inference_mode():
        for out, batch in zip(outputs, batches, strict=True):
            torch.testing.assert_close(out, model(batch), rtol=1e-6, atol=1e-6)


async def test_boundaries_carry_tuples_and_dicts_of_any_dtype(rng):
    def first(x):
        return {"half": x.to(torch.float16), "mask": x > 0, "index": torch.arange(len(x))}

    def second(d):
        return d["half"].to(torch.bfloat16) * 2, d["mask"].sum(1), d["index"] + 1

    batches = batches_of(rng, [6, 5])
    outputs = await run_pipeline([first, second], batches, micro_batch=4)
    for (doubled, positives, index), batch in zip(outputs, batches, strict=True):
        assert doubled.dtype == torch.bfloat16 and index.dtype == torch.int64
        torch.testing.assert_close(doubled, (batch.to(torch.float16).to(torch.bfloat16) * 2))
        assert torch.equal(positives, (batch > 0).sum(1))
        assert torch.equal(index, torch.cat([torch.arange(4), torch.arange(len(batch) - 4)]) + 1)


async def test_a_failing_stage_names_its_rank_and_batch_and_later_batches_still_flow(rng):
    def fragile(x):
        if (x == 999).any():
            raise ValueError("cannot digest 999")
        return x + 1

    batches = batches_of(rng, [4, 4, 4])
    batches[1][2, 0] = 999
    outputs = await run_pipeline([lambda x: x, fragile, lambda x: x * 2], batches, micro_batch=2,
                                 return_exceptions=True)
    assert isinstance(outputs[1], StageError)
    assert (outputs[1].rank, outputs[1].batch) == (1, 1)
    assert "stage on rank 1 failed on batch 1: ValueError: cannot digest 999" in str(outputs[1])
    torch.testing.assert_close(outputs[0], (batches[0] + 1) * 2)
    torch.testing.assert_close(outputs[2], (batches[2] + 1) * 2)


async def test_without_return_exceptions_the_error_is_raised_and_the_pipe_carries_on(rng):
    async with ring_of(2) as rings:
        head = Pipeline(rings[0], lambda x: x, micro_batch=1)
        tail = Pipeline(rings[1], lambda x: 1 / 0 if (x < -100).any() else x)
        server = asyncio.ensure_future(tail.aserve())
        bad = batches_of(np.random.default_rng(0), [3])[0] - 1000
        with pytest.raises(StageError, match="rank 1 failed on batch 0: ZeroDivisionError"):
            async for _ in head.arun([bad, torch.ones(2, 12)]):
                pass
        good = [out async for out in head.arun([torch.ones(2, 12)])]
        assert torch.equal(good[0], torch.ones(2, 12))
        await head.aclose()
        await server


async def test_backpressure_bounds_what_waits_at_a_slow_stage():
    waiting = []
    async with ring_of(2) as rings:
        def slow(x):
            waiting.append(len(rings[1].endpoint.inbox))
            time.sleep(0.01)
            return x
        head, tail = Pipeline(rings[0], lambda x: x, micro_batch=1, max_in_flight=2), Pipeline(rings[1], slow)
        server = asyncio.ensure_future(tail.aserve())
        outputs = [out async for out in head.arun([torch.ones(40, 3)])]
        await head.aclose()
        await server
    assert outputs[0].shape == (40, 3)
    assert max(waiting) <= 2 * 2, f"messages kept at the slow stage: {max(waiting)}"


def in_place(finished: list, log: str) -> list[bool]:
    """For each serving rank: whether it read every input in place (in shared memory)
    to the last, which it can only if it gave back what it read; False if it read none
    there."""
    assert all(f.returncode == 0 for f in finished), log
    assert "outputs equal" in finished[0].stdout, log
    assert all("held at the end: 0" in f.stdout for f in finished), log
    seen = []
    for f in finished[1:]:
        inputs = re.search(r"inputs in shared memory: (\d+) of (\d+); last (\w+)", f.stdout)
        placed, total, last = int(inputs[1]), int(inputs[2]), inputs[3] == "True"
        assert total >= 40 and placed in (0, total) and last == (placed == total), log
        seen.append(placed == total)
    return seen


@pytest.mark.parametrize("ranks,link,env", [
    # 3 torch stages (make test-long): the ONNX ones below have torch stages beside theirs
    (2, "shared", {}), pytest.param(3, "shared", {}, marks=pytest.mark.long),
    pytest.param(3, "tcp", {"RINGLIB_SHM_BYTES": "0"}, marks=pytest.mark.long),
    # a ring of 256 KiB holds 16 micro-batches: one never released would fill it
    (3, "small ring", {"RINGLIB_SHM_BYTES": str(256 << 10)}),
    (3, "shared, rank 1 ONNX", {}), (3, "tcp, rank 1 ONNX", {"RINGLIB_SHM_BYTES": "0"})])
def test_processes_stream_activations_through_shared_memory_or_tcp_and_equal_the_model(
        ranks, link, env):
    seed = int.from_bytes(os.urandom(4), "little")
    mode = "equal-onnx" if "ONNX" in link else "equal"
    with tempfile.TemporaryDirectory(prefix="rl-") as ipc:
        peers = local_addresses(ranks, "tcp", ipc)
        envs = [{**ringlib_env(r, ranks, peers), **env} for r in range(ranks)]
        finished = run_ranks([str(PEER), mode, str(seed)], envs, timeout=90)
    log = f"seed {seed}, {link}: " + "\n".join(f.stdout + f.stderr[-1500:] for f in finished)
    assert in_place(finished, log) == [not link.startswith("tcp")] * (ranks - 1), log


@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare to give ranks a "
                    "/dev/shm of their own (a second host as far as shared memory goes)")
def test_a_pipeline_over_two_hosts_takes_shared_memory_within_each_and_tcp_across(tmp_path):
    """Ranks 0, 1 share this /dev/shm, ranks 2, 3 another: 0 -> 1 and 2 -> 3 go through
    shared memory, 1 -> 2 and 3 -> 0 over tcp."""
    seed = int.from_bytes(os.urandom(4), "little")
    peers = local_addresses(4, "tcp", "")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RINGLIB_")}
    envs = [{**base, **ringlib_env(r, 4, peers)} for r in range(4)]
    logs = [tmp_path / f"r{r}.log" for r in range(4)]
    rank = [sys.executable, str(PEER), "equal", str(seed)]
    run_2, run_3 = (f"RINGLIB_RANK={r} {' '.join(rank)} > {logs[r]} 2>&1" for r in (2, 3))
    host_b = f"{run_2} & two=$!; {run_3}; three=$?; wait $two && exit $three"  # both 0, or not
    procs = [subprocess.Popen(rank, env=envs[r], stdout=open(logs[r], "w"),
                              stderr=subprocess.STDOUT) for r in (0, 1)]
    procs.append(subprocess.Popen(namespaced(["sh", "-c", host_b]), env=envs[2]))
    try:
        codes = [p.wait(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
    finished = [Finished(r, codes[min(r, 2)], logs[r].read_text(), "") for r in range(4)]
    log = f"seed {seed}: " + "\n".join(f"--- rank {f.rank}\n{f.stdout}" for f in finished)
    assert in_place(finished, log) == [True, False, True], log


def run_survivors(mode: str) -> tuple[list, str]:
    """4 ranks of pipeline_peer.py MODE, in which rank 2 SIGKILLs itself: each process's
    outcome and their log, once rank 2 was killed and the others exited 0."""
    seed = int.from_bytes(os.urandom(4), "little")
    with tempfile.TemporaryDirectory(prefix="rl-") as ipc:
        peers = local_addresses(4, "tcp", ipc)
        envs = [{**ringlib_env(r, 4, peers), **FAST} for r in range(4)]
        finished = run_ranks([str(PEER), mode, str(seed)], envs, timeout=90,
                             expendable=frozenset({2}))
    log = f"seed {seed}: " + "\n".join(f"--- rank {f.rank} exit {f.returncode}\n"
                                       f"{f.stdout}{f.stderr[-1500:]}" for f in finished)
    assert finished[2].returncode == -signal.SIGKILL, log
    assert all(finished[r].returncode == 0 for r in (0, 1, 3)), log
    return finished, log


@pytest.mark.long  # the abandon test below ends the same way, and so does the example's
def test_a_stage_killed_mid_run_is_re_split_over_the_survivors_and_run_completes():
    finished, log = run_survivors("survive")
    assert "outputs equal; world 3, generation 1" in finished[0].stdout, log
    assert "served to the end as rank 1 of 3" in finished[1].stdout, log
    assert "served to the end as rank 2 of 3" in finished[3].stdout, log


def test_a_stage_lost_while_the_pipeline_closes_is_met_by_every_survivor():
    """Without the barrier at the end, rank 1 would have left serve() with the word to
    stop, and ranks 0 and 3 would wait in vain for it to re-form."""
    finished, log = run_survivors("close-lose")
    assert "closed; world 3, generation 1" in finished[0].stdout, log
    for rank, process in enumerate((0, 1, 3)):
        assert f"all-reduced 3 on rank {rank} of 3" in finished[process].stdout, log


def test_a_stage_lost_while_an_abandoned_run_drains_leaves_the_next_run_whole():
    finished, log = run_survivors("abandon")
    assert "outputs equal; world 3, generation 1" in finished[0].stdout, log


def test_a_newcomer_waits_out_the_recovery_and_joins_the_next_pipeline():
    """Without admit=False in the pipeline's re-form, the newcomer would be let in halfway
    through the recovery, and the survivors' resume broadcast would wait for it."""
    seed = int.from_bytes(os.urandom(4), "little")
    with tempfile.TemporaryDirectory(prefix="rl-") as ipc:
        peers = local_addresses(4, "tcp", ipc)
        envs = [{**ringlib_env(r, 4, peers), **FAST} for r in range(4)]
        envs.append({**FAST, "RINGLIB_JOIN": peers[0]})
        finished = run_ranks([str(PEER), "regrow", str(seed)], envs, timeout=90,
                             expendable=frozenset({2}))
    log = f"seed {seed}: " + "\n".join(f"--- process {f.rank} exit {f.returncode}\n"
                                       f"{f.stdout}{f.stderr[-1500:]}" for f in finished)
    assert finished[2].returncode == -signal.SIGKILL, log
    assert all(finished[r].returncode == 0 for r in (0, 1, 3, 4)), log
    assert "after the loss: world 3, 1 waiting here" in finished[0].stdout, log
    assert all("admitted 1" in finished[r].stdout for r in (0, 1, 3)), log
    assert "outputs equal after regrowing; world 4, generation 2" in finished[0].stdout, log
    assert "served as rank 3 of 4" in finished[4].stdout, log


def test_a_stage_on_the_loops_thread_that_stalls_past_the_peer_timeout_is_not_lost():
    seed = int.from_bytes(os.urandom(4), "little")
    with tempfile.TemporaryDirectory(prefix="rl-") as ipc:
        peers = local_addresses(2, "tcp", ipc)
        finished = run_ranks([str(PEER), "stall", str(seed)],
                             [{**ringlib_env(r, 2, peers), **FAST} for r in range(2)], timeout=60)
    log = "\n".join(f"--- rank {f.rank} exit {f.returncode}\n{f.stdout}{f.stderr[-1500:]}"
                    for f in finished)
    assert all(f.returncode == 0 for f in finished), log
    assert "outputs equal, world 2, generation 0" in finished[0].stdout, log
    assert "the slow call ran on ['ringlib-loop']" in finished[1].stdout, log


def test_a_stage_lost_without_build_raises_peer_lost_naming_it():
    finished, log = run_survivors("lost")
    for r in (0, 1, 3):
        assert "PeerLost: pipeline on rank" in finished[r].stdout, log
    assert "the stage on rank 2" in finished[0].stdout and "Pipeline(build=...)" in \
        finished[0].stdout, log


def test_serving_in_processes_answers_threads_through_the_blocking_facade():
    seed = int.from_bytes(os.urandom(4), "little")
    with tempfile.TemporaryDirectory(prefix="rl-") as ipc:
        peers = local_addresses(2, "tcp", ipc)
        finished = run_ranks([str(PEER), "serve", str(seed)],
                             [ringlib_env(r, 2, peers) for r in range(2)], timeout=90)
    log = f"seed {seed}: " + "\n".join(f.stdout + f.stderr[-1500:] for f in finished)
    assert all(f.returncode == 0 for f in finished), log
    assert "served 60 requests, 0 wrong, world 2" in finished[0].stdout, log


def test_serving_goes_on_through_a_lost_stage_and_answers_every_request():
    finished, log = run_survivors("serve-lose")
    assert "served 60 requests, 0 wrong, world 3" in finished[0].stdout, log


def test_a_stage_process_that_dies_gives_rank_0_a_clear_error(tmp_path):
    peers = local_addresses(2, "tcp", "")
    envs = [ringlib_env(r, 2, peers) for r in range(2)]
    finished = run_ranks([str(PEER), "die"], envs, timeout=60)
    head = finished[0]
    assert head.returncode == 0, head.stderr
    assert "CollectiveTimeout: pipeline on rank 0: no output for batch" in head.stdout
    assert peers[1] in head.stdout


async def test_a_batch_that_is_not_an_activation_fails_without_a_hang():
    async with ring_of(2) as rings:
        head, tail = Pipeline(rings[0], lambda x: x), Pipeline(rings[1], lambda x: x)
        server = asyncio.ensure_future(tail.aserve())
        with pytest.raises(ringlib.InvalidArgument, match="tensor, or a tuple or dict"):
            async for _ in head.arun([torch.ones(2, 3), "not a tensor"]):
                pass
        assert [tuple(o.shape) async for o in head.arun([torch.ones(4, 3)])] == [(4, 3)]
        await head.aclose()
        await server


async def test_serving_gathers_requests_arriving_at_random_times_and_answers_each():
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    model = mlp(seed)
    parts = split_sequential(model, 2)
    reference = mlp(seed).double()
    async with ring_of(2) as rings:
        head, tail = Pipeline(rings[0], parts[0], micro_batch=8), Pipeline(rings[1], parts[1])
        server = asyncio.ensure_future(tail.aserve())
        serving = Serving(head, max_rows=16, max_wait=0.003)
        answered: list[int] = []

        async def client(n: int) -> None:
            await asyncio.sleep(rng.random() * 0.05)
            x = torch.randn(rng.randint(1, 9), 12)
            y = await serving.asubmit(x)
            answered.append(n)
            with torch.inference_mode():
                torch.testing.assert_close(y.double(), reference(x.double()), rtol=1e-5,
                                           atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
        started = []
        for n in range(60):
            started.append(asyncio.ensure_future(client(n)))
            await asyncio.sleep(0)
        await asyncio.gather(*started)
        await serving.aclose()
        with pytest.raises(ringlib.RingClosed):
            await serving.asubmit(torch.ones(1, 12))
        await head.aclose()
        await server
    assert len(serving.latencies) == 60 and min(serving.latencies) > 0, f"seed {seed}"
    assert sorted(answered) == list(range(60))


async def test_serving_refuses_requests_that_do_not_stack_and_serves_on():
    async with ring_of(2) as rings:
        head, tail = Pipeline(rings[0], lambda x: x), Pipeline(rings[1], lambda x: x * 2)
        server = asyncio.ensure_future(tail.aserve())
        serving = Serving(head, max_rows=100, max_wait=0.05)
        good, bad = (asyncio.ensure_future(serving.asubmit(torch.ones(2, 3))),
                     asyncio.ensure_future(serving.asubmit(torch.ones(2, 4))))
        with pytest.raises(ringlib.InvalidArgument, match="requests batched together differ"):
            await bad
        with pytest.raises(ringlib.InvalidArgument):
            await good  # gathered with the bad one
        assert (await serving.asubmit(torch.ones(3, 4)) == 2).all()
        with pytest.raises(ringlib.InvalidArgument, match="same first dimension"):
            await serving.asubmit((torch.ones(2, 3), torch.ones(3, 3)))
        await serving.aclose()
        await head.aclose()
        await server
