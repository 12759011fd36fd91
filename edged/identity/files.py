"""Where a box keeps its identity, and what its certificate says, read without `cryptography`.

`{state.dir}/identity/`: `node.key` (0600, PEM PKCS#8), `node.crt` (PEM: leaf, then any intermediates),
`ca.pem` (the trust bundle: one or more fleet CA certificates, more than one during a CA rotation).

The daemon's data path only hands these files to `ssl`; `summary()` reads the leaf with `ssl`'s own decoder so
that status and renewal timing do not load `cryptography`'s Rust extension (about 9 MiB of RSS).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import stat
import time
from dataclasses import dataclass

from ..errors import IdentityError
from .names import PeerName, parse_spiffe_id, single_uri

KEY_FILE = "node.key"
CERT_FILE = "node.crt"
CA_FILE = "ca.pem"
MAX_PEM = 64 * 1024  # a leaf and two intermediates fit in 3 KiB; a bundle of a few CAs in a few more
RENEW_AT = 2 / 3  # renew a certificate once this fraction of its life has passed


def identity_dir(state_dir: str) -> str:
    """`{state.dir}/identity`."""
    return os.path.join(state_dir, "identity")


@dataclass(frozen=True, slots=True)
class IdentityFiles:
    """The three files of a box's identity, under one folder."""

    dir: str

    @property
    def key(self) -> str:
        return os.path.join(self.dir, KEY_FILE)

    @property
    def cert(self) -> str:
        return os.path.join(self.dir, CERT_FILE)

    @property
    def ca(self) -> str:
        return os.path.join(self.dir, CA_FILE)

    def present(self) -> bool:
        """True when a key and a certificate are there (the bundle is checked when it is loaded)."""
        return os.path.exists(self.key) and os.path.exists(self.cert)


@dataclass(frozen=True, slots=True)
class CertSummary:
    """What a node certificate says, in the terms status and renewal need (times are Unix seconds)."""

    fleet: str
    node: str
    not_before: float
    not_after: float
    serial: str

    @property
    def name(self) -> PeerName:
        return PeerName(self.fleet, self.node)

    @property
    def renew_after(self) -> float:
        """When renewal starts: two thirds into the certificate's life."""
        return self.not_before + (self.not_after - self.not_before) * RENEW_AT


def read_pem(path: str, what: str) -> bytes:
    """A PEM file's bytes, capped at MAX_PEM; IdentityError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM + 1)
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    if len(data) > MAX_PEM:
        raise IdentityError(f"{path}: the {what} is larger than {MAX_PEM} bytes")
    return data


def check_key_mode(path: str, what: str = "node key") -> None:
    """IdentityError when the private key may be read by anyone but its owner (like ssh, refuse rather than warn)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    if mode & 0o077:
        raise IdentityError(f"{path}: the {what} is open to others (mode {mode:04o}): chmod 600 {path}")


def _decode(path: str) -> dict:
    # ssl's decoder reads the first certificate of a PEM file; private but present in CPython 3.4-3.13 (its own
    # tests use it). Without it, fall back to cryptography.
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:  # pragma: no cover - future CPython
        return _decode_with_cryptography(path)
    try:
        return decode(path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise IdentityError(f"{path}: not a PEM certificate: {exc}") from exc


def _decode_with_cryptography(path: str) -> dict:  # pragma: no cover - see _decode
    from cryptography import x509

    from .trust import load_certificates, not_after, not_before

    cert = load_certificates(read_pem(path, "certificate"), path)[0]
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        uris = []
    fmt = "%b %d %H:%M:%S %Y GMT"
    return {
        "subjectAltName": tuple(("URI", u) for u in uris),
        "notBefore": not_before(cert).strftime(fmt),
        "notAfter": not_after(cert).strftime(fmt),
        "serialNumber": f"{cert.serial_number:X}",
    }


def peer_name_of(decoded: dict) -> PeerName:
    """The (fleet, node) of a certificate as `ssl` decodes it (`getpeercert()`): exactly one URI SAN."""
    uris = [value for kind, value in decoded.get("subjectAltName", ()) if kind == "URI"]
    return PeerName(*parse_spiffe_id(single_uri(uris)))


def summary(path: str) -> CertSummary:
    """Fleet, node and validity of the (first) certificate in `path`, without loading `cryptography`."""
    decoded = _decode(path)
    name = peer_name_of(decoded)
    return CertSummary(
        fleet=name.fleet,
        node=name.node,
        not_before=float(ssl.cert_time_to_seconds(decoded["notBefore"])),
        not_after=float(ssl.cert_time_to_seconds(decoded["notAfter"])),
        serial=str(decoded.get("serialNumber", "")),
    )


def utc_text(seconds: float) -> str:
    """Unix seconds -> `2026-12-02T08:00:00Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def clock_problem(cert: CertSummary, now: float, skew: float) -> str | None:
    """Why this box's clock makes TLS impossible with this certificate, or None when it is usable.

    Boxes without a real-time clock boot with a time in the past until NTP answers: peers would refuse the
    certificate as not yet valid, and this box would refuse theirs."""
    if now + skew < cert.not_before:
        return (
            f"the clock says {utc_text(now)}, before the node certificate is valid ({utc_text(cert.not_before)}):"
            " TLS with peers is impossible until the clock is set (is NTP reachable?)"
        )
    if now - skew > cert.not_after:
        return f"the node certificate expired at {utc_text(cert.not_after)} (the clock says {utc_text(now)})"
    return None


def write_file(path: str, data: bytes, mode: int) -> None:
    """Write `data` to `path` atomically with `mode` (a reader never sees half a key or half a chain)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o700, exist_ok=True)
    import tempfile  # with shutil: only when a key or certificate is written

    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
