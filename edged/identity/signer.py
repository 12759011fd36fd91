"""The fleet CA on disk and the online signer (`edged fleet ca serve`): answers enrollment and renewal requests.

A CA folder holds `ca.key` (0600: the CA's private key), `ca.pem` (the trust bundle boxes receive: this CA's
certificate, plus the other CA during a rotation) and `tokens.json` (one-time join tokens). Keep it on an
operator machine that is online only while enrolling (or use `edged fleet ca sign` with no network at all).

An intermediate CA's folder (`edged fleet ca intermediate`) also holds `chain.pem`: its own certificate, signed by
the root, which every certificate it issues carries after the leaf; its `ca.pem` is the root's bundle. The root
folder can then stay offline for good while the intermediate signs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import IdentityError
from ..logs import log_event
from .enrollment import (
    Answer,
    Request,
    TokenStore,
    answer_message,
    decode_request,
    issued_mac,
    renew_message,
    reply_topic,
    request_topic,
)
from .files import read_pem, write_file
from .issue import DEFAULT_LIFETIME, cert_pem, create_ca, create_intermediate, key_pem, load_csr, sign_csr
from .trust import TrustBundle, ca_fleet, load_certificates, signed_by, verify_signature

log = logging.getLogger("edged.identity.signer")

CA_KEY = "ca.key"
CA_BUNDLE = "ca.pem"
CA_CHAIN = "chain.pem"  # an intermediate's own certificate (and any above it but the root), sent after each leaf
TOKENS = "tokens.json"


@dataclass(frozen=True)
class FleetCa:
    """A CA folder, loaded: its key, its own certificate, the bundle boxes get, and its fleet."""

    dir: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    bundle_pem: bytes
    fleet: str
    chain_pem: bytes = b""  # what follows an issued leaf: "" for a root, the intermediate's certificate otherwise

    @property
    def tokens(self) -> TokenStore:
        return TokenStore(os.path.join(self.dir, TOKENS))

    @property
    def bundle(self) -> TrustBundle:
        return TrustBundle.from_pem(self.bundle_pem)


def init_ca(folder: str, fleet: str, days: int) -> FleetCa:
    """Make a new CA in `folder` (which must not hold one)."""
    if os.path.exists(os.path.join(folder, CA_KEY)):
        raise IdentityError(f"{folder} already holds a CA key: not overwritten")
    key, cert = create_ca(fleet, days=days)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    write_file(os.path.join(folder, CA_KEY), key_pem(key), 0o600)
    write_file(os.path.join(folder, CA_BUNDLE), cert_pem(cert), 0o644)
    return load_ca(folder)


def init_intermediate(folder: str, root_folder: str, days: int) -> FleetCa:
    """Make an intermediate CA in `folder`, signed by the root CA of `root_folder` (see the module doc)."""
    if os.path.exists(os.path.join(folder, CA_KEY)):
        raise IdentityError(f"{folder} already holds a CA key: not overwritten")
    root = load_ca(root_folder)
    if root.chain_pem:
        raise IdentityError(f"{root_folder} holds an intermediate CA: intermediates are signed by the root")
    key, cert = create_intermediate(root.key, root.cert, days=days)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    write_file(os.path.join(folder, CA_KEY), key_pem(key), 0o600)
    write_file(os.path.join(folder, CA_BUNDLE), root.bundle_pem, 0o644)
    write_file(os.path.join(folder, CA_CHAIN), cert_pem(cert), 0o644)
    return load_ca(folder)


def load_ca(folder: str) -> FleetCa:
    """The CA of `folder`: `ca.key` and the certificate that goes with it, in `ca.pem` (a root) or in
    `chain.pem` (an intermediate, which must chain to a CA of `ca.pem`)."""
    from .node import load_key_file

    key = load_key_file(os.path.join(folder, CA_KEY), "CA key", curve=None)
    bundle_pem = read_pem(os.path.join(folder, CA_BUNDLE), "CA bundle")
    chain_path = os.path.join(folder, CA_CHAIN)
    chain_pem = read_pem(chain_path, "intermediate chain") if os.path.exists(chain_path) else b""
    source = CA_CHAIN if chain_pem else CA_BUNDLE
    mine = [c for c in load_certificates(chain_pem or bundle_pem, source) if c.public_key() == key.public_key()]
    if not mine:
        raise IdentityError(f"{folder}/{source} holds no certificate for {folder}/{CA_KEY}")
    fleet = ca_fleet(mine[0])
    if fleet is None:
        raise IdentityError(f"{folder}: the CA certificate names no fleet (spiffe://FLEET)")
    if chain_pem:
        roots = TrustBundle.from_pem(bundle_pem).cas
        chain = load_certificates(chain_pem, CA_CHAIN)
        if not any(signed_by(chain[-1], root) and ca_fleet(root) in (None, fleet) for root in roots):
            raise IdentityError(f"{folder}/{CA_CHAIN} was not issued by a CA of {folder}/{CA_BUNDLE} for {fleet!r}")
    return FleetCa(folder, key, mine[0], bundle_pem, fleet, chain_pem)


def decide(ca: FleetCa, payload: bytes, *, lifetime: float = DEFAULT_LIFETIME) -> tuple[Request | None, Answer]:
    """The signer's answer to one request (pure but for spending a join token). (None, error answer) when the
    request cannot even be parsed: there is nobody to answer then."""
    try:
        request = decode_request(payload)
    except IdentityError as exc:
        return None, Answer(id="", error=str(exc))
    try:
        csr = load_csr(request.csr.encode())
        secret: bytes | None = None
        if request.token is not None:
            secret = ca.tokens.spend(request)
        elif request.chain is not None and request.sig is not None:
            chain = load_certificates(request.chain.encode(), "the presented chain")
            name = ca.bundle.verify(chain)
            if name.fleet != ca.fleet or name.node != request.node:
                raise IdentityError(f"a renewal for {request.node!r} must come from that node, not {name.node!r}")
            verify_signature(chain[0], renew_message(request.id, request.csr), bytes.fromhex(request.sig))
            if csr.public_key() != chain[0].public_key():
                raise IdentityError("a renewal keeps the node's key: the CSR carries another one")
        else:
            raise IdentityError("a request carries a join token or the node's current certificate")
        leaf = sign_csr(csr, ca.key, ca.cert, node=request.node, lifetime=lifetime)
        cert = (cert_pem(leaf) + ca.chain_pem).decode()
    except (IdentityError, ValueError) as exc:
        return request, Answer(id=request.id, error=str(exc))
    ca_text = ca.bundle_pem.decode()
    if secret is not None:
        return request, Answer(id=request.id, cert=cert, ca=ca_text, mac=issued_mac(secret, request.id, cert, ca_text))
    sig = ca.key.sign(answer_message(request.id, cert, ca_text), ec.ECDSA(hashes.SHA256())).hex()
    return request, Answer(id=request.id, cert=cert, ca=ca_text, sig=sig)


async def serve(ca: FleetCa, mqtt, *, prefix: str, lifetime: float, stop: asyncio.Event) -> None:
    """Answer requests on `{prefix}/{fleet}/ca/req` until `stop` is set (`mqtt`: an MqttSession, not started)."""
    from ..cloud.session import Inbound

    loop = asyncio.get_running_loop()
    sending: set[asyncio.Task] = set()  # answers being published: awaited before the session closes

    def on_request(message: Inbound) -> None:
        request, answer = decide(ca, message.payload, lifetime=lifetime)
        if request is None:
            log_event(log, logging.WARNING, "ca.request_refused", reason=answer.error)
            return
        outcome = "issued" if answer.error is None else "refused"
        kind = "enroll" if request.token is not None else "renew"
        log_event(log, logging.INFO, f"ca.{outcome}", node=request.node, kind=kind, reason=answer.error)
        topic = reply_topic(prefix, ca.fleet, request.node, request.id)
        task = loop.create_task(mqtt.publish(topic, answer.encode(), qos=1))
        sending.add(task)
        task.add_done_callback(sending.discard)
        task.add_done_callback(_log_failure)

    mqtt.subscribe(request_topic(prefix, ca.fleet), on_request, qos=1)
    mqtt.start()
    try:
        await stop.wait()
    finally:
        if sending:
            await asyncio.wait(sending, timeout=3.0)
        await mqtt.close()


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("an answer could not be published: %s", task.exception())
