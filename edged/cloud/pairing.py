"""Per-pair MAC keys: one ECDH per pair of nodes, then an HMAC per cloud request and answer.

An ECDSA seal (`signing.py`, `"sv": 1`) costs about 40 us to make and 100 us to check, and a cloud call pays
two of each. Requests and answers are sent again and again between the same few pairs of nodes (a caller
and the bridges that serve a service), so each pair agrees on a key once and then authenticates each
message with HMAC-SHA256 (a few microseconds). Registry entries, statuses and fleet config keep ECDSA: they
are read by every box, not by one peer.

The key of a pair (A, B), both certificates verified against the fleet CA:

    shared = ECDH(A's certificate key, B's certificate public key)            (P-256, static-static)
    key    = HKDF-SHA256(salt = SALT, ikm = shared,
                         info = PURPOSE | fleet | both SPIFFE ids | both certificate fingerprints, sorted)

Its epoch is the pair of certificates: a renewed certificate (every 16 h or so) has another fingerprint,
so the pair gets a new key, and no key outlives either certificate (it is dropped at the earlier notAfter).
Static-static ECDH with the signing key: leaf certificates state both uses in their KeyUsage
(digitalSignature for TLS and seals, keyAgreement for this; certificates issued before this was added state
only the first and are still accepted until they expire, within a day); using
the same P-256 key for ECDH and ECDSA is jointly secure (Degabriele et al., "On the joint security of
encryption and signature in EMV", CT-RSA 2012) and needs no extra key, no extra message and no extra
round trip. Nothing is encrypted: the MAC authenticates, as the signature did.

A MAC'd message (`"sv": 2`):

    {"sv": 2, "p": payload, "f": sender's certificate fingerprint (SHA-256 of its DER, 32 bytes),
     "m": [[recipient fingerprint, first 16 bytes; MAC, 16 bytes], ...],
     "c": [sender's chain, DER...]}   # only until the recipient has shown that it knows the sender's certificate

    MAC = HMAC-SHA256(pair key, CONTEXT | sender fingerprint | recipient fingerprint
                                | SHA-256(topic | 0 | payload))[:16]

A request carries one MAC for each node that serves the service (the broker hands it to one bridge of each
group: the caller cannot know which), at most MAX_RECIPIENTS; an answer carries one, for its caller. The
sender and recipient are in the MAC, so a message of A to B is not one of B to A, nor one of A to C; the
topic is in it, so a message replayed on another topic does not verify. Replays on the same topic are the
receiver's business, as with seals (a bridge runs a request once, within its deadline, by its id and send
time, which the MAC covers; an answer is taken once, for a call waiting with its id).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from ..identity import PeerName

MAC_VERSION = 2
SALT = b"hubmesh-pair-key/1"
PURPOSE = b"mqtt-mac"
CONTEXT = b"hubmesh-mqtt-mac/1\x00"
FP_BYTES = 32  # a certificate's fingerprint: SHA-256 of its DER
TAG_BYTES = 16  # a recipient's fingerprint prefix in "m"
MAC_BYTES = 16  # HMAC-SHA256 truncated to 128 bits (as RFC 4868's HMAC-SHA-256-128)
MAX_RECIPIENTS = 8  # more providers of one service than this: the request is sealed with ECDSA instead


def fingerprint(der: bytes) -> bytes:
    """A certificate's fingerprint: SHA-256 of its DER."""
    return hashlib.sha256(der).digest()


@dataclass(slots=True)
class PeerCert:
    """A node certificate whose chain verified: who it names, its key and fingerprint, its validity (Unix s)."""

    name: PeerName
    public: Any  # EllipticCurvePublicKey
    fp: bytes
    start: float
    end: float


@dataclass(slots=True)
class Pair:
    """The key this node shares with one peer certificate, for one certificate of its own."""

    key: bytes
    peer: PeerCert
    own_fp: bytes
    end: float  # the earlier notAfter of the two certificates
    hmac: Any = None  # HMAC-SHA256 under `key`, fed CONTEXT: copied for each message (no key setup each time)
    acked: bool = False  # the peer MAC'd a message to our certificate: it knows it, no need to send our chain


def pair_key(shared: bytes, fleet: str, a: tuple[bytes, str], b: tuple[bytes, str]) -> bytes:
    """The HKDF-SHA256 key of a pair from their ECDH secret; `a` and `b` are (fingerprint, SPIFFE id), in any
    order (both sides derive the same key)."""
    (fp_lo, id_lo), (fp_hi, id_hi) = sorted((a, b))
    info = b"\x00".join((PURPOSE, fleet.encode(), id_lo.encode(), id_hi.encode())) + b"\x00" + fp_lo + fp_hi
    prk = hmac.digest(SALT, shared, "sha256")  # HKDF-Extract
    return hmac.digest(prk, info + b"\x01", "sha256")  # HKDF-Expand, one block


def digest(topic: str, payload: bytes) -> bytes:
    """What every MAC of one message covers: its topic and payload, hashed once whatever the recipients."""
    h = hashlib.sha256(topic.encode("utf-8"))
    h.update(b"\x00")
    h.update(payload)
    return h.digest()


def keyed(key: bytes) -> Any:
    """An HMAC-SHA256 under a pair key, fed CONTEXT already: `mac` copies it for each message."""
    return hmac.new(key, CONTEXT, "sha256")


def mac(keyed_hmac: Any, sender_fp: bytes, recipient_fp: bytes, message_digest: bytes) -> bytes:
    """The MAC of a message from `sender_fp` to `recipient_fp` under their pair key (`keyed(key)`)."""
    h = keyed_hmac.copy()
    h.update(sender_fp + recipient_fp + message_digest)
    return h.digest()[:MAC_BYTES]


def verify_mac(keyed_hmac: Any, sender_fp: bytes, recipient_fp: bytes, message_digest: bytes, tag: bytes) -> bool:
    """Whether `tag` is that MAC (in constant time)."""
    return hmac.compare_digest(mac(keyed_hmac, sender_fp, recipient_fp, message_digest), tag)
