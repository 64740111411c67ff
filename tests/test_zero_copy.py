"""Zero-copy sends must not let the caller change a buffer before ZeroMQ has sent it.

Rank 0 is a real Ring; rank 1 is played by hand with plain ZeroMQ sockets, speaking the
wire format, so that it can stop reading: rank 0's last messages then stay queued in its
ZeroMQ socket while rank 0 already has everything it needs to finish. If the all-reduce
returned before those frames left, the caller's next write (NaN here) would be what
rank 1 receives.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import zmq

import ringlib
from ringlib.collectives import signature
from ringlib.transport import Kind, frames
from ringlib.transport.frames import decode, encode
from ringlib.transport.addresses import free_tcp_ports

N = 16 << 20  # 64 MiB of float32: far more than the kernel's socket buffers can hold
PIECE = (1 << 20) // 4  # elements per message, with segment_bytes=1 MiB


SIG = signature("all_reduce", "float32", (N,), "sum")


def test_all_reduce_returns_only_after_its_shared_buffers_have_left(rng):
    x0 = rng.standard_normal(N).astype(np.float32)
    x1 = rng.standard_normal(N).astype(np.float32)
    total = x0 + x1
    peers = [f"tcp://127.0.0.1:{p}" for p in free_tcp_ports(2)]
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.rcvhwm, inbox.rcvbuf, inbox.linger, inbox.rcvtimeo = 1, 1 << 16, 0, 20_000
    inbox.bind(peers[1])
    outbox = ctx.socket(zmq.PUSH)
    outbox.linger = 0
    outbox.connect(peers[0])
    returned, result = threading.Event(), {}

    def rank0() -> None:
        with ringlib.init(0, 2, peers, timeout=20, collective_timeout=30,
                          segment_bytes=PIECE * 4, peer_timeout=0, shm_bytes=0,
                          mesh_bytes=0) as ring:
            ring.all_reduce(x0)
            result["sum"] = x0.copy()
            returned.set()
            x0[:] = np.nan  # the caller reuses its buffer at once
    thread = threading.Thread(target=rank0)
    thread.start()
    try:
        outbox.send(encode(frames.control(Kind.HELLO, 1)))
        outbox.send(encode(frames.shared_link(frames.SharedStep.NONE, 1)))  # no shared memory
        assert decode(inbox.recv()).kind == Kind.HELLO
        # Rank 1's half of the protocol, without reading anything rank 0 sends: its own
        # chunk 0 for the reduce-scatter step, and the finished chunk 1 for the all-gather.
        half = N // 2
        for step, data in ((0, x1[:half]), (1, total[half:])):
            for k, (a, b) in enumerate(ringlib.sub_chunks(0, half, PIECE)):
                header = frames.data(1, step, k, SIG, 1, data[a:b].nbytes)
                outbox.send_multipart([encode(header), data[a:b]])
        time.sleep(1.0)
        assert not returned.is_set(), "all_reduce returned while its frames were still queued"
        received = {}
        while len(received) < 2 * len(ringlib.sub_chunks(0, half, PIECE)):
            header, *payload = inbox.recv_multipart()
            if decode(header).kind == Kind.DATA:  # not the offer of a direct link
                received[decode(header)[1:5]] = np.frombuffer(payload[0], np.float32)
        gathered = np.concatenate([v for (_, step, _, _), v in sorted(received.items())
                                   if step == 1])
        thread.join(timeout=30)
        assert returned.is_set()
        np.testing.assert_array_equal(result["sum"][:half], total[:half])
        np.testing.assert_array_equal(gathered, total[:half])
    finally:
        thread.join(timeout=30)
        inbox.close()
        outbox.close()
        ctx.term()
