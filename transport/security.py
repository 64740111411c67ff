"""CurveZMQ: authentication and encryption of every ZeroMQ link of a ring.

A ring shares one key pair (`ringlib keygen` writes it). Every rank's receiving socket is
a CURVE server with that pair, and every sending socket a CURVE client with it, so a
process must hold the secret key to complete a handshake: a ZAP handler (pyzmq's
ThreadAuthenticator, one per ZeroMQ context) admits only clients whose public key is the
ring's. A stranger without it can neither join nor inject a message; ZeroMQ drops the
connection during the handshake, before a byte reaches ringlib. Each ring's receiving
sockets name a ZAP domain of their own, derived from the ring's public key, so that in
a process with several keyed rings a client holding one ring's key can reach only that
ring's sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from ringlib.errors import Unauthorized

from .limited_log import LimitedLog

log = logging.getLogger(__name__)

KEY_NAME = "ring"
DOMAIN = "ringlib"  # the ZAP domain of ringlib's receiving sockets


@dataclass(frozen=True)
class Keys:
    """A ring's CurveZMQ key pair, z85-encoded as ZeroMQ takes them."""

    public: bytes
    secret: bytes

    @classmethod
    def load(cls, path: str | os.PathLike) -> Keys:
        """The pair in a secret key file (`ring.key_secret`), or Unauthorized saying why not."""
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise Unauthorized(f"cannot read CurveZMQ keys from {path}: {exc}") from None
        if secret is None:
            raise Unauthorized(f"{path} holds only a public key; ringlib needs the secret key "
                               f"file ({KEY_NAME}.key_secret, from `ringlib keygen`)")
        for key in (public, secret):
            try:
                valid = len(z85.decode(key)) == 32
            except (ValueError, TypeError, KeyError):
                valid = False
            if not valid:
                raise Unauthorized(f"{path} holds a malformed key: CurveZMQ keys are 40 z85 "
                                   "characters (32 bytes)")
        return cls(public, secret)

    @property
    def domain(self) -> str:
        """The ZAP domain of this ring's receiving sockets."""
        return f"{DOMAIN}-{self.public.decode()}"

    def server(self, socket: zmq.Socket) -> None:
        """Make `socket` (a receiving one) accept only clients holding this pair."""
        socket.curve_server = True
        socket.curve_publickey, socket.curve_secretkey = self.public, self.secret
        socket.zap_domain = self.domain.encode()

    def client(self, socket: zmq.Socket) -> None:
        """Make `socket` (a sending one) present this pair to a server that has it."""
        socket.curve_serverkey = self.public
        socket.curve_publickey, socket.curve_secretkey = self.public, self.secret


def generate(directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new key pair into `directory`: (public file, secret file, readable only by
    its owner). Refuses to overwrite an existing pair."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    secret = directory / f"{KEY_NAME}.key_secret"
    if secret.exists():
        raise Unauthorized(f"{secret} exists already; remove it first to make a new pair")
    mask = os.umask(0o077)  # the secret file is private from its first byte
    try:
        public_file, secret_file = zmq.auth.create_certificates(directory, KEY_NAME)
    finally:
        os.umask(mask)
    os.chmod(public_file, 0o644)
    return Path(public_file), Path(secret_file)


class Gate:
    """The ZAP handler of one ZeroMQ context: admits, at each ring's sockets (its domain),
    that ring's public key. Started with the first secure endpoint, stopped before the
    context ends."""

    def __init__(self, context: zmq.Context) -> None:
        self._allowed: dict[str, bytes] = {}  # domain -> the one public key it admits
        self._refusals = LimitedLog(log)
        # pyzmq's handler thread needs plain sockets: a plain view of the same context.
        self._auth = ThreadAuthenticator(zmq.Context.shadow(context.underlying), log=log)
        self._auth.start()

    def admit(self, keys: Keys) -> None:
        if keys.domain not in self._allowed:
            self._allowed[keys.domain] = keys.public
            self._auth.configure_curve_callback(keys.domain, self)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's question: may the client with this z85 public key connect here?"""
        if self._allowed.get(domain) == key:
            return True
        self._refusals.warning("refused a CurveZMQ client with an unknown key %s",
                               key.decode())
        return False

    def stop(self) -> None:
        """Stop the handler's thread, then say how many refusals went unlogged (the
        thread is the only other user of the count)."""
        self._auth.stop()
        self._refusals.flush()


class Handshakes:
    """Logs the CurveZMQ handshakes that fail at a receiving socket: a client with another
    key pair than the ring's fails before the ZAP handler hears of it (it cannot even
    encrypt its first words for the ring's public key), so only the socket's monitor sees
    it, and it does not say who the client was."""

    EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH |
              zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    def __init__(self, socket: zmq.Socket, me: str) -> None:
        self._socket, self._me = socket, me
        self._monitor = socket.get_monitor_socket(self.EVENTS)
        self._refusals = LimitedLog(log)
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                event = parse_monitor_message(await self._monitor.recv_multipart())
            except zmq.ZMQError:
                return
            self._refusals.warning("%s refused a connection whose CurveZMQ handshake failed "
                                   "(%s): a client without the ring's key", self._me,
                                   zmq.Event(event["event"]).name)

    async def close(self) -> None:
        """Stop watching; before the socket closes."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(zmq.ZMQError):
            self._socket.disable_monitor()
        self._monitor.close(0)
        self._refusals.flush()
