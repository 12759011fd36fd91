"""How many TLS handshakes the peer ingress runs at once: a cap per source address and in total.

A handshake is the one thing the ingress must do for a stranger before it knows who it is, and a pending one
holds a socket (a file descriptor) for up to the handshake timeout. Without a cap, one LAN host that opens
connections and never finishes them fills the descriptor table, and no peer can connect. With it, that host
gets `per_source` handshakes in progress; a connection over either cap is closed at once (before any TLS
byte is read) and counted in `edged_limit_hits_total{limit="handshakes"|"handshakes_per_source"}`.
"""

from __future__ import annotations

from collections.abc import Callable


class HandshakeGate:
    """Counts handshakes in progress; `admit(address)` before one starts, `done(address)` when it ends."""

    __slots__ = ("_on_refused", "_pending", "in_progress", "per_source", "timeout", "total")

    def __init__(
        self, *, total: int, per_source: int, timeout: float, on_refused: Callable[[str], None] | None = None
    ) -> None:
        self.total = total
        self.per_source = per_source
        self.timeout = timeout  # seconds a handshake may take (the server aborts it then)
        self._on_refused = on_refused  # called with the limit's name
        self._pending: dict[str, int] = {}  # address -> handshakes in progress
        self.in_progress = 0

    def admit(self, address: str) -> bool:
        """Whether a handshake from `address` may start now (then `done(address)` must follow)."""
        mine = self._pending.get(address, 0)
        if self.in_progress >= self.total or mine >= self.per_source:
            if self._on_refused is not None:
                self._on_refused("handshakes_per_source" if mine >= self.per_source else "handshakes")
            return False
        self._pending[address] = mine + 1
        self.in_progress += 1
        return True

    def done(self, address: str) -> None:
        left = self._pending.get(address, 0) - 1
        if left > 0:
            self._pending[address] = left
        else:
            self._pending.pop(address, None)
        self.in_progress -= 1
