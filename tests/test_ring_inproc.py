"""Rings of several ranks inside one process, over ZeroMQ's inproc transport: the API's
behaviour, its errors and its concurrency, quickly. Real processes: test_ring_processes.py."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import numpy as np
import pytest
import torch

import ringlib
from ringlib import (CollectiveTimeout, InvalidArgument, InvalidBuffer, MismatchError,
                     PeerLost, RendezvousTimeout, RingClosed, RingError, UnsupportedBuffer, UnsupportedOp)
from ringlib.transport.addresses import free_tcp_ports
from ringlib.transport import Endpoint, Inbox, Message, frames

pytestmark = pytest.mark.timeout(60)


def addresses(n: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"inproc://{run}-{i}" for i in range(n)]


@contextlib.asynccontextmanager
async def ring_of(n: int, **kwargs):
    peers = addresses(n)
    rings = await asyncio.gather(*[ringlib.connect(r, n, peers, timeout=10, **kwargs)
                                   for r in range(n)])
    try:
        yield rings
    finally:
        await asyncio.gather(*[r.close() for r in rings])


async def test_a_ring_of_one_needs_no_sockets_and_leaves_data_as_it_is(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    original = x.copy()
    async with ringlib.connect(0, 1) as ring:
        assert ring.address is None and ring.world_size == 1
        for op in ("sum", "mean", "min", "max", "prod"):
            assert await ring.all_reduce(x, op) is x
        np.testing.assert_array_equal(x, original)
        np.testing.assert_array_equal(await ring.reduce_scatter(x), original.reshape(-1))
        gathered = await ring.all_gather(x)
        assert gathered.shape == (1, 3, 4) and np.array_equal(gathered[0], original)
        await ring.broadcast(x, root=0)
        await ring.barrier()
        with pytest.raises(UnsupportedOp, match="mean is undefined for integer"):
            await ring.all_reduce(np.ones(3, np.int32), "mean")


@pytest.mark.parametrize("world", [2, 3, 4, 5])
async def test_many_collectives_in_flight_at_once_do_not_mix(world, rng):
    sizes = rng.integers(0, 200_000, 12)
    data = [[rng.standard_normal(n).astype(np.float32) for n in sizes] for _ in range(world)]
    expected = [sum(data[r][i].astype(np.float64) for r in range(world)) for i in range(len(sizes))]
    async with ring_of(world, segment_bytes=4096) as rings:
        calls = []
        for r, ring in enumerate(rings):
            for i in range(len(sizes)):
                calls.append(ring.all_reduce(data[r][i]))
                if i % 4 == 0:
                    calls.append(ring.barrier())
        await asyncio.gather(*calls)
    for r in range(world):
        for i in range(len(sizes)):
            np.testing.assert_allclose(data[r][i], expected[i], rtol=1e-5, atol=1e-4,
                                       err_msg=f"rank {r}, collective {i}")
            np.testing.assert_array_equal(data[r][i], data[0][i])


async def test_numpy_and_torch_buffers_can_meet_in_one_collective(rng):
    a = rng.standard_normal(1000)
    b = torch.from_numpy(rng.standard_normal(1000))
    expected = a + b.numpy()
    async with ring_of(2) as (r0, r1):
        await asyncio.gather(r0.all_reduce(a), r1.all_reduce(b))
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b.numpy(), expected)


def read_only() -> np.ndarray:
    x = np.ones(4, np.float32)
    x.setflags(write=False)
    return x


@pytest.mark.parametrize("bad, error, message", [
    (lambda: np.ones(4, np.float32)[::2], InvalidBuffer, "not C-contiguous"),
    (read_only, InvalidBuffer, "read-only"),
    (lambda: [1.0, 2.0], UnsupportedBuffer, "numpy array or torch tensor"),
    (lambda: np.ones(4, np.complex64), UnsupportedBuffer, "complex64"),
])
async def test_bad_buffers_fail_on_the_calling_rank_before_anything_is_sent(bad, error, message):
    buffer = bad()
    async with ring_of(2) as (r0, r1):
        with pytest.raises(error, match=message):
            await r0.all_reduce(buffer)
        # Nothing was sent and no sequence number was used: the ring carries on.
        x0, x1 = np.ones(3), np.ones(3)
        await asyncio.gather(r0.all_reduce(x0), r1.all_reduce(x1))
        assert x0.tolist() == [2.0, 2.0, 2.0]


async def test_bad_arguments_fail_before_anything_is_sent():
    async with ring_of(2) as (r0, _):
        with pytest.raises(UnsupportedOp, match="unknown reduction op 'avg'"):
            await r0.all_reduce(np.ones(3), "avg")
        with pytest.raises(UnsupportedOp, match="integer dtype int64"):
            await r0.all_reduce(np.ones(3, np.int64), "mean")
        with pytest.raises(InvalidArgument, match="root 2 is not a rank"):
            await r0.broadcast(np.ones(3), root=2)
    for beats in ({"heartbeat_s": 0}, {"heartbeat_s": 6}, {"heartbeat_s": 1, "peer_timeout": 1}):
        with pytest.raises(InvalidArgument, match="heartbeat_s=.* must be above 0 and below"):
            ringlib.connect(0, 2, addresses(2), **beats)


MISMATCHES = {  # collective -> (what ranks 0 and 1 pass, what rank 2 passes), as call kwargs
    "size": ("all_reduce", dict(x=np.ones(10, np.float32)), dict(x=np.ones(12, np.float32))),
    "shape": ("all_reduce", dict(x=np.ones((3, 4))), dict(x=np.ones((4, 3)))),
    "ring size": ("all_reduce", dict(x=np.ones(300_000, np.float32)),
                  dict(x=np.ones(300_001, np.float32))),
    "dtype": ("all_reduce", dict(x=np.ones(8, np.float32)), dict(x=np.ones(8, np.float64))),
    "op": ("all_reduce", dict(x=np.ones(8), op="sum"), dict(x=np.ones(8), op="max")),
    "root": ("broadcast", dict(x=np.ones(8), root=0), dict(x=np.ones(8), root=1)),
    "gather": ("all_gather", dict(x=np.ones(300_000, np.int32)), dict(x=np.ones(5, np.int32))),
}


@pytest.mark.parametrize("case", MISMATCHES)
async def test_every_rank_raises_a_mismatch_naming_the_ranks_and_their_arguments(case):
    """Each rank raises MismatchError once: in the call itself, or, for a broadcast's root
    that had sent everything and was done, at the end of its next collective."""
    name, same, odd = MISMATCHES[case]
    async with ring_of(3) as rings:
        calls = [getattr(ring, name)(**(odd if ring.rank == 2 else same), timeout=10)
                 for ring in rings]
        first = await asyncio.gather(*calls, return_exceptions=True)
        xs = [np.full(4, ring.rank, np.float32) for ring in rings]
        second = await asyncio.gather(*[ring.all_reduce(x, timeout=10)
                                        for ring, x in zip(rings, xs)], return_exceptions=True)
        assert all(x.tolist() == [3.0] * 4 for x in xs)  # the next one completes everywhere
        for ring, results in zip(rings, zip(first, second)):
            errors = [r for r in results if isinstance(r, BaseException)]
            assert len(errors) == 1 and isinstance(errors[0], MismatchError), (ring.rank, results)
            message = str(errors[0])
            assert "rank 2 (inproc://" in message and message.count(f"'{name} ") == 2, message
            assert isinstance(first[ring.rank], MismatchError) or case == "root", message
        ys = [np.full(4, ring.rank, np.float32) for ring in rings]
        await asyncio.gather(*[ring.all_reduce(y, timeout=10) for ring, y in zip(rings, ys)])
        assert all(y.tolist() == [3.0] * 4 for y in ys)


async def lost_everywhere(rings) -> None:
    """Every ring's next collective raises PeerLost for a rank that closed its ring."""
    results = await asyncio.gather(*[r.all_reduce(np.ones(4), timeout=10) for r in rings],
                                   return_exceptions=True)
    for exc in results:
        assert isinstance(exc, PeerLost) and "closed its ring" in str(exc), exc


async def re_formed(rings) -> None:
    """The rings re-form as ranks 0..M-1 in their order, and all-reduce right."""
    await asyncio.gather(*[r.reform(timeout=10) for r in rings])
    assert [(r.rank, r.world_size) for r in rings] == [(i, len(rings)) for i in range(len(rings))]
    xs = [np.full(4, 1.0 + r.rank) for r in rings]
    await asyncio.gather(*[r.all_reduce(x, timeout=10) for r, x in zip(rings, xs)])
    assert all(x.tolist() == [sum(range(1, len(rings) + 1))] * 4 for x in xs)


async def test_a_rank_that_leaves_is_lost_everywhere_and_the_others_re_form_down_to_one():
    """Rank 1 of 4 closes its ring: every other rank's next collective raises PeerLost,
    rank 3 (no neighbour of rank 1) through the others' notice; they re-form as 3 ranks,
    then 2, then rank 0 alone."""
    async with ring_of(4, peer_timeout=0.5, heartbeat_s=0.1) as (r0, r1, r2, r3):
        await r1.close()
        await lost_everywhere([r0, r2, r3])
        await re_formed([r0, r2, r3])
        await r3.close()
        await lost_everywhere([r0, r2])
        await re_formed([r0, r2])
        await r2.close()
        await lost_everywhere([r0])
        await r0.reform(timeout=10)
        assert (r0.rank, r0.world_size, r0.generation, r0.endpoint) == (0, 1, 3, None)
        assert (await r0.all_reduce(np.full(3, 5.0))).tolist() == [5.0] * 3


async def test_settings_changed_on_a_ring_hold_after_it_re_forms():
    async with ring_of(3, peer_timeout=0.5, heartbeat_s=0.1) as (r0, r1, r2):
        for ring in (r0, r1):
            ring.direct_bytes, ring.spin_us, ring.small_bytes = 1234, 7, 4096
        await r2.close()
        await lost_everywhere([r0, r1])
        await re_formed([r0, r1])
        for ring in (r0, r1):
            assert (ring.direct_bytes, ring.spin_us, ring.small_bytes) == (1234, 7, 4096)
            assert ring.endpoint.direct_bytes == 1234
            assert ring.plan("all_reduce", 8192).algorithm == "ring"  # above small_bytes
        with pytest.raises(InvalidArgument, match="no such setting: spin"):
            r0.configure(spin=3)
        with pytest.raises(InvalidArgument, match="shm_bytes"):
            r0.configure(shm_bytes=-1)


async def test_a_rank_that_starts_later_than_the_peer_timeout_is_not_taken_for_lost():
    """Heartbeats start before the greeting, and a neighbour's clock with its first word:
    rank 3 joining 1.5 s late (peer timeout 0.5 s) loses nobody."""
    peers = addresses(4)

    async def join(rank: int) -> ringlib.Ring:
        await asyncio.sleep(1.5 if rank == 3 else 0)
        return await ringlib.connect(rank, 4, peers, timeout=10, peer_timeout=0.5,
                                     heartbeat_s=0.1)
    rings = await asyncio.gather(*map(join, range(4)))
    try:
        xs = [np.full(4, 1.0) for _ in rings]
        await asyncio.gather(*[r.all_reduce(x, timeout=10) for r, x in zip(rings, xs)])
        assert all(x.tolist() == [4.0] * 4 for x in xs)
        assert all(not r.endpoint.liveness.lost for r in rings)
    finally:
        await asyncio.gather(*[r.close() for r in rings])


async def test_a_rank_that_never_calls_makes_the_others_time_out_naming_it():
    async with ring_of(3) as rings:
        with pytest.raises(CollectiveTimeout) as caught:
            await asyncio.gather(rings[0].all_reduce(np.ones(5), timeout=0.3),
                                 rings[1].all_reduce(np.ones(5), timeout=0.3))
        message = str(caught.value)
        assert "all_reduce" in message and "rank 2" in message and rings[2].address in message
        assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, RingError)


async def test_connect_names_the_neighbours_it_could_not_reach():
    peers = addresses(4)
    with pytest.raises(RendezvousTimeout) as caught:
        await ringlib.connect(0, 4, peers, timeout=0.3)
    message = str(caught.value)
    assert f"rank 1 at {peers[1]}" in message and f"rank 3 at {peers[3]}" in message
    assert "rank 2" not in message  # not a neighbour of rank 0


async def test_a_closed_ring_refuses_collectives():
    async with ring_of(2) as (r0, _):
        pass
    with pytest.raises(RingClosed):
        await r0.all_reduce(np.ones(3))
    await r0.close()  # idempotent


async def test_cancelling_a_collective_leaves_the_ring_usable_for_a_clean_close():
    async with ring_of(2) as (r0, r1):
        pending = asyncio.ensure_future(r0.all_reduce(np.ones(1000)))
        await asyncio.sleep(0.05)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending


async def test_a_cancelled_receive_does_not_swallow_the_message():
    a, b = Endpoint(0), Endpoint(1)
    peers = addresses(2)
    try:
        a.bind(peers[0])
        b.bind(peers[1])
        a.set_peers(peers)
        key = frames.data(1, 0, 0, "uint8", 0)
        waiting = asyncio.ensure_future(b.recv(key.key))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await a.send(1, key, np.empty(0, np.uint8))
        message = await asyncio.wait_for(b.recv(key.key), 5)
        assert message.header == key
    finally:
        await a.close()
        await b.close()


async def test_a_message_handed_to_a_waiter_cancelled_before_it_resumes_is_kept():
    inbox = Inbox()
    header = frames.data(1, 0, 0, "uint8", 0)
    waiting = asyncio.ensure_future(inbox.get(header.key))
    await asyncio.sleep(0)
    inbox.deliver(Message(header, None))
    waiting.cancel()  # in the same step: the waiter has its message but has not resumed
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (await inbox.get(header.key)).header == header


async def test_peers_that_know_only_rank_0s_address_meet_through_it(monkeypatch, rng):
    seed = f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}"
    monkeypatch.setenv("RINGLIB_SEED", seed)
    rings = await asyncio.gather(*[ringlib.connect(r, 3, timeout=10) for r in range(3)])
    try:
        assert rings[0].address == seed
        assert all(r.peers == rings[0].peers for r in rings) and len(set(rings[0].peers)) == 3
        xs = [rng.standard_normal(10) for _ in rings]
        expected = sum(xs)
        await asyncio.gather(*[r.all_reduce(x) for r, x in zip(rings, xs)])
        np.testing.assert_allclose(xs[2], expected)
    finally:
        await asyncio.gather(*[r.close() for r in rings])


async def test_rank_0_names_the_ranks_that_never_joined(monkeypatch):
    seed = f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}"
    monkeypatch.setenv("RINGLIB_SEED", seed)
    joined = asyncio.ensure_future(ringlib.connect(2, 3, timeout=0.5))
    with pytest.raises(RendezvousTimeout, match=r"rank 0 waited 0.5 s at .* for ranks \[1\]"):
        await ringlib.connect(0, 3, timeout=0.5)
    with pytest.raises(RendezvousTimeout):
        await joined


async def test_a_rank_names_the_seed_it_could_not_reach(monkeypatch):
    seed = f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}"
    monkeypatch.setenv("RINGLIB_SEED", seed)
    with pytest.raises(RendezvousTimeout, match=f"rank 1 .* no address table from rank 0 at {seed}"):
        await ringlib.connect(1, 2, timeout=0.3)


async def test_a_failed_collective_leaves_no_messages_behind():
    async with ring_of(2) as (r0, r1):
        with pytest.raises(CollectiveTimeout):
            await r0.all_reduce(np.ones(5), timeout=0.2)
        await r1.all_reduce(np.ones(5), timeout=5)  # rank 1's half arrives too late
        await asyncio.sleep(0.1)
        assert len(r0._endpoint.inbox) == 0
        x0, x1 = np.ones(3), np.ones(3)  # and the next collective works on both ranks
        await asyncio.gather(r0.all_reduce(x0, timeout=5), r1.all_reduce(x1, timeout=5))
        assert x0.tolist() == x1.tolist() == [2.0] * 3
