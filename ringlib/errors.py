"""ringlib's exception hierarchy: everything a user may catch derives from RingError.

The buffer and dtype errors also derive from the matching built-in (ValueError, TypeError),
so code written against numpy's conventions keeps working.
"""

from __future__ import annotations


class RingError(Exception):
    """Root of every error ringlib raises on purpose."""


class UnsupportedBuffer(RingError, TypeError):
    """An object of a kind ringlib cannot use as a buffer (a list, a str, ...)."""


class UnsupportedDtype(UnsupportedBuffer):
    """A buffer's dtype is not one the compiled core reduces, or two buffers' dtypes differ."""


class UnsupportedOp(RingError, ValueError):
    """An unknown reduction op, or an op that is undefined for the dtype (integer mean)."""


class InvalidBuffer(RingError, ValueError):
    """A buffer that cannot be used as is: non-contiguous, read-only, or of the wrong length."""


class RingClosed(RingError):
    """An operation on a ring (or a transport endpoint) that has been closed."""


class RendezvousError(RingError):
    """Rank, world size or peer addresses are missing or inconsistent, or binding failed."""


class RendezvousTimeout(RendezvousError, TimeoutError):
    """Peers that did not show up during start-up; the message names their ranks and addresses."""


class CollectiveTimeout(RingError, TimeoutError):
    """A collective waited past its deadline for a peer's message."""


class MismatchError(RingError, ValueError):
    """Ranks called a collective with different arguments (shape, dtype, op or root). Every
    rank raises it; the message names the ranks that disagree and what each passed."""


class PeerLost(RingError, ConnectionError):
    """A rank fell silent (it died, or the network to it was cut) or left the ring. Every
    pending and later collective raises it until Ring.reform() builds a ring of the rest.
    `rank` and `address` name the lost rank."""

    def __init__(self, message: str, rank: int, address: str | None) -> None:
        super().__init__(message)
        self.rank, self.address = rank, address


class Unauthorized(RingError):
    """CurveZMQ keys that are missing, unreadable or malformed."""


class ProtocolError(RingError):
    """A message that is not ringlib's: bad framing, a bad header, a wrong protocol version."""


class UsageError(RingError, RuntimeError):
    """A ring used in a way that would mix up collectives: from an event loop other than
    its own, or a blocking ring from a second thread while another's collective is in
    flight. The message states the rule."""


class NotSupported(RingError, NotImplementedError):
    """An operation ringlib does not offer, such as torch.distributed's alltoall; the
    message names it."""


class InvalidArgument(RingError, ValueError):
    """An argument out of range for this ring, such as a broadcast root that is no rank."""


class StageError(RingError):
    """A pipeline stage raised on one batch; `rank` and `batch` say where. Later batches
    still flow."""

    def __init__(self, message: str, rank: int, batch: int) -> None:
        super().__init__(message)
        self.rank, self.batch = rank, batch


class WorkerLost(PeerLost):
    """The engine's worker process that ran a rank died mid-run (ringlib.dask.run);
    `rank` is that rank and `address` the worker's address."""
