"""A user-space Ethernet switch that delays and drops frames, where the kernel has no netem.

    ip netns exec HUB python -m ringlib.bench.netem_switch PORTS [--seed S]

It creates PORTS tap devices, `port0`..., in the namespace it runs in (the benchmark then
moves each into a rank's namespace), prints `ready`, and forwards frames between them,
learning MAC addresses and flooding the rest, like a bridge. Commands on stdin, one per
line, each answered with one JSON line: `faults DELAY_S LOSS` (LOSS a fraction; 0 0 for a
clean link) and `stats` (frames in and frames dropped since the last `faults`). It exits
at the end of stdin, and its taps go with it.

Faults apply where each frame enters the switch, as `tc netem` on each rank's own veth
would apply them on the way out: every frame waits DELAY_S and is dropped with
probability LOSS. The taps carry offloaded frames of up to 64 KiB (a virtio-net header
in front), as a veth hands netem its GSO packets, so both drop whole send units.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import os
import random
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HDR = 10              # bytes of virtio_net_hdr in front of every frame
READ_BYTES = 1 << 17       # more than the largest offloaded frame (64 KiB and headers)


def open_tap(name: str) -> int:
    """A non-blocking fd of a new tap device `name` that passes offloaded (GSO) frames."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError as exc:
        os.close(fd)
        raise OSError(f"cannot create tap device {name}: {exc}") from None
    return fd


class Switch:
    """Frames from each port to the port that owns the destination MAC (or every other
    port), through a FIFO of (due time, port, frame): the delay is the same for every
    frame, so due times never decrease and the FIFO stays in time order."""

    def __init__(self, ports: list[int], seed: int) -> None:
        self.ports = ports
        self.owner: dict[bytes, int] = {}
        self.queue: collections.deque[tuple[float, int, bytes]] = collections.deque()
        self.delay, self.loss = 0.0, 0.0
        self.frames = self.dropped = 0
        self.random = random.Random(seed)

    def set_faults(self, delay: float, loss: float) -> None:
        self.delay, self.loss = delay, loss
        self.frames = self.dropped = 0

    def take(self, port: int) -> None:
        """Read every frame waiting on `port`, drop or queue each."""
        while True:
            try:
                frame = os.read(port, READ_BYTES)
            except BlockingIOError:
                return
            self.frames += 1
            self.owner[frame[VNET_HDR + 6:VNET_HDR + 12]] = port  # source MAC
            if self.loss and self.random.random() < self.loss:
                self.dropped += 1
                continue
            destination = self.owner.get(frame[VNET_HDR:VNET_HDR + 6])
            due = time.monotonic() + self.delay
            for out in [destination] if destination is not None else self.ports:
                if out != port:
                    self.queue.append((due, out, frame))

    def deliver(self) -> float | None:
        """Write every frame that is due; milliseconds until the next one, or None."""
        now = time.monotonic()
        while self.queue and self.queue[0][0] <= now:
            _, out, frame = self.queue.popleft()
            try:
                os.write(out, frame)
            except OSError:  # the receiving stack refused it: a drop, as on a wire
                self.dropped += 1
        return (self.queue[0][0] - now) * 1000 if self.queue else None


def answer(switch: Switch, line: str) -> dict[str, object]:
    """The reply to one command line."""
    words = line.split()
    if len(words) == 3 and words[0] == "faults":
        switch.set_faults(float(words[1]), float(words[2]))
        return {"delay_s": switch.delay, "loss": switch.loss}
    if words == ["stats"]:
        return {"frames": switch.frames, "dropped": switch.dropped}
    return {"error": f"unknown command {line.strip()!r}"}


def serve(switch: Switch) -> None:
    """Forward frames and answer commands until stdin ends."""
    poller = select.poll()
    for port in switch.ports:
        poller.register(port, select.POLLIN)
    commands = sys.stdin.fileno()
    poller.register(commands, select.POLLIN)
    wait: float | None = None
    while True:
        for fd, _ in poller.poll(wait):
            if fd != commands:
                switch.take(fd)
                continue
            line = sys.stdin.readline()
            if not line:
                return
            print(json.dumps(answer(switch, line)), flush=True)
        wait = switch.deliver()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ports", type=int)
    parser.add_argument("--seed", type=int, default=0, help="seeds which frames are lost")
    args = parser.parse_args()
    ports = [open_tap(f"port{i}") for i in range(args.ports)]
    print("ready", flush=True)
    serve(Switch(ports, args.seed))


if __name__ == "__main__":
    main()
