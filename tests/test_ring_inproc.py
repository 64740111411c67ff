"""Rings of several ranks inside one process, over ZeroMQ's inproc transport: the API's
behaviour, its errors and its concurrency, quickly. Real processes: test_ring_processes.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import numpy as np
import pytest
import torch

import ringlib
from ringlib import (CollectiveTimeout, InvalidArgument, InvalidBuffer, MismatchError,
                     PeerLost, RendezvousTimeout, RingClosed, RingError, UnsupportedBuffer,
                     UnsupportedDtype, UnsupportedOp, UsageError)
from ringlib.transport.addresses import free_tcp_ports
from ringlib.transport import Endpoint, Inbox, Kind, Message, frames

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
    (lambda: np.arange(5, dtype=">f4"), UnsupportedDtype, "x is float32 in non-native byte order"),
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


@pytest.mark.parametrize("timeout", [-1, 0, float("nan"), float("inf"), "5", True, None])
async def test_a_timeout_is_a_finite_number_of_seconds_above_0(timeout):
    async with ring_of(2) as (r0, r1):
        if timeout is not None:
            with pytest.raises(InvalidArgument, match=r"timeout=.* must be a finite number of "
                                                      "seconds above 0"):
                await r0.all_reduce(np.ones(3), timeout=timeout)
            with pytest.raises(InvalidArgument, match="timeout="):
                ringlib.connect(0, 2, addresses(2), timeout=timeout)
            with pytest.raises(InvalidArgument, match="collective_timeout="):
                ringlib.connect(0, 2, addresses(2), collective_timeout=timeout)
        x0, x1 = np.ones(3), np.ones(3)  # nothing was sent: the ring carries on
        await asyncio.gather(r0.all_reduce(x0, timeout=5), r1.all_reduce(x1, timeout=5))
        assert x0.tolist() == [2.0] * 3


@pytest.mark.parametrize("root", [1.0, True, "0", -1, 2, None])
async def test_a_broadcast_root_is_an_integer_rank(root):
    async with ring_of(2) as (r0, _):
        with pytest.raises(InvalidArgument, match=f"broadcast root {root!r} is not a rank"):
            await r0.broadcast(np.ones(3), root=root)


@pytest.mark.parametrize("setting", [dict(segment_bytes=0), dict(spin_us=-1),
                                     dict(small_bytes=1.5), dict(direct_bytes="big"),
                                     dict(shm_bytes=True), dict(peer_timeout=float("nan")),
                                     dict(curve_key=7), dict(hierarchical=1), dict(ifname="")])
def test_settings_are_checked_up_front_naming_the_setting(setting):
    (name, _), = setting.items()
    with pytest.raises(InvalidArgument, match=f"{name}="):
        ringlib.connect(0, 2, addresses(2), **setting)


def test_connect_is_a_coroutine_for_asyncio_run_and_a_ring_keeps_to_its_event_loop():
    ring = asyncio.run(ringlib.connect(0, 1))
    assert ring.world_size == 1
    with pytest.raises(UsageError, match="runs on the event loop it was made on"):
        asyncio.run(ring.all_reduce(np.ones(3)))


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


CALLS = {  # small collectives, as every rank calls them but rank 2 in the test below
    "all_reduce": lambda ring: ring.all_reduce(np.ones(6, np.float32), timeout=20),
    "reduce_scatter": lambda ring: ring.reduce_scatter(np.ones(6, np.float32), timeout=20),
    "all_gather": lambda ring: ring.all_gather(np.ones(6, np.float32), timeout=20),
    "broadcast": lambda ring: ring.broadcast(np.ones(6, np.float32), root=0, timeout=20),
    "barrier": lambda ring: ring.barrier(timeout=20),
    "empty all_reduce": lambda ring: ring.all_reduce(np.ones(0, np.float32), timeout=20),
}


@pytest.mark.parametrize("most, odd", [(a, b) for a in CALLS for b in CALLS
                                       if a != b and "empty" not in a])
async def test_any_two_collectives_that_disagree_raise_a_mismatch_on_every_rank_promptly(most, odd):
    """Even where their messages never meet (an all-reduce on two ranks, a broadcast on the
    third), or where a rank's buffer alone is empty: MismatchError on every rank long before
    the deadline (the call itself, or the next one for a rank that had finished it), and
    the ring carries on."""
    async with ring_of(3) as rings:
        started = time.monotonic()
        first = await asyncio.gather(*[CALLS[odd if r.rank == 2 else most](r) for r in rings],
                                     return_exceptions=True)
        elapsed = time.monotonic() - started
        xs = [np.full(4, r.rank, np.float32) for r in rings]
        second = await asyncio.gather(*[r.all_reduce(x, timeout=20) for r, x in zip(rings, xs)],
                                      return_exceptions=True)
        assert elapsed < 5, f"the mismatch took {elapsed:.1f} s of a 20 s deadline"
        for ring, results in zip(rings, zip(first, second)):
            errors = [r for r in results if isinstance(r, BaseException)]
            assert len(errors) == 1 and isinstance(errors[0], MismatchError), (ring.rank, results)
        ys = [np.full(4, r.rank, np.float32) for r in rings]
        await asyncio.gather(*[r.all_reduce(y, timeout=20) for r, y in zip(rings, ys)])
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


async def test_a_rank_that_closes_is_reported_at_once_not_after_the_peer_timeout():
    async with ring_of(3, peer_timeout=30, heartbeat_s=0.5) as (r0, r1, r2):
        await r1.close()
        started = time.monotonic()
        results = await asyncio.gather(r0.all_reduce(np.ones(4), timeout=60),
                                       r2.all_reduce(np.ones(4), timeout=60),
                                       return_exceptions=True)
        assert all(isinstance(r, PeerLost) and r.rank == 1 and "closed its ring" in str(r)
                   for r in results), results
        assert time.monotonic() - started < 5  # a heartbeat interval's grace, not 30 s


async def test_a_rank_that_closes_fails_only_what_waits_for_it_and_leaves_its_files(tmp_path):
    """Rank 0 closes (BYE) and a new endpoint binds its ipc address at once, as a re-opened
    ring would. A message between ranks 1 and 2 that comes long after the BYE still
    arrives; a collective that needs rank 0 raises PeerLost at once; and the survivors
    leave the files at rank 0's address alone: a rank that closes removes its own."""
    peers = [f"ipc://{tmp_path}/r{r}" for r in range(3)]
    rings = await asyncio.gather(*[ringlib.connect(r, 3, peers, timeout=10, peer_timeout=30,
                                                   heartbeat_s=0.1) for r in range(3)])
    r0, r1, r2 = rings
    successor = Endpoint(0)
    try:
        await r0.close()
        successor.bind(peers[0])
        later = frames.stream(0, 1, 0, "uint8", 1, 3)
        arrival = asyncio.ensure_future(r2.endpoint.recv(later.key))
        await asyncio.sleep(1.0)  # ten heartbeat intervals: BYE's grace is one
        await r1.endpoint.send(2, later, b"abc")
        assert (await arrival).payload.bytes == b"abc"
        started = time.monotonic()
        results = await asyncio.gather(r1.all_reduce(np.ones(4), timeout=60),
                                       r2.all_reduce(np.ones(4), timeout=60),
                                       return_exceptions=True)
        assert all(isinstance(r, PeerLost) and r.rank == 0 for r in results), results
        assert time.monotonic() - started < 5
        assert (tmp_path / "r0").exists()  # the successor's socket file
    finally:
        await asyncio.gather(*[r.close() for r in rings])
        await successor.close()


async def test_a_rank_that_gives_up_starting_fails_the_start_up_of_the_others_at_once():
    """Rank 1 never comes; rank 2 gives up after 1 s and says so (BYE). Rank 0, with 30 s
    to wait, raises PeerLost naming rank 2 and why, well before its own timeout or the
    30 s peer timeout."""
    peers = addresses(3)
    started = time.monotonic()
    results = await asyncio.gather(ringlib.connect(0, 3, peers, timeout=30, peer_timeout=30),
                                   ringlib.connect(2, 3, peers, timeout=1, peer_timeout=30),
                                   return_exceptions=True)
    assert isinstance(results[1], RendezvousTimeout), results
    assert isinstance(results[0], PeerLost) and results[0].rank == 2, results
    assert "gave up starting" in str(results[0]), results
    assert time.monotonic() - started < 10


async def test_stale_or_stranger_control_messages_cannot_fail_a_ring():
    """LOST, MISMATCH and BYE carry their sender's token, which only its peers learned at
    start-up: the same words from another endpoint are dropped."""
    async with ring_of(2) as (r0, r1):
        stranger = Endpoint(1)  # claims to be rank 1, but is not the one that greeted
        stranger.set_peers(r0.peers)
        stranger.roster.tokens[0] = r0.endpoint.roster.token
        try:
            stranger.notify(0, frames.lost(0, 1), b"you are out")
            stranger.notify(0, frames.mismatch(1, 1), b"all wrong")
            stranger.notify(0, frames.control(Kind.BYE, 1))
            await asyncio.sleep(1.0)  # a heartbeat interval: a BYE would count by now
            x0, x1 = np.ones(3), np.ones(3)
            await asyncio.gather(r0.all_reduce(x0, timeout=5), r1.all_reduce(x1, timeout=5))
            assert x0.tolist() == [2.0] * 3 and not r0.endpoint.liveness.gone()
        finally:
            await stranger.close()


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


async def test_a_re_form_tried_again_never_takes_the_words_of_the_try_that_failed():
    """Rank 0 tries first and is stopped; its words of that try (with the address of an
    endpoint it closed since) wait at rank 1. Tried again, by both, the ring forms."""
    async with ring_of(3, peer_timeout=0.5, heartbeat_s=0.1) as (r0, r1, r2):
        await r2.close()
        await lost_everywhere([r0, r1])
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(r0.reform(timeout=10), 0.3)
        await asyncio.sleep(0.1)
        await re_formed([r0, r1])


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


async def test_connect_names_the_ranks_it_could_not_reach_and_only_those():
    peers = addresses(4)
    present = asyncio.ensure_future(ringlib.connect(2, 4, peers, timeout=0.6))
    with pytest.raises(RendezvousTimeout) as caught:
        await ringlib.connect(0, 4, peers, timeout=0.5)
    message = str(caught.value)
    assert f"rank 1 at {peers[1]}" in message and f"rank 3 at {peers[3]}" in message
    assert "rank 2" not in message  # it was there, and greeted rank 0
    with pytest.raises(RendezvousTimeout):
        await present


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


async def test_point_to_point_messages_arrive_in_order_per_pair_and_tag(rng):
    """Every rank sends each other rank two tags' messages, interleaved; each receiver
    takes them in another order of tags, and gets every one, in order within its tag."""
    async with ring_of(3) as rings:
        sent = {(a, b, tag, k): rng.standard_normal(5).astype(np.float32)
                for a in range(3) for b in range(3) if a != b for tag in (0, 9) for k in range(2)}

        async def rank(ring):
            me = ring.rank
            sends = [ring.send(x, b, tag) for (a, b, tag, k), x in sent.items() if a == me]
            got = {}

            async def receive(a, tag):
                for k in range(2):
                    got[a, tag, k] = await ring.recv(np.empty(5, np.float32), a, tag)
            await asyncio.gather(*sends, *[receive(a, tag) for a in range(3) if a != me
                                           for tag in (9, 0)])
            for (a, tag, k), x in got.items():
                np.testing.assert_array_equal(x, sent[a, me, tag, k])
        await asyncio.gather(*[rank(r) for r in rings])


async def test_point_to_point_errors_name_the_rank_and_the_peer():
    async with ring_of(2, collective_timeout=0.5) as (a, b):
        with pytest.raises(InvalidArgument, match="cannot send to itself"):
            await a.send(np.ones(2), 0)
        with pytest.raises(InvalidArgument, match="tag -1"):
            await a.send(np.ones(2), 1, tag=-1)
        with pytest.raises(InvalidArgument, match="receive from 2 is not a rank"):
            await a.recv(np.ones(2), 2)
        with pytest.raises(CollectiveTimeout, match=f"rank 0: receive from rank 1 .{b.address}"):
            await a.recv(np.ones(2), 1, tag=3)
        await b.send(np.full(2, 7.0), 0, tag=3)  # late: the next recv of tag 3 gets it
        np.testing.assert_array_equal(await a.recv(np.ones(2), 1, tag=3), [7.0, 7.0])
        await b.send(np.ones(3, np.float32), 0, tag=4)
        with pytest.raises(MismatchError, match="12 bytes of float32, but recv was given 16"):
            await a.recv(np.ones(2, np.float64), 1, tag=4)
        await b.close()
        with pytest.raises(PeerLost, match="rank 1"):
            await a.recv(np.ones(2), 1, tag=5, timeout=10)
