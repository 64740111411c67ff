"""The floor this host's loopback sets for any TCP transport: two processes swapping S
bytes over one plain TCP connection.

    ringlib bench loopback [--sizes 8B,8MiB] [--iters N] [--transport tcp|ipc]

Each process sends from one thread while it receives on another (socket.sendall and
recv_into: no Python per byte, no library in between; sizes up to 64 KiB, which the
socket buffers hold, are sent and then received on one thread).

An all-reduce of S bytes on 2 ranks swaps S/2 bytes twice (reduce-scatter, all-gather), so
two swaps of S/2 bound how fast any all-reduce over these sockets can be here.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from multiprocessing import get_context
from pathlib import Path

from .timing import format_size, parse_size_list


INLINE_BYTES = 64 << 10     # fits the socket buffer: send, then receive, in one thread


def _swap(sock: socket.socket, out: bytes, into: memoryview) -> None:
    if len(out) <= INLINE_BYTES:
        sock.sendall(out)
        _receive(sock, into)
        return
    receiver = threading.Thread(target=_receive, args=(sock, into))
    receiver.start()
    sock.sendall(out)
    receiver.join()


def _receive(sock: socket.socket, into: memoryview) -> None:
    got = 0
    while got < len(into):
        got += sock.recv_into(into[got:])


def _peer(sock: socket.socket, sizes: list[int], iters: int, results) -> None:
    times = []
    for size in sizes:
        out, into = b"x" * size, memoryview(bytearray(size))
        for _ in range(3):
            _swap(sock, out, into)
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            _swap(sock, out, into)
            samples.append(time.perf_counter() - start)
        times.append(statistics.median(samples))
    if results is not None:
        results.put(times)
    sock.close()


def measure(sizes: list[int], iters: int, transport: str) -> list[float]:
    """Median seconds to swap each size between two processes."""
    family = socket.AF_UNIX if transport == "ipc" else socket.AF_INET
    with tempfile.TemporaryDirectory(prefix="rl-") as tmp:
        where = str(Path(tmp, "s")) if transport == "ipc" else ("127.0.0.1", 0)
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.bind(where)
            listener.listen(1)
            ctx = get_context("spawn")
            results = ctx.Queue()
            peer = ctx.Process(target=_connect_and_run,
                               args=(family, listener.getsockname(), sizes, iters))
            peer.start()
            conn, _ = listener.accept()
            _tune(conn)
            _peer(conn, sizes, iters, results)
            peer.join()
            return results.get()


def _connect_and_run(family: int, where, sizes: list[int], iters: int) -> None:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(where)
    _tune(sock)
    _peer(sock, sizes, iters, None)


def _tune(sock: socket.socket) -> None:
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ringlib bench loopback", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_size_list, default=parse_size_list("8B,8MiB"),
                   help="comma-separated sizes each process sends (default: 8B,8MiB)")
    p.add_argument("--iters", type=int, default=50, help="swaps per size (default: 50)")
    p.add_argument("--transport", choices=("tcp", "ipc"), default="tcp",
                   help="TCP on loopback, or a Unix socket (default: tcp)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    print(f"{'size':>9} {'swap p50 us':>12} {'GB/s each way':>14}")
    for size, seconds in zip(args.sizes, measure(args.sizes, args.iters, args.transport)):
        print(f"{format_size(size):>9} {seconds * 1e6:>12.1f} {size / seconds / 1e9:>14.3f}")
    print(f"plain {args.transport} sockets between two processes on this host, both "
          "directions at once; median of", args.iters)


if __name__ == "__main__":
    main()
