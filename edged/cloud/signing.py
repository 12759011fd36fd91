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

Cost (CPU, on the 2-core x86 test machine): about 40 us to seal a message and 105 us to open one, and 567
bytes more per message; a chain is verified once and cached by its bytes (certificates are renewed every
16 h or so). Requests and answers, sent again and again between the same pairs of nodes, are MAC'd under
a key each pair derives once instead (`seal_to`, `pairing.py`: about 20 us to make, 15 us to check, 84
bytes); entries and statuses keep the seal, which every box can check. `cryptography` is loaded only when
signatures are on. A bridge also runs a request only once, within its deadline (`ReplayGuard`).
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cbor2

from ..errors import EdgedError
from ..identity import IdentityFiles, PeerName, spiffe_id
from ..logs import log_event
from . import pairing
from .pairing import MAC_VERSION, MAX_RECIPIENTS, Pair, PeerCert

if TYPE_CHECKING:
    from ..config import Config
    from ..identity import NodeIdentity, TrustBundle

log = logging.getLogger("edged.cloud.signing")

SEAL_VERSION = 1
CONTEXT = b"hubmesh-mqtt-sealed/1\x00"  # a signature made for anything else never verifies here
MAX_CHAIN_BYTES = 8 * 1024  # a leaf and an intermediate take about 1.2 KiB
CHAIN_CACHE = 1024  # verified chains kept (a fleet of a thousand boxes fits)
PAIR_CACHE = 1024  # per-pair MAC keys kept (pairing.py): a caller and the bridges it calls, a bridge and its callers
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
        chain_cache: int = CHAIN_CACHE,
        pair_cache: int = PAIR_CACHE,
        macs: bool = True,
    ) -> None:
        self._files = files
        self.macs = macs  # False: `seal_to` seals with ECDSA (for peers that only open ECDSA seals)
        self.skew = skew  # seconds of clock difference tolerated (certificates, and the bridge's replay check)
        self._clock = clock
        self._monotonic = monotonic
        self._chain_cap = chain_cache
        self._pair_cap = pair_cache
        # Verified chains by their bytes, and the same certificates by fingerprint (a MAC'd message names its
        # sender by fingerprint), and each node's latest certificate (to address a MAC to it).
        self._chains: OrderedDict[bytes, PeerCert] = OrderedDict()
        self._certs: OrderedDict[bytes, PeerCert] = OrderedDict()
        self._latest: dict[PeerName, bytes] = {}
        # Pair keys by (peer fingerprint, own fingerprint): derived once (ECDH + HKDF), dropped at expiry.
        self._pairs: OrderedDict[tuple[bytes, bytes], Pair] = OrderedDict()
        self._previous: _Own | None = None  # the certificate before a renewal: MACs to it count until it expires
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        self._algorithm = ec.ECDSA(hashes.SHA256())  # made once: it is per message otherwise
        self.opened = 0
        self.refused = 0
        self.chains_verified = 0  # chain verifications (the cache's misses)
        self.pairs_derived = 0  # ECDH + HKDF (once per pair of certificates)
        self.last_mac = False  # whether the message `open` took last was MAC'd (answer it MAC'd, then)
        self._load()

    def __repr__(self) -> str:
        return (
            f"<Seals {self.name} opened={self.opened} refused={self.refused} chains={len(self._chains)}"
            f" pairs={len(self._pairs)}>"
        )

    def _load(self) -> None:
        from ..identity import TrustBundle, load_identity

        identity = load_identity(self._files.dir)
        if identity is None:
            raise SealError(f"{self._files.dir}: no node identity (edged fleet enroll)")
        bundle = TrustBundle.load(self._files.ca)
        from cryptography.hazmat.primitives.serialization import Encoding

        from ..identity.trust import not_after

        chain_der = [c.public_bytes(Encoding.DER) for c in identity.chain]
        end = min(not_after(c).timestamp() for c in identity.chain)
        own = _Own(identity.key, pairing.fingerprint(chain_der[0]), end)
        old = getattr(self, "_own", None)
        if old is not None and old.fp != own.fp:
            self._previous = old  # MACs made to the old certificate by peers that have not seen the new one
        self._identity: NodeIdentity = identity
        self._own = own
        self._chain_der = chain_der
        if getattr(self, "_bundle", None) is None or _bundle_bytes(bundle) != _bundle_bytes(self._bundle):
            # A new bundle (CA rotation, a CA removed) may trust other chains: every verified certificate and
            # every pair key made with one is forgotten.
            self._chains.clear()
            self._certs.clear()
            self._latest.clear()
            self._pairs.clear()
        self._bundle: TrustBundle = bundle
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

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of this node's certificate (DER): how MAC'd messages name it."""
        return self._own.fp

    def seal(self, topic: str, payload: bytes) -> bytes:
        """The sealed form of `payload`, to be published on `topic`."""
        self._maybe_reload()
        signature = self._identity.key.sign(_signed_bytes(topic, payload), self._algorithm)
        return cbor2.dumps({"sv": SEAL_VERSION, "p": payload, "c": self._chain_der, "s": signature})

    def open(self, topic: str, data: bytes, *, macs: bool = False) -> tuple[PeerName, bytes]:
        """(sender, payload) of a sealed message received on `topic`; SealError when it is not sealed, or not
        by a certificate of the trust bundle, or the signature does not match. With `macs` (requests and
        answers), a message MAC'd to this node under a pair key (`seal_to`) is taken too."""
        try:
            name, payload = self._open(topic, data, macs)
        except SealError:
            self.refused += 1
            raise
        self.opened += 1
        return name, payload

    def _open(self, topic: str, data: bytes, macs: bool) -> tuple[PeerName, bytes]:
        if data[:1] == b"\xff":
            raise SealError("not a sealed message (a CBOR break code)")
        try:
            obj = cbor2.loads(data)
        except Exception as exc:  # cbor2 raises many types on garbage
            raise SealError(f"not a sealed message: {type(exc).__name__}") from None
        self.last_mac = False
        if macs and isinstance(obj, dict) and obj.get("sv") == MAC_VERSION:
            opened = self._open_mac(topic, obj)
            self.last_mac = True
            return opened
        if not isinstance(obj, dict) or obj.get("sv") != SEAL_VERSION:
            raise SealError("not a sealed message (unsigned, or another format)")
        payload, chain, signature = obj.get("p"), obj.get("c"), obj.get("s")
        if not isinstance(payload, bytes) or not isinstance(signature, bytes) or len(signature) > 128:
            raise SealError("a sealed message needs a payload and a signature (bytes)")
        if not isinstance(chain, list) or not chain or not all(isinstance(c, bytes) for c in chain):
            raise SealError("a sealed message needs its certificate chain (DER byte strings)")
        if sum(map(len, chain)) > MAX_CHAIN_BYTES:
            raise SealError(f"certificate chain over {MAX_CHAIN_BYTES} bytes")
        cert = self._verified_chain(chain)
        name = cert.name
        from cryptography.exceptions import InvalidSignature

        try:
            cert.public.verify(signature, _signed_bytes(topic, payload), self._algorithm)
        except (InvalidSignature, ValueError):
            raise SealError(f"bad signature: it does not match the certificate of {name.fleet}/{name.node}") from None
        return name, payload

    def _verified_chain(self, chain: list[bytes]) -> PeerCert:
        key = b"".join(len(c).to_bytes(4, "big") + c for c in chain)
        now = self._clock()
        cached = self._chains.get(key)
        if cached is not None:
            if self._valid(cached, now):
                self._chains.move_to_end(key)
                return cached
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

        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
            raise SealError(f"the certificate of {name.fleet}/{name.node} does not carry an ECDSA P-256 key")
        from ..identity.trust import not_after, not_before  # cryptography: loaded once a chain is checked

        start = not_before(certs[0]).timestamp()
        end = min(not_after(c).timestamp() for c in certs)
        cert = PeerCert(name, public, pairing.fingerprint(chain[0]), start, end)
        self._chains[key] = cert
        if len(self._chains) > self._chain_cap:
            self._chains.popitem(last=False)
        self._remember(cert)
        return cert

    def _valid(self, cert: PeerCert, now: float) -> bool:
        return cert.start - self.skew <= now <= cert.end + self.skew

    def _remember(self, cert: PeerCert) -> None:
        """Index a verified certificate by fingerprint, and as its node's latest (the one MACs are made to)."""
        self._certs[cert.fp] = cert
        self._certs.move_to_end(cert.fp)
        if len(self._certs) > self._chain_cap:
            _, gone = self._certs.popitem(last=False)
            if self._latest.get(gone.name) == gone.fp:
                del self._latest[gone.name]
        latest = self._certs.get(self._latest.get(cert.name, b""))
        if latest is None or latest.start <= cert.start:
            self._latest[cert.name] = cert.fp

    def learn(self, chain: list[bytes]) -> PeerName:
        """Verify a node's chain (as a sealed message carries it) and remember its certificate: MACs can then be
        made to that node. SealError when it does not verify."""
        return self._verified_chain(chain).name

    # -- per-pair MACs (pairing.py) ---------------------------------------------------------------------------

    def seal_to(self, topic: str, payload: bytes, recipients: Iterable[PeerName]) -> bytes:
        """`payload` for `topic`, MAC'd to each of `recipients` under the key of its pair with this node; sealed
        with ECDSA (`seal`) instead when one of them has no known, valid certificate, or they are more than
        MAX_RECIPIENTS (or none). This node's chain goes along until every recipient has shown it knows it."""
        self._maybe_reload()
        names = set(recipients)
        if not self.macs or not names or len(names) > MAX_RECIPIENTS:
            return self.seal(topic, payload)
        now = self._clock()
        pairs = []
        for name in names:
            cert = self._certs.get(self._latest.get(name, b""))
            if cert is None or not self._valid(cert, now):
                return self.seal(topic, payload)
            pairs.append(self._pair(cert, self._own, now))
        message = pairing.digest(topic, payload)
        own = self._own.fp
        tags = [[p.peer.fp[: pairing.TAG_BYTES], pairing.mac(p.hmac, own, p.peer.fp, message)] for p in pairs]
        obj: dict[str, Any] = {"sv": MAC_VERSION, "p": payload, "f": own, "m": tags}
        if not all(p.acked for p in pairs):
            obj["c"] = self._chain_der
        return cbor2.dumps(obj)

    def unack(self, names: Iterable[PeerName]) -> None:
        """Send this node's chain again to these nodes (a call to them timed out: one may have restarted and
        forgotten our certificate, and it cannot say so)."""
        gone = set(names)
        for pair in self._pairs.values():
            if pair.peer.name in gone:
                pair.acked = False

    def _pair(self, cert: PeerCert, own: _Own, now: float) -> Pair:
        key = (cert.fp, own.fp)
        pair = self._pairs.get(key)
        if pair is not None and now <= pair.end + self.skew:
            self._pairs.move_to_end(key)
            return pair
        from cryptography.hazmat.primitives.asymmetric import ec

        shared = own.key.exchange(ec.ECDH(), cert.public)
        fleet = self._identity.fleet
        secret = pairing.pair_key(
            shared, fleet, (own.fp, spiffe_id(fleet, self._identity.node)), (cert.fp, spiffe_id(*cert.name))
        )
        self.pairs_derived += 1
        pair = self._pairs[key] = Pair(secret, cert, own.fp, min(cert.end, own.end), pairing.keyed(secret))
        if len(self._pairs) > self._pair_cap:
            self._pairs.popitem(last=False)
        return pair

    def _open_mac(self, topic: str, obj: dict) -> tuple[PeerName, bytes]:
        payload, sender_fp, tags, chain = obj.get("p"), obj.get("f"), obj.get("m"), obj.get("c")
        if not isinstance(payload, bytes) or not isinstance(sender_fp, bytes) or len(sender_fp) != pairing.FP_BYTES:
            raise SealError("a MAC'd message needs a payload and its sender's fingerprint (bytes)")
        if not isinstance(tags, list) or not 0 < len(tags) <= MAX_RECIPIENTS:
            raise SealError(f"a MAC'd message needs 1..{MAX_RECIPIENTS} MACs")
        now = self._clock()
        own, tag = None, None
        for candidate in (self._own, self._previous):
            if candidate is None or now > candidate.end + self.skew:
                continue
            for item in tags:
                if isinstance(item, list) and len(item) == 2 and item[0] == candidate.fp[: pairing.TAG_BYTES]:
                    own, tag = candidate, item[1]
                    break
            if own is not None:
                break
        if own is None or not isinstance(tag, bytes):
            raise SealError("not MAC'd to this node's certificate")
        if chain is not None:
            if not isinstance(chain, list) or not chain or not all(isinstance(c, bytes) for c in chain):
                raise SealError("a MAC'd message's chain must be DER byte strings")
            if sum(map(len, chain)) > MAX_CHAIN_BYTES:
                raise SealError(f"certificate chain over {MAX_CHAIN_BYTES} bytes")
            cert = self._verified_chain(chain)
            if cert.fp != sender_fp:
                raise SealError("the chain of a MAC'd message is not its sender's")
        else:
            cert = self._certs.get(sender_fp)
            if cert is None:
                raise SealError("MAC'd by a certificate not seen here (its chain did not come along)")
            if not self._valid(cert, now):
                raise SealError(f"MAC'd by a certificate of {cert.name.fleet}/{cert.name.node} that expired")
        pair = self._pair(cert, own, now)
        if not pairing.verify_mac(pair.hmac, sender_fp, own.fp, pairing.digest(topic, payload), tag):
            raise SealError(f"bad MAC: not made by {cert.name.fleet}/{cert.name.node} for this node and topic")
        if own is self._own:
            pair.acked = True  # it made a MAC to our current certificate: it has our chain
        latest = self._certs.get(self._latest.get(cert.name, b""))
        if latest is None or latest.start <= cert.start:
            self._latest[cert.name] = cert.fp  # answers go to the certificate that just spoke
        return cert.name, payload


@dataclass(frozen=True, slots=True)
class _Own:
    """One certificate of this node, for pair keys: its key, fingerprint and end of validity."""

    key: Any  # EllipticCurvePrivateKey
    fp: bytes
    end: float


def _bundle_bytes(bundle: TrustBundle) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return b"".join(c.public_bytes(Encoding.DER) for c in bundle.cas)


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


def sealed_payload(data: bytes) -> bytes:
    """What a sealed message carries, NOT verified (for a listing on a box without an identity); SealError
    when `data` is not a sealed message."""
    try:
        obj = cbor2.loads(data) if data[:1] != b"\xff" else None
    except Exception:  # cbor2 raises many types on garbage
        obj = None
    if not isinstance(obj, dict) or obj.get("sv") != SEAL_VERSION or not isinstance(obj.get("p"), bytes):
        raise SealError("not a sealed message")
    return obj["p"]


def identity_files(config: Config) -> IdentityFiles:
    """Where this node's identity lives (`{state.dir}/identity`, or `[identity] dir` where configured)."""
    return IdentityFiles(config.identity_dir)


def node_seals(config: Config) -> Seals | None:
    """The seals of a daemon or bridge by `[mqtt] signed`: "auto" signs when the node has an identity,
    "required" refuses to run without one, "off" never signs (and takes unsigned messages)."""
    mode = config.mqtt.signed
    if mode == "off":
        return None
    seals = load_seals(
        identity_files(config).dir, skew=config.identity.clock_skew, required=mode == "required", macs=config.mqtt.macs
    )
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


def load_seals(identity_folder: str, *, skew: float, required: bool, macs: bool = True) -> Seals | None:
    """This node's seals when it has an identity in `identity_folder`; None when it has none and `required`
    is False (the cloud tier then trusts anyone on the broker, and says so). SealError when required and
    missing, or when the files are there but unusable."""
    files = IdentityFiles(identity_folder)
    if not files.present():
        if required:
            raise SealError(f'[mqtt] signed = "required" but {identity_folder} holds no identity (edged fleet enroll)')
        return None
    try:
        return Seals(files, skew=skew, macs=macs)
    except EdgedError as exc:
        raise SealError(f"cannot sign MQTT messages: {exc}") from None
