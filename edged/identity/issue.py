"""Making identities: fleet CA keys and certificates, node keys and CSRs, and signing a CSR into a node certificate.

Used by `edged fleet ca init|sign|serve` and `edged fleet enroll`, and by tests that need a fleet.
The node key is made on the box and never leaves it: the CA sees only the CSR.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import IdentityError
from .names import PeerName, check_fleet, check_node, parse_spiffe_id, single_uri, spiffe_id, trust_domain_id
from .trust import ca_fleet, is_ca, not_after, path_length

DEFAULT_LIFETIME = 24 * 3600.0  # seconds a node certificate lives (Linkerd's default)
DEFAULT_BACKDATE = 300.0  # a node certificate starts this much before it is signed: peers whose clocks lag accept it
DEFAULT_CA_DAYS = 3650
MAX_CSR = 16 * 1024
_UTC = dt.timezone.utc


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 key (fast to sign and verify on a Pi, small certificates)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PEM PKCS#8 (its file is 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(*certs: x509.Certificate) -> bytes:
    """Certificates as one PEM text, in the order given."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(_UTC)


def create_ca(
    fleet: str,
    *,
    days: int = DEFAULT_CA_DAYS,
    now: dt.datetime | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new fleet CA: its key and a self-signed certificate naming `spiffe://{fleet}`, the one fleet it issues for."""
    check_fleet(fleet)
    key = key or generate_key()
    at = _now(now)
    name = _ca_name(f"{fleet} fleet CA {at:%Y-%m-%d %H%M%S}")
    builder = x509.CertificateBuilder().issuer_name(name).not_valid_after(at + dt.timedelta(days=days))
    return key, _ca_certificate(builder, name, key, key, fleet, at, path_length=1)


def create_intermediate(
    root_key: ec.EllipticCurvePrivateKey,
    root_cert: x509.Certificate,
    *,
    days: int = 365,
    now: dt.datetime | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """An intermediate CA signed by the fleet's root: it may sign node certificates only (path length 0), only
    for the root's fleet (a URI name constraint OpenSSL enforces in every handshake), and never outlives the root.
    The root can then stay offline while the intermediate signs (`edged fleet ca serve`)."""
    fleet = ca_fleet(root_cert)
    if not is_ca(root_cert) or fleet is None:
        raise IdentityError("the signing certificate is not a fleet CA (no spiffe://FLEET name)")
    if path_length(root_cert) == 0:
        raise IdentityError("this CA may not sign CAs (path length 0): it is an intermediate already")
    key = key or generate_key()
    at = _now(now)
    name = _ca_name(f"{fleet} intermediate CA {at:%Y-%m-%d %H%M%S}")
    end = min(at + dt.timedelta(days=days), not_after(root_cert))
    builder = (
        x509.CertificateBuilder()
        .issuer_name(root_cert.subject)
        .not_valid_after(end)
        .add_extension(
            x509.NameConstraints(permitted_subtrees=[x509.UniformResourceIdentifier(fleet)], excluded_subtrees=None),
            critical=True,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_cert.public_key()), critical=False)
    )
    return key, _ca_certificate(builder, name, key, root_key, fleet, at, path_length=0)


def _ca_name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "HubMesh"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _ca_certificate(
    builder: x509.CertificateBuilder,
    name: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    signing_key: ec.EllipticCurvePrivateKey,
    fleet: str,
    at: dt.datetime,
    *,
    path_length: int,
) -> x509.Certificate:
    """A CA certificate for `key` naming `spiffe://{fleet}`; `builder` holds the issuer and the end of validity."""
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        builder.subject_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - dt.timedelta(seconds=DEFAULT_BACKDATE))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain_id(fleet))]), critical=False
        )
        .add_extension(ski, critical=False)
        .sign(signing_key, hashes.SHA256())
    )


def make_csr(key: ec.EllipticCurvePrivateKey, fleet: str, node: str) -> x509.CertificateSigningRequest:
    """A CSR for `spiffe://{fleet}/node/{node}`, signed by the node's own key (proof that it holds it)."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, check_node(node))]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(fleet, node))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(pem: bytes) -> x509.CertificateSigningRequest:
    """A CSR from PEM, size-capped; IdentityError when malformed or its self-signature is wrong."""
    if len(pem) > MAX_CSR:
        raise IdentityError(f"the CSR is larger than {MAX_CSR} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise IdentityError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise IdentityError("the CSR's signature does not match its key")
    return csr


def csr_name(csr: x509.CertificateSigningRequest) -> PeerName:
    """The (fleet, node) a CSR asks for: its one URI SAN."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = []
    return PeerName(*parse_spiffe_id(single_uri(uris)))


def sign_csr(
    csr: x509.CertificateSigningRequest,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    node: str | None = None,
    lifetime: float = DEFAULT_LIFETIME,
    backdate: float = DEFAULT_BACKDATE,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A node certificate for the CSR's key and name, issued by the fleet CA.

    Only the name and key are taken from the CSR: the extensions are the CA's. IdentityError when the CSR asks
    for another fleet than the CA's, for another node than `node` (when the signer knows whom it expects), or
    carries a key that is not ECDSA P-256. The certificate never outlives its CA."""
    if not csr.is_signature_valid:
        raise IdentityError("the CSR's signature does not match its key")
    name = csr_name(csr)
    fleet = ca_fleet(ca_cert)
    if not is_ca(ca_cert) or fleet is None:
        raise IdentityError("the signing certificate is not a fleet CA (no spiffe://FLEET name)")
    if name.fleet != fleet:
        raise IdentityError(f"the CSR asks for fleet {name.fleet!r}; this CA issues for fleet {fleet!r}")
    if node is not None and name.node != node:
        raise IdentityError(f"the CSR asks for node {name.node!r}, not {node!r}")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise IdentityError("the CSR's key must be ECDSA P-256")
    if not 60 <= lifetime <= 366 * 86400:
        raise IdentityError(f"a certificate lifetime of {lifetime:g}s is outside 1 minute..366 days")
    at = _now(now)
    end = min(at + dt.timedelta(seconds=lifetime), not_after(ca_cert))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name.node)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - dt.timedelta(seconds=backdate))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,  # TLS and ECDSA seals
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,  # the per-pair MAC keys of the cloud tier (edged/cloud/pairing.py)
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(name.fleet, name.node))]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
