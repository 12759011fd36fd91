"""Peer admission over mutual TLS: a peer found by mDNS gets calls only once a TLS handshake proved it.

mDNS is unauthenticated: anyone on the LAN can advertise `_hubmesh._tcp` with any node and fleet in its TXT
record. So an advertised peer is only a candidate until a handshake with its ingress (at the advertised
address and port) presented a certificate of the fleet CA naming `spiffe://{our fleet}/node/{advertised node}`.
The connection the proof used stays in the peer pool and carries the calls that follow (one handshake per
peer, not per call), and every later connection to that address must prove the same name (`PeerTls.check`).

A candidate that fails is not tried again before `retry_after` (doubling up to `retry_max`): a rogue
responder costs this node one refused handshake per interval, and gets no calls.

An mDNS goodbye for an admitted peer is a hint only (anyone can forge one): `gone()` asks the peer itself, over
the pool (its proved connections), and believes a 503 `leaving`, a refused or reset connection, or silence for
the whole window; a peer that keeps answering as itself stays.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass

from ..errors import EdgedError, IdentityError, UpstreamTimeout
from ..http.client import UpstreamPool, UpstreamTls
from ..identity import IdentityFiles
from ..identity.files import peer_name_of
from ..identity.tls import client_context
from ..logs import log_event
from ..model import Target, parse_target
from .peers import url_host

log = logging.getLogger("edged.edge.admission")

PROBE_PATH = "/healthz"
RETRY_AFTER = 5.0
RETRY_MAX = 60.0
GOODBYE_WINDOW = 1.5  # seconds a goodbye is checked for: an edged that leaves says so within milliseconds
GOODBYE_PROBE_EVERY = 0.25


class PeerTls:
    """The client side of mutual TLS to peers: our certificate, and which node each ingress address must be.

    Once a handshake at an address proved a node, that address is that node's until it is no longer advertised
    there: pooled connections to it carry no new proof, so another name advertised at the same address is
    refused outright rather than served over the first node's connections."""

    def __init__(self, files: IdentityFiles, fleet: str, *, load: bool = True) -> None:
        self.context: ssl.SSLContext = client_context(files, load=load)  # load False: enrolled later (keeper)
        self.fleet = fleet
        # (address, port) -> the nodes advertised there: a handshake may prove any one of them (a second name
        # advertised at a real node's address must not stop that node's proof; it is refused by `Admission`).
        self._expected: dict[tuple[str, int], set[str]] = {}
        self.proved: dict[tuple[str, int], str] = {}  # (address, port) -> the node its handshakes proved

    def claim(self, address: str, port: int, node: str) -> str | None:
        """`node` is advertised at `address:port`: None when a handshake may prove it, else why it cannot."""
        proved = self.proved.get((address, port))
        if proved is not None and proved != node:
            return f"the certificate at {address}:{port} names node {proved!r}, not the advertised {node!r}"
        self._expected.setdefault((address, port), set()).add(node)
        return None

    def forget(self, keep: set[tuple[str, str, int]]) -> list[tuple[str, int]]:
        """Keep what is known of (node, address, port) still advertised; the addresses whose proved node left."""
        gone = [key for key, node in self.proved.items() if (node, *key) not in keep]
        for key in gone:
            del self.proved[key]
        for key, nodes in list(self._expected.items()):
            nodes.intersection_update(node for node in list(nodes) if (node, *key) in keep)
            if not nodes:
                del self._expected[key]
        return gone

    def check(self, target: Target, peercert: dict | None) -> None:
        """Called by the pool once per new connection, after OpenSSL verified the chain against the bundle."""
        if not peercert:
            raise IdentityError("the peer presented no certificate")
        name = peer_name_of(peercert)
        key = (target.host, target.port)
        proved = self.proved.get(key)
        expected = {proved} if proved is not None else self._expected.get(key, set())
        if name.fleet != self.fleet:
            raise IdentityError(f"the certificate names fleet {name.fleet!r}, not {self.fleet!r}")
        if not expected:
            raise IdentityError(f"no node is advertised at {target.host}:{target.port}")
        if name.node not in expected:
            advertised = " or ".join(repr(node) for node in sorted(expected))
            raise IdentityError(f"the certificate names node {name.node!r}, not the advertised {advertised}")
        self.proved[key] = name.node

    def proved_at(self, address: str, port: int) -> str | None:
        """The node the handshakes at `address:port` proved, if any."""
        return self.proved.get((address, port))

    def upstream(self) -> UpstreamTls:
        return UpstreamTls(self.context, self.check)


@dataclass(slots=True)
class _Refused:
    until: float
    delay: float
    reason: str


class Admission:
    """Which advertised (node, address, port) have proved who they are; proves new ones with one request."""

    def __init__(self, tls: PeerTls, pool: UpstreamPool, *, timeout: float, on_refused=None) -> None:
        self._tls = tls
        self._pool = pool
        self._timeout = timeout
        self._refused: dict[tuple[str, str, int], _Refused] = {}
        self._on_refused = on_refused  # counts refusals (a metric), told the node
        self.admitted: dict[str, tuple[str, int]] = {}  # node -> (address, port) proved

    def target(self, address: str, port: int) -> Target:
        return parse_target(f"https://{url_host(address)}:{port}")

    async def admit(self, node: str, address: str, port: int) -> bool:
        """Whether `node` advertised at `address:port` proved it: True at once when it already has (and its
        connections to it are checked as they open), else after a handshake and a `GET /healthz` over the peer pool."""
        key = (node, address, port)
        if self.admitted.get(node) == (address, port):
            return True
        refused = self._refused.get(key)
        if refused is not None and refused.until > time.monotonic():
            return False
        reason = self._tls.claim(address, port, node)
        if reason is not None:
            self._refuse(key, reason)
            return False
        try:
            answer = await self._pool.request(self.target(address, port), "GET", PROBE_PATH, [], b"", self._timeout)
            answer.discard()
            if answer.status != 200:
                raise EdgedError(f"its ingress answered {answer.status} to {PROBE_PATH}")
        except (EdgedError, OSError) as exc:
            self._refuse(key, str(exc))
            return False
        proved = self._tls.proved_at(address, port)
        if proved != node:  # the handshake proved another node advertised at the same address
            self._refuse(key, f"the certificate at {address}:{port} names node {proved!r}, not the advertised {node!r}")
            return False
        self._refused.pop(key, None)
        if self.admitted.get(node) != (address, port):
            log_event(log, logging.INFO, "edge.peer_admitted", node=node, address=address, port=port)
        self.admitted[node] = (address, port)
        return True

    def proved(self, node: str, address: str, port: int) -> bool:
        """Whether `node` at `address:port` is admitted now."""
        return self.admitted.get(node) == (address, port)

    async def gone(self, node: str, address: str, port: int) -> bool:
        """After a goodbye for an admitted peer: True once the peer says it is leaving (503 over its proved
        connection), its ingress refuses or resets, or nothing answered within GOODBYE_WINDOW; False when it
        still answers 200 as itself (the goodbye was forged, or it came back)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + GOODBYE_WINDOW
        target = self.target(address, port)
        while True:
            answered = False
            try:
                left = max(0.05, end - loop.time())
                answer = await self._pool.request(target, "GET", PROBE_PATH, [], b"", min(self._timeout, left))
                answer.discard()
                if answer.status != 200:
                    return True
                answered = self._tls.proved_at(address, port) == node
            except UpstreamTimeout:
                pass  # no evidence either way: ask again while the window lasts
            except (EdgedError, OSError):
                return True  # refused, reset, or its handshake no longer proves it
            if loop.time() >= end:
                return not answered
            await asyncio.sleep(GOODBYE_PROBE_EVERY)

    def _refuse(self, key: tuple[str, str, int], reason: str) -> None:
        node, address, port = key
        before = self._refused.get(key)
        delay = RETRY_AFTER if before is None else min(RETRY_MAX, before.delay * 2)
        self._refused[key] = _Refused(time.monotonic() + delay, delay, reason)
        if self.admitted.get(node) == (address, port):
            del self.admitted[node]
        if before is None or before.reason != reason:
            log_event(
                log,
                logging.WARNING,
                "edge.peer_refused",
                node=node,
                address=address,
                port=port,
                reason=reason,
                detail=f"{node} at {address}:{port} gets no calls: its TLS handshake did not prove it ({reason})",
            )
        if self._on_refused is not None:
            self._on_refused(node)

    def forget(self, keep: set[tuple[str, str, int]]) -> None:
        """Drop what is known of candidates no longer advertised (a flood of made-up names cannot grow this)."""
        for key in [k for k in self._refused if k not in keep]:
            del self._refused[key]
        for node, where in list(self.admitted.items()):
            if (node, *where) not in keep:
                del self.admitted[node]
        for address, port in self._tls.forget(keep):
            self._pool.close_idle(self.target(address, port).key)  # their proof left with the node

    def refused(self) -> list[dict]:
        """For `edged status`: candidates refused now, and why."""
        return [{"node": n, "address": a, "port": p, "reason": r.reason} for (n, a, p), r in self._refused.items()]

    def gather(self, candidates: list[tuple[str, str, int]]) -> asyncio.Future:
        """Prove all `candidates` at once (one slow rogue does not hold up the rest)."""
        return asyncio.gather(*(self.admit(*c) for c in candidates))
