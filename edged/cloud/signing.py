"""Signed MQTT messages: who sent a cloud request, an answer or a registry entry, whatever the broker allows.

With a node identity (`edged.identity`: the node's key and certificate from the fleet CA), every request,
answer and registry entry this node publishes is sealed: a CBOR map around the payload with the sender's
certificate chain and an ECDSA P-256 signature over a context string, the topic and the payload,

    {"sv": 1, "p": payload bytes, "c": [leaf DER, intermediate DER...], "s": signature}

and every one it receives must be sealed by a certificate of its trust bundle (`ca.pem`). The topic is
signed too: a sealed message replayed on another topic (an entry of one service on another's topic, an
answer on another node's reply topic) does not verify. Who the sender is (`PeerName(fleet, node)`) is then
checked by the receiver against what the message claims: the node of a registry topic, the reply topic of
a request, the providers of a service.

Cost (CPU, on the 2-core x86 test machine): about 40 us to seal a message and 105 us to open one, two of
each per cloud call (request and answer), and 567 bytes more per message; a chain is verified once and
cached by its bytes (certificates are renewed every 16 h or so). `cryptography` is loaded only when
signatures are on. A bridge also runs a sealed request only once, within its deadline (`ReplayGuard`).
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cbor2

from ..errors import EdgedError
from ..identity import IdentityFiles, PeerName
from ..logs import log_event

if TYPE_CHECKING:
    from ..config import Config
    from ..identity import NodeIdentity, TrustBundle

log = logging.getLogger("edged.cloud.signing")

SEAL_VERSION = 1
CONTEXT = b"hubmesh-mqtt-sealed/1\x00"  # a signature made for anything else never verifies here
MAX_CHAIN_BYTES = 8 * 1024  # a leaf and an intermediate take about 1.2 KiB
CHAIN_CACHE = 1024  # verified chains kept (a fleet of a thousand boxes fits)
RELOAD_CHECK = 30.0  # seconds between looks at the certificate file (renewal replaces it)
DEFAULT_SKEW = 20.0  # seconds, as edged.identity's (whose module loads cryptography: not imported for it)


class SealError(EdgedError):
    """A message is not sealed, or its seal does not verify (bad chain, bad signature, expired)."""


def _signed_bytes(topic: str, payload: bytes) -> bytes:
    return b"".join((CONTEXT, topic.encode("utf-8"), b"\x00", payload))


class Seals:
    """Seals what this node publishes and opens what it receives. One per process (daemon or bridge)."""

    def __init__(
        self,
        files: IdentityFiles,
        *,
        skew: float,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._files = files
        self.skew = skew  # seconds of clock difference tolerated (certificates, and the bridge's replay check)
        self._clock = clock
        self._monotonic = monotonic
        # Verified chains by their bytes: (sender, the leaf's public key, valid from, valid until).
        self._chains: OrderedDict[bytes, tuple[PeerName, Any, float, float]] = OrderedDict()
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        self._algorithm = ec.ECDSA(hashes.SHA256())  # made once: it is per message otherwise
        self.opened = 0
        self.refused = 0
        self.chains_verified = 0  # chain verifications (the cache's misses)
        self._load()

    def __repr__(self) -> str:
        return f"<Seals {self.name} opened={self.opened} refused={self.refused} chains={len(self._chains)}>"

    def _load(self) -> None:
        from ..identity import TrustBundle, load_identity

        identity = load_identity(self._files.dir)
        if identity is None:
            raise SealError(f"{self._files.dir}: no node identity (edged fleet enroll)")
        self._identity: NodeIdentity = identity
        self._bundle: TrustBundle = TrustBundle.load(self._files.ca)
        from cryptography.hazmat.primitives.serialization import Encoding

        self._chain_der = [c.public_bytes(Encoding.DER) for c in identity.chain]
        self._chains.clear()  # a new bundle (CA rotation) may trust other chains
        self._stamp = self._file_stamp()
        self._checked = self._monotonic()

    def _file_stamp(self) -> tuple[float, ...]:
        stamps = []
        for path in (self._files.cert, self._files.ca):
            try:
                stamps.append(os.stat(path).st_mtime)
            except OSError:
                stamps.append(0.0)
        return tuple(stamps)

    def _maybe_reload(self) -> None:
        """Renewal writes a new certificate (and CA rotation a new bundle): take them, at most every 30 s."""
        now = self._monotonic()
        if now - self._checked < RELOAD_CHECK:
            return
        self._checked = now
        if self._file_stamp() != self._stamp:
            try:
                self._load()
                log.info("node identity reloaded: %s", self.name)
            except EdgedError as exc:
                log.error("node identity not reloaded, the old one stays: %s", exc)

    @property
    def name(self) -> PeerName:
        """This node, as its certificate names it."""
        return PeerName(self._identity.fleet, self._identity.node)

    def seal(self, topic: str, payload: bytes) -> bytes:
        """The sealed form of `payload`, to be published on `topic`."""
        self._maybe_reload()
        signature = self._identity.key.sign(_signed_bytes(topic, payload), self._algorithm)
        return cbor2.dumps({"sv": SEAL_VERSION, "p": payload, "c": self._chain_der, "s": signature})

    def open(self, topic: str, data: bytes) -> tuple[PeerName, bytes]:
        """(sender, payload) of a sealed message received on `topic`; SealError when it is not sealed, or not
        by a certificate of the trust bundle, or the signature does not match."""
        try:
            name, payload = self._open(topic, data)
        except SealError:
            self.refused += 1
            raise
        self.opened += 1
        return name, payload

    def _open(self, topic: str, data: bytes) -> tuple[PeerName, bytes]:
        if data[:1] == b"\xff":
            raise SealError("not a sealed message (a CBOR break code)")
        try:
            obj = cbor2.loads(data)
        except Exception as exc:  # cbor2 raises many types on garbage
            raise SealError(f"not a sealed message: {type(exc).__name__}") from None
        if not isinstance(obj, dict) or obj.get("sv") != SEAL_VERSION:
            raise SealError("not a sealed message (unsigned, or another format)")
        payload, chain, signature = obj.get("p"), obj.get("c"), obj.get("s")
        if not isinstance(payload, bytes) or not isinstance(signature, bytes) or len(signature) > 128:
            raise SealError("a sealed message needs a payload and a signature (bytes)")
        if not isinstance(chain, list) or not chain or not all(isinstance(c, bytes) for c in chain):
            raise SealError("a sealed message needs its certificate chain (DER byte strings)")
        if sum(map(len, chain)) > MAX_CHAIN_BYTES:
            raise SealError(f"certificate chain over {MAX_CHAIN_BYTES} bytes")
        name, key = self._verified_chain(chain)
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(signature, _signed_bytes(topic, payload), self._algorithm)
        except (InvalidSignature, ValueError):
            raise SealError(f"bad signature: it does not match the certificate of {name.fleet}/{name.node}") from None
        return name, payload

    def _verified_chain(self, chain: list[bytes]) -> tuple[PeerName, Any]:
        key = b"".join(len(c).to_bytes(4, "big") + c for c in chain)
        now = self._clock()
        cached = self._chains.get(key)
        if cached is not None:
            name, public, start, end = cached
            if start - self.skew <= now <= end + self.skew:
                self._chains.move_to_end(key)
                return name, public
            del self._chains[key]  # expired since: verified again below, which says why
        from cryptography import x509

        try:
            certs = [x509.load_der_x509_certificate(c) for c in chain]
        except ValueError as exc:
            raise SealError(f"a certificate of the chain is not DER: {exc}") from None
        self.chains_verified += 1
        try:
            name = self._bundle.verify(certs, now, self.skew)
        except EdgedError as exc:
            raise SealError(f"certificate not trusted: {exc}") from None
        public = certs[0].public_key()
        from cryptography.hazmat.primitives.asymmetric import ec

        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise SealError(f"the certificate of {name.fleet}/{name.node} does not carry an ECDSA key")
        from ..identity.trust import not_after, not_before  # cryptography: loaded once a chain is checked

        start = not_before(certs[0]).timestamp()
        end = min(not_after(c).timestamp() for c in certs)
        self._chains[key] = (name, public, start, end)
        if len(self._chains) > CHAIN_CACHE:
            self._chains.popitem(last=False)
        return name, public


class ReplayGuard:
    """A bridge's memory of the sealed requests it took: a captured request published again (by anyone who can
    read the broker) is not run twice. A request carries its sender's clock (`ts`): it is taken only within
    its own deadline (plus the clock skew) of being sent, and only once per (sender, id) meanwhile, so the
    memory holds what arrived in the last deadline's worth of time, at most `cap` requests."""

    def __init__(self, skew: float, *, cap: int = 65536, clock: Callable[[], float] = time.time) -> None:
        self._skew = skew
        self._cap = cap
        self._clock = clock
        self._seen: dict[tuple[PeerName, bytes], float] = {}  # -> when it may be forgotten
        self._expiry: list[tuple[float, tuple[PeerName, bytes]]] = []  # a heap of the same

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, sender: PeerName, cid: bytes, sent_ms: int, deadline_ms: int) -> str | None:
        """Why the request must not run (replayed, stale, from the future, memory full), or None (noted)."""
        now = self._clock()
        sent = sent_ms / 1000
        if not sent_ms:
            return "no send time (ts)"
        if sent > now + self._skew:
            return f"sent {sent - now:.0f} s in the future: is the sender's clock (or this one) right?"
        until = sent + deadline_ms / 1000 + self._skew
        if until < now:
            return f"sent {now - sent:.0f} s ago, past its deadline: replayed, or a clock is wrong"
        while self._expiry and self._expiry[0][0] < now:
            _, key = heapq.heappop(self._expiry)
            self._seen.pop(key, None)
        key = (sender, cid)
        if key in self._seen:
            return "replayed"
        if len(self._seen) >= self._cap:
            return f"more than {self._cap} requests within their deadlines"
        self._seen[key] = until
        heapq.heappush(self._expiry, (until, key))
        return None


def identity_files(config: Config) -> IdentityFiles:
    """Where this node's identity lives (`{state.dir}/identity`, or `[identity] dir` where configured)."""
    return IdentityFiles(config.identity_dir)


def node_seals(config: Config) -> Seals | None:
    """The seals of a daemon or bridge by `[mqtt] signed`: "auto" signs when the node has an identity,
    "required" refuses to run without one, "off" never signs (and takes unsigned messages)."""
    mode = config.mqtt.signed
    if mode == "off":
        return None
    seals = load_seals(identity_files(config).dir, skew=config.identity.clock_skew, required=mode == "required")
    if seals is not None and seals.name != (config.node.fleet, config.node.name):
        # Others check the reply topic and registry topics against the certificate: nothing would work.
        raise SealError(
            f"the node certificate names {seals.name.fleet}/{seals.name.node}, the config "
            f"{config.node.fleet}/{config.node.name} ([node] fleet and name must match it)"
        )
    if seals is None:
        log_event(
            log,
            logging.WARNING,
            "mqtt.unsigned",
            detail="no node identity: cloud calls, answers and registry entries are not signed, and are taken "
            "from anyone on the broker (edged fleet enroll; [mqtt] signed)",
        )
    return seals


def load_seals(identity_folder: str, *, skew: float, required: bool) -> Seals | None:
    """This node's seals when it has an identity in `identity_folder`; None when it has none and `required`
    is False (the cloud tier then trusts anyone on the broker, and says so). SealError when required and
    missing, or when the files are there but unusable."""
    files = IdentityFiles(identity_folder)
    if not files.present():
        if required:
            raise SealError(f'[mqtt] signed = "required" but {identity_folder} holds no identity (edged fleet enroll)')
        return None
    try:
        return Seals(files, skew=skew)
    except EdgedError as exc:
        raise SealError(f"cannot sign MQTT messages: {exc}") from None
