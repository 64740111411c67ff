"""Who is where: this rank's number and address, and every peer's.

One Roster per endpoint, shared by reference by the parts that need to name ranks (the
ZeroMQ links, the shared-memory links, liveness), so that a re-formed ring's new rank
number and the peers' addresses are set in one place and every error message names the
same rank and address.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field


@dataclass
class Roster:
    rank: int
    address: str | None = None                            # where this rank receives
    peers: dict[int, str] = field(default_factory=dict)   # rank -> where it receives
    # This endpoint's random word, and each peer's as its HELLO said (see frames.TOKENED).
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    tokens: dict[int, str] = field(default_factory=dict)

    def name(self, rank: int) -> str:
        """'rank 2 (tcp://10.0.0.3:29601)', for messages."""
        return f"rank {rank} ({self.peers.get(rank, '?')})"

    @property
    def me(self) -> str:
        """This rank, named as name() names its peers."""
        return f"rank {self.rank} ({self.address})"
