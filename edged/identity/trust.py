"""The fleet trust bundle: which CAs this box trusts, chain verification with a clock-skew allowance, signatures.

Chains are walked by hand rather than with `cryptography.x509.verification` (cryptography 42+): edged's floor is
the cryptography of Debian 12 (38). The rules are the few a SPIFFE-style mesh needs: every certificate in its
validity window (± skew), each signed by the next, the last signed by a CA of the bundle, intermediates and
anchors marked as CAs and within their path length, the leaf not a CA and carrying exactly one
`spiffe://FLEET/node/NODE` URI SAN, and the fleet the one each CA of the chain was made for (`spiffe://FLEET` in
its own SAN).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from ..errors import IdentityError
from .files import read_pem
from .names import PeerName, parse_spiffe_id, parse_trust_domain, single_uri

MAX_CHAIN = 4  # leaf + intermediates: deeper chains are refused before any signature is checked
MAX_BUNDLE = 8  # CAs in one bundle: two during a rotation, a few more at most
DEFAULT_SKEW = 20.0  # seconds of clock skew allowed (Linkerd's default)
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)
_UTC = dt.timezone.utc


def load_certificates(pem: bytes, where: str = "certificate") -> list[x509.Certificate]:
    """Every certificate of a PEM text, in order; IdentityError when there is none or one is malformed."""
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise IdentityError(f"{where}: no PEM certificate found")
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as exc:
        raise IdentityError(f"{where}: malformed certificate: {exc}") from exc


def not_before(cert: x509.Certificate) -> dt.datetime:
    """The start of validity, timezone-aware (cryptography < 42 only has the naive attribute)."""
    value = getattr(cert, "not_valid_before_utc", None)
    return value if value is not None else cert.not_valid_before.replace(tzinfo=_UTC)


def not_after(cert: x509.Certificate) -> dt.datetime:
    """The end of validity, timezone-aware."""
    value = getattr(cert, "not_valid_after_utc", None)
    return value if value is not None else cert.not_valid_after.replace(tzinfo=_UTC)


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The certificate's URI SANs (none when it has no SAN extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def is_ca(cert: x509.Certificate) -> bool:
    """True when the certificate may sign others (basicConstraints CA:TRUE)."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def path_length(cert: x509.Certificate) -> int | None:
    """How many CAs may stand between this CA and a leaf (basicConstraints pathLen; None = no limit)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    except x509.ExtensionNotFound:
        return None


def _check_depth(ca: x509.Certificate, below: int) -> None:
    limit = path_length(ca)
    if limit is not None and below > limit:
        raise IdentityError(f"{_describe(ca)} may have {limit} CA(s) under it, and this chain puts {below}")


def ca_fleet(cert: x509.Certificate) -> str | None:
    """The fleet a CA was made for (its `spiffe://FLEET` URI SAN), or None for a CA that names none."""
    uris = uri_sans(cert)
    return parse_trust_domain(uris[0]) if len(uris) == 1 else None


def peer_name(cert: x509.Certificate) -> PeerName:
    """The (fleet, node) a node certificate names; IdentityError unless it has exactly one node SPIFFE ID."""
    return PeerName(*parse_spiffe_id(single_uri(uri_sans(cert))))


def _describe(cert: x509.Certificate) -> str:
    uris = uri_sans(cert)
    return uris[0] if uris else cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def _now(now: dt.datetime | float | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(_UTC)
    if isinstance(now, (int, float)):
        return dt.datetime.fromtimestamp(now, _UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=_UTC)


def check_validity(cert: x509.Certificate, now: dt.datetime, skew: float) -> None:
    """IdentityError when `now` (± skew) is outside the certificate's validity: names a wrong clock as a cause."""
    allowance = dt.timedelta(seconds=skew)
    start, end = not_before(cert), not_after(cert)
    if now + allowance < start:
        raise IdentityError(
            f"certificate {_describe(cert)} is not valid before {start:%Y-%m-%dT%H:%M:%SZ} and the clock says"
            f" {now:%Y-%m-%dT%H:%M:%SZ}: is this box's clock right?"
        )
    if now - allowance > end:
        raise IdentityError(f"certificate {_describe(cert)} expired at {end:%Y-%m-%dT%H:%M:%SZ}")


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when `issuer`'s key made `cert`'s signature (and the names chain)."""
    if cert.issuer != issuer.subject:
        return False
    key = issuer.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


class TrustBundle:
    """The fleet CAs a box trusts (`ca.pem`). More than one during a CA rotation: old and new both verify."""

    __slots__ = ("cas",)

    def __init__(self, cas: Sequence[x509.Certificate]) -> None:
        if not cas:
            raise IdentityError("the trust bundle holds no CA certificate")
        if len(cas) > MAX_BUNDLE:
            raise IdentityError(f"the trust bundle holds {len(cas)} certificates, more than {MAX_BUNDLE}")
        for cert in cas:
            if not is_ca(cert):
                raise IdentityError(f"the trust bundle holds {_describe(cert)}, which is not a CA certificate")
        self.cas = tuple(cas)

    @classmethod
    def load(cls, path: str) -> TrustBundle:
        """The bundle in a PEM file (`{state.dir}/identity/ca.pem`)."""
        return cls(load_certificates(read_pem(path, "trust bundle"), path))

    @classmethod
    def from_pem(cls, pem: bytes) -> TrustBundle:
        return cls(load_certificates(pem, "trust bundle"))

    def fleets(self) -> set[str]:
        """The fleets the bundle's CAs were made for."""
        return {fleet for fleet in map(ca_fleet, self.cas) if fleet is not None}

    def verify(
        self, chain: Sequence[x509.Certificate], now: dt.datetime | float | None = None, skew: float = DEFAULT_SKEW
    ) -> PeerName:
        """The (fleet, node) of a chain (leaf first, then intermediates) that a CA of this bundle issued.

        IdentityError saying why otherwise: malformed name, expired or not yet valid (naming the clock), not
        issued by a trusted CA, or issued for another fleet than the anchoring CA's."""
        if not chain:
            raise IdentityError("no certificate was presented")
        if len(chain) > MAX_CHAIN:
            raise IdentityError(f"a chain of {len(chain)} certificates is longer than {MAX_CHAIN}")
        at = _now(now)
        leaf = chain[0]
        if is_ca(leaf):
            raise IdentityError(f"{_describe(leaf)} is a CA certificate, not a node certificate")
        name = peer_name(leaf)
        check_validity(leaf, at, skew)
        cert, intermediates = leaf, list(chain[1:])
        for below in range(MAX_CHAIN):  # `below`: CAs between `cert`'s issuer and the leaf
            anchor = next((ca for ca in self.cas if signed_by(cert, ca)), None)
            if anchor is not None:
                check_validity(anchor, at, skew)
                _check_depth(anchor, below)
                fleet = ca_fleet(anchor)
                if fleet is not None and fleet != name.fleet:
                    raise IdentityError(f"{_describe(leaf)} was issued by the CA of fleet {fleet!r}")
                return name
            parent = next((c for c in intermediates if is_ca(c) and signed_by(cert, c)), None)
            if parent is None:
                raise IdentityError(f"{_describe(leaf)} was not issued by a CA of the trust bundle")
            check_validity(parent, at, skew)
            _check_depth(parent, below)
            fleet = ca_fleet(parent)
            if fleet is not None and fleet != name.fleet:
                raise IdentityError(f"{_describe(leaf)} was issued by an intermediate CA of fleet {fleet!r}")
            intermediates.remove(parent)
            cert = parent
        raise IdentityError(f"{_describe(leaf)}: no path to a CA of the trust bundle")  # pragma: no cover


def verify_signature(cert: x509.Certificate, data: bytes, signature: bytes) -> None:
    """IdentityError unless `signature` is the ECDSA P-256/SHA-256 signature of `data` by `cert`'s key."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IdentityError(f"{_describe(cert)} does not carry an ECDSA key")
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise IdentityError(f"the signature does not match {_describe(cert)}") from exc
