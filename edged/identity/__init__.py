"""Node identity for a fleet: X.509 certificates naming `spiffe://{fleet}/node/{node}`, issued by a fleet CA.

Files of a box (`{state.dir}/identity/`): `node.key` (0600, PEM PKCS#8, ECDSA P-256), `node.crt` (PEM: leaf,
then any intermediates), `ca.pem` (trust bundle: one or more CA certificates, more than one during rotation).

Light names (`spiffe_id`, `parse_spiffe_id`, the file layout, `summary`, the TLS contexts) import only the
stdlib. `NodeIdentity`, `load_identity`, `TrustBundle` and `verify_signature` load `cryptography` on first
use (about 9 MiB of RSS), so that a daemon that only serves mutual TLS never pays for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import IdentityError
from .files import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    CertSummary,
    IdentityFiles,
    clock_problem,
    identity_dir,
    summary,
)
from .names import PeerName, parse_spiffe_id, spiffe_id

if TYPE_CHECKING:
    from .node import NodeIdentity, load_identity
    from .trust import TrustBundle, verify_signature

__all__ = [
    "CA_FILE",
    "CERT_FILE",
    "KEY_FILE",
    "CertSummary",
    "IdentityError",
    "IdentityFiles",
    "NodeIdentity",
    "PeerName",
    "TrustBundle",
    "clock_problem",
    "identity_dir",
    "load_identity",
    "parse_spiffe_id",
    "spiffe_id",
    "summary",
    "verify_signature",
]

_LAZY = {
    "NodeIdentity": "node",
    "load_identity": "node",
    "TrustBundle": "trust",
    "verify_signature": "trust",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
