"""TLS 1.3 contexts for mutual authentication between fleet members, with the stdlib `ssl` (no `cryptography`).

Both sides present their node certificate and require the other's, verified against the trust bundle by
OpenSSL; host names are not checked (peers are found by mDNS, at addresses no certificate could name): the
caller checks the SPIFFE ID instead, with `peer_name()`.
"""

from __future__ import annotations

import ssl

from ..errors import IdentityError
from .files import IdentityFiles, check_key_mode, peer_name_of
from .names import PeerName


def _context(files: IdentityFiles, purpose: int, *, load: bool = True) -> ssl.SSLContext:
    """A TLS 1.3 context requiring the other side's certificate; with `load` False, without this node's certificate
    and bundle yet (a node waiting to be enrolled: the keeper loads them when `edged fleet enroll` writes them)."""
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False
    else:
        # No session tickets: asyncio cannot resume a session, and making two tickets per handshake cost about
        # 1.2 ms of CPU here (a third of a mutual handshake). Connections are kept alive instead.
        ctx.num_tickets = 0
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not load:
        return ctx
    check_key_mode(files.key)
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as exc:
        raise IdentityError(f"{files.cert}: cannot use the node certificate and key: {exc}") from exc
    try:
        ctx.load_verify_locations(cafile=files.ca)
    except (ssl.SSLError, OSError) as exc:
        raise IdentityError(f"{files.ca}: cannot use the trust bundle: {exc}") from exc
    return ctx


def server_context(files: IdentityFiles, *, load: bool = True) -> ssl.SSLContext:
    """For the peer ingress: TLS 1.3 only, a client certificate from the trust bundle required."""
    return _context(files, ssl.PROTOCOL_TLS_SERVER, load=load)


def client_context(files: IdentityFiles, *, load: bool = True) -> ssl.SSLContext:
    """For calls to peers (and the broker): TLS 1.3 only, presents the node certificate, verifies the server's."""
    return _context(files, ssl.PROTOCOL_TLS_CLIENT, load=load)


def peer_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerName:
    """The (fleet, node) of the verified certificate the other side presented on a finished handshake."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        raise IdentityError("the peer presented no certificate")
    return peer_name_of(cert)
