"""A test fleet CA that enrolls nodes into identity folders (`{state.dir}/identity/`), as `edged fleet` would."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from edged.identity import IdentityFiles
from edged.identity.files import write_file
from edged.identity.issue import cert_pem, create_ca, generate_key, key_pem, make_csr, sign_csr


class FleetCA:
    """A fleet CA in memory; `enroll()` writes a node's key, certificate and trust bundle."""

    def __init__(self, fleet: str = "home", *, now: dt.datetime | None = None, days: int = 30) -> None:
        self.fleet = fleet
        self.key, self.cert = create_ca(fleet, now=now, days=days)

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def issue(self, node: str, *, lifetime: float = 86400.0, now: dt.datetime | None = None, fleet: str | None = None):
        """(key, certificate) for `node`, the key made here as a box would make its own."""
        key = generate_key()
        csr = make_csr(key, fleet or self.fleet, node)
        return key, sign_csr(csr, self.key, self.cert, lifetime=lifetime, now=now)

    def enroll(
        self,
        folder: Path | str,
        node: str,
        *,
        lifetime: float = 86400.0,
        now: dt.datetime | None = None,
        bundle: bytes | None = None,
    ) -> IdentityFiles:
        """Write `node.key`, `node.crt` and `ca.pem` (this CA, or `bundle`) into `folder`."""
        files = IdentityFiles(str(folder))
        key, cert = self.issue(node, lifetime=lifetime, now=now)
        write_file(files.key, key_pem(key), 0o600)
        write_file(files.cert, cert_pem(cert), 0o644)
        write_file(files.ca, bundle if bundle is not None else self.pem, 0o644)
        return files
