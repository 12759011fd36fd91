"""A box's own identity: its private key and the certificate chain the fleet CA issued for it."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import IdentityError
from .files import RENEW_AT, IdentityFiles, check_key_mode, read_pem
from .names import spiffe_id
from .trust import load_certificates, not_after, not_before, peer_name


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Who this box is: fleet and node (from the certificate), its key, and the chain it presents."""

    fleet: str
    node: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # the leaf, then any intermediates
    chain_pem: bytes
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def spiffe_id(self) -> str:
        return spiffe_id(self.fleet, self.node)

    @property
    def renew_after(self) -> dt.datetime:
        """When renewal starts: two thirds into the certificate's life."""
        return self.not_before + (self.not_after - self.not_before) * RENEW_AT

    def sign(self, data: bytes) -> bytes:
        """An ECDSA P-256/SHA-256 signature (DER) of `data` by this node's key (`verify_signature` checks it)."""
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


def load_key_file(
    path: str, what: str = "node key", curve: type[ec.EllipticCurve] | None = ec.SECP256R1
) -> ec.EllipticCurvePrivateKey:
    """An ECDSA private key (PEM PKCS#8, mode 0600); IdentityError naming the file otherwise."""
    check_key_mode(path, what)
    try:
        key = serialization.load_pem_private_key(read_pem(path, what), password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or (curve is not None and not isinstance(key.curve, curve)):
        raise IdentityError(f"{path}: the {what} must be ECDSA P-256")
    return key


def load_key(path: str) -> ec.EllipticCurvePrivateKey:
    """The node's private key (ECDSA P-256)."""
    return load_key_file(path)


def load_identity(folder: str) -> NodeIdentity | None:
    """This box's identity from `folder` (`{state.dir}/identity`); None when it has never been enrolled.

    IdentityError when the files are there but unusable: half enrolled (a key and no certificate yet), a key
    open to others, a certificate that does not belong to the key or that names no node."""
    files = IdentityFiles(folder)
    if not os.path.exists(files.key) and not os.path.exists(files.cert):
        return None
    if not os.path.exists(files.cert):
        raise IdentityError(
            f"{files.cert}: missing: this node made a key but has no certificate yet (edged fleet enroll)"
        )
    key = load_key(files.key)
    pem = read_pem(files.cert, "node certificate")
    chain = load_certificates(pem, files.cert)
    leaf = chain[0]
    if leaf.public_key().public_numbers() != key.public_key().public_numbers():
        raise IdentityError(f"{files.cert}: the certificate is not for the key in {files.key}")
    name = peer_name(leaf)
    return NodeIdentity(
        fleet=name.fleet,
        node=name.node,
        key=key,
        cert=leaf,
        chain=tuple(chain),
        chain_pem=pem,
        not_before=not_before(leaf),
        not_after=not_after(leaf),
    )
