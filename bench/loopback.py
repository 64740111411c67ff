"""The floor this host's sockets set for any TCP transport: two processes swapping S bytes
over plain TCP connections, in the ways a transport could carry them.

    ringlib bench loopback [--sizes 8B,8MiB] [--iters N] [--transport tcp|ipc]
                           [--sockets 1,2,4] [--zerocopy] [--hosts] [--rounds R]

Each process sends from one thread while it receives on another (socket.sendall and
recv_into: no Python per byte, no library in between; sizes up to 64 KiB, which the
socket buffers hold, are sent and then received on one thread).

The ways, taking turns in each round over the same two processes:
- `--sockets N`: each swap split into N parts over N connections, a sending and a
  receiving thread for each (NCCL's NCCL_NSOCKS_PERTHREAD);
- `--zerocopy`: each way again with MSG_ZEROCOPY sends (SO_ZEROCOPY), the buffer held
  until the kernel says it is done with it; the column `copied` is the share of sends
  the kernel copied all the same (it does for a receiver on the same machine).
`--hosts` runs the two processes in two network namespaces joined by veth, as two hosts.

An all-reduce of S bytes on 2 ranks swaps S/2 bytes twice (reduce-scatter, all-gather), so
two swaps of S/2 bound how fast any all-reduce over these sockets can be here.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from ringlib.runtime import processes

from .timing import format_size, parse_int_list, parse_size_list


INLINE_BYTES = 64 << 10     # fits the socket buffer: send, then receive, in one thread
SO_ZEROCOPY = 60            # Linux's values; Python's socket module names neither
MSG_ZEROCOPY = 0x4000000
ZEROCOPY_COPIED = 1         # SO_EE_CODE_ZEROCOPY_COPIED
EXTENDED_ERR = struct.Struct("=IBBBxII")  # struct sock_extended_err, less its offender
RUN_S = 600


@dataclass(frozen=True)
class Way:
    """One way of carrying a swap: over how many connections, zero-copy or not."""

    sockets: int
    zerocopy: bool

    @property
    def name(self) -> str:
        return f"{self.sockets} socket{'s' * (self.sockets > 1)}" + ", zerocopy" * self.zerocopy


class ZeroCopySender:
    """MSG_ZEROCOPY sends on one socket, each waited out until the kernel lets go of it."""

    def __init__(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
        except OSError as e:
            raise SystemExit(f"bench loopback: this kernel refuses SO_ZEROCOPY ({e})") from None
        self.sock, self.calls, self.done, self.copied = sock, 0, 0, 0

    def sendall(self, out: memoryview) -> None:
        sent = 0
        while sent < len(out):
            sent += self.sock.send(out[sent:], MSG_ZEROCOPY)
            self.calls += 1
        while self.done < self.calls:
            self._reap()

    def _reap(self) -> None:
        try:
            flags = socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT
            _, ancillary, _, _ = self.sock.recvmsg(0, 256, flags)
        except BlockingIOError:
            poller = select.poll()
            poller.register(self.sock, 0)  # the error queue wakes it as POLLERR
            poller.poll(1000)
            return
        for _, _, data in ancillary:
            errno, _, _, code, first, last = EXTENDED_ERR.unpack_from(data)
            if errno != 0:
                raise OSError(errno, "MSG_ZEROCOPY completion")
            self.done += last - first + 1
            self.copied += (last - first + 1) * bool(code & ZEROCOPY_COPIED)


def _receive(sock: socket.socket, into: memoryview) -> None:
    got = 0
    while got < len(into):
        got += sock.recv_into(into[got:])


def _parts(view: memoryview, n: int) -> list[memoryview]:
    step = -(-len(view) // n)
    return [view[i:i + step] for i in range(0, len(view), step)] or [view]


def _swap(senders: list, socks: list[socket.socket], out: memoryview, into: memoryview) -> None:
    if len(out) <= INLINE_BYTES:
        senders[0].sendall(out)
        _receive(socks[0], into)
        return
    outs, intos = _parts(out, len(socks)), _parts(into, len(socks))
    threads = [threading.Thread(target=_receive, args=(s, part)) for s, part in zip(socks, intos)]
    threads += [threading.Thread(target=s.sendall, args=(part,))
                for s, part in zip(senders[1:], outs[1:])]
    for t in threads:
        t.start()
    senders[0].sendall(outs[0])
    for t in threads:
        t.join()


def _time_way(socks: list[socket.socket], way: Way, size: int, iters: int) -> dict:
    socks = socks[:way.sockets]
    senders = [ZeroCopySender(s) if way.zerocopy else s for s in socks]
    out, into = memoryview(b"x" * size), memoryview(bytearray(size))
    for _ in range(3):
        _swap(senders, socks, out, into)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        _swap(senders, socks, out, into)
        samples.append(time.perf_counter() - start)
    zerocopies = [s for s in senders if isinstance(s, ZeroCopySender)]
    calls = sum(s.calls for s in zerocopies)
    return {"p50": statistics.median(samples),
            "copied": sum(s.copied for s in zerocopies) / calls if calls else None}


def _peer(socks: list[socket.socket], ways: list[Way], sizes: list[int], iters: int,
          rounds: int) -> list[dict]:
    """Every (round, way, size) in the same order on both ends: one row each."""
    rows = []
    for r in range(rounds):
        for way in ways:
            for size in sizes:
                rows.append({"round": r, "sockets": way.sockets, "zerocopy": way.zerocopy,
                             "size": size, **_time_way(socks, way, size, iters)})
    return rows


def _tune(sock: socket.socket) -> None:
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def serve(where: str, plan: dict) -> None:
    """The listening end: prints its address, takes the connections, prints its rows."""
    family = socket.AF_UNIX if plan["transport"] == "ipc" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind(where if family == socket.AF_UNIX else (where, 0))
        listener.listen(plan["connections"])
        print(json.dumps(listener.getsockname()), flush=True)
        socks = [listener.accept()[0] for _ in range(plan["connections"])]
    _run(socks, plan)


def connect(where, plan: dict) -> None:
    family = socket.AF_UNIX if plan["transport"] == "ipc" else socket.AF_INET
    socks = []
    for _ in range(plan["connections"]):
        socks.append(socket.socket(family, socket.SOCK_STREAM))
        socks[-1].connect(where if family == socket.AF_UNIX else tuple(where))
    _run(socks, plan)


def _run(socks: list[socket.socket], plan: dict) -> None:
    for s in socks:
        _tune(s)
    ways = [Way(*w) for w in plan["ways"]]
    rows = _peer(socks, ways, plan["sizes"], plan["iters"], plan["rounds"])
    for s in socks:
        s.close()
    print(json.dumps(rows), flush=True)


def measure(plan: dict, hosts: bool) -> list[dict]:
    """Both ends' rows, each end a process of its own (in its own namespace with `hosts`)."""
    from . import hosts as two

    with (two.two_hosts() if hosts else nullcontext(None)) as pair, \
            tempfile.TemporaryDirectory(prefix="rl-") as tmp:
        where = str(Path(tmp, "s")) if plan["transport"] == "ipc" else "127.0.0.1"
        prefix = [[], []]
        if pair:
            where = pair[0][1]
            prefix = [["ip", "netns", "exec", name] for name, _ in pair]
        me = [sys.executable, "-m", "ringlib.bench.loopback", "--end"]
        env = dict(os.environ)
        ends = [processes.start(prefix[0] + me + ["serve", where, json.dumps(plan)], env,
                                stdout=subprocess.PIPE, text=True)]
        try:
            address = json.loads(ends[0].stdout.readline())
            ends.append(processes.start(prefix[1] + me + ["connect", json.dumps(address),
                                                          json.dumps(plan)], env,
                                        stdout=subprocess.PIPE, text=True))
            outs = [e.communicate(timeout=RUN_S)[0] for e in ends]
        finally:
            processes.stop(ends, grace=0)
        if any(e.returncode for e in ends):
            raise SystemExit(f"bench loopback: an end failed (exit codes "
                             f"{[e.returncode for e in ends]})")
        return [row for out in outs for row in json.loads(out.strip().splitlines()[-1])]


def _sockets(text: str) -> list[int]:
    counts = parse_int_list(text)
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: connection counts must be 1 or more")
    return counts


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--end"]:
        role, where, plan = argv[1], json.loads(argv[2]) if argv[1] == "connect" else argv[2], \
            json.loads(argv[3])
        return serve(where, plan) if role == "serve" else connect(where, plan)
    p = argparse.ArgumentParser(prog="ringlib bench loopback", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_size_list, default=parse_size_list("8B,8MiB"),
                   help="comma-separated sizes each process sends (default: 8B,8MiB)")
    p.add_argument("--iters", type=int, default=50, help="swaps per size (default: 50)")
    p.add_argument("--rounds", type=int, default=1, help="turns of every way (default: 1)")
    p.add_argument("--transport", choices=("tcp", "ipc"), default="tcp",
                   help="TCP, or a Unix socket (default: tcp)")
    p.add_argument("--sockets", type=_sockets, default=[1],
                   help="comma-separated connection counts to split each swap over (default: 1)")
    p.add_argument("--zerocopy", action="store_true",
                   help="also send each way with MSG_ZEROCOPY (tcp only)")
    p.add_argument("--hosts", action="store_true",
                   help="the two ends in two network namespaces joined by veth (root, ip netns)")
    args = p.parse_args(argv)
    if args.iters < 1 or args.rounds < 1:
        p.error("--iters and --rounds must be 1 or more")
    if args.transport == "ipc" and (args.zerocopy or args.hosts):
        p.error("--zerocopy and --hosts need --transport tcp")
    ways = [Way(n, z) for z in (False, True)[:1 + args.zerocopy] for n in args.sockets]
    plan = {"transport": args.transport, "sizes": args.sizes, "iters": args.iters,
            "rounds": args.rounds, "connections": max(args.sockets),
            "ways": [(w.sockets, w.zerocopy) for w in ways]}
    try:
        with processes.sigterm_as_interrupt():
            rows = measure(plan, args.hosts)
    except KeyboardInterrupt:
        raise SystemExit("bench loopback interrupted; both ends stopped") from None
    _print(rows, ways, args)
    print("command: ringlib bench loopback " + " ".join(argv))


def _print(rows: list[dict], ways: list[Way], args) -> None:
    place = "two network namespaces joined by veth" if args.hosts else "one host"
    print(f"plain {args.transport} sockets between two processes ({place}), both directions "
          f"at once; median of {args.iters} swaps, each round's, then of both ends")
    print(f"{'way':>20} {'size':>9} {'swap p50 us (each round)':>30} {'GB/s each way':>14} "
          f"{'copied':>7}")
    for way in ways:
        for size in args.sizes:
            mine = [r for r in rows if (r["sockets"], r["zerocopy"], r["size"])
                    == (way.sockets, way.zerocopy, size)]
            per_round = [statistics.median(r["p50"] for r in mine if r["round"] == k)
                         for k in range(args.rounds)]
            p50 = statistics.median(per_round)
            copied = [r["copied"] for r in mine if r["copied"] is not None]
            shown = f"{statistics.mean(copied):.0%}" if copied else "-"
            each = "/".join(f"{s * 1e6:.1f}" for s in per_round)
            print(f"{way.name:>20} {format_size(size):>9} {each:>30} "
                  f"{size / p50 / 1e9:>14.3f} {shown:>7}")


if __name__ == "__main__":
    main()
