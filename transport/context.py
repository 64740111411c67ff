"""The process's ZeroMQ context for ringlib, and the endpoints that hold it open.

It is ringlib's own, not pyzmq's global instance, so terminating it never waits on sockets
that the application opened. It is created with the first endpoint and terminated when the
last one closes; a CurveZMQ ring also starts its ZAP handler (security.Gate) on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Callable

import zmq.asyncio

from .security import Gate

_context: zmq.asyncio.Context | None = None
_gate: Gate | None = None
_holders = 0


def context() -> zmq.asyncio.Context:
    """The context, created on first use."""
    global _context
    if _context is None or _context.closed:
        _context = zmq.asyncio.Context()
    return _context


def gate() -> Gate:
    """The context's ZAP handler, started on first use."""
    global _gate
    if _gate is None:
        _gate = Gate(context())
    return _gate


def hold() -> None:
    """An endpoint opens: the context stays until it is let go."""
    global _holders
    _holders += 1


async def let_go() -> None:
    """An endpoint closed. After the last one, stop the ZAP handler and terminate the
    context, which waits (up to each socket's linger) for queued messages to leave."""
    global _holders, _gate
    _holders -= 1
    if _holders:
        return
    if _gate is not None:
        _gate.stop()
        _gate = None
    if _context is not None:
        await _in_thread(_context.term)


async def _in_thread(call: Callable[[], None]) -> None:
    """Await call() run in a thread of its own. Not the loop's executor: that refuses work
    once the interpreter shuts down, when a blocking ring that nobody closed is closed."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def run() -> None:
        try:
            call()
            outcome: tuple[Callable[[Any], None], Any] = (done.set_result, None)
        except BaseException as exc:  # handed to the waiter, which raises it
            outcome = (done.set_exception, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(_settle, done, *outcome)

    threading.Thread(target=run, name="ringlib-context-term", daemon=True).start()
    await done


def _settle(done: asyncio.Future, settle: Callable[[Any], None], value: Any) -> None:
    """settle(value) (done's set_result or set_exception), unless the wait was cancelled."""
    if not done.done():
        settle(value)
