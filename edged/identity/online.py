"""A box's side of issuance: make its key and CSR, ask the signer over MQTT (or take a certificate signed
offline), check what comes back, and install it in `{state.dir}/identity/`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os

from ..errors import IdentityError
from .enrollment import (
    Answer,
    Request,
    answer_message,
    decode_answer,
    enroll_proof,
    issued_mac,
    random_id,
    renew_message,
    reply_topic,
    request_topic,
    split_token,
)
from .files import IdentityFiles, write_file
from .issue import cert_pem, csr_pem, generate_key, key_pem, make_csr
from .node import NodeIdentity, load_key
from .trust import TrustBundle, load_certificates, verify_signature


def node_key(files: IdentityFiles):
    """This box's key: the one it has, else a new one (made here, written 0600, never sent anywhere)."""
    if os.path.exists(files.key):
        return load_key(files.key)
    key = generate_key()
    write_file(files.key, key_pem(key), 0o600)
    return key


def install(files: IdentityFiles, chain_pem: str, ca_pem: str, fleet: str, node: str, also_trust: bytes | None = None):
    """Check a certificate chain against the bundle that came with it (and `also_trust`), and against this box's
    key and name; then write `node.crt` and `ca.pem`. Returns what the certificate names."""
    chain = load_certificates(chain_pem.encode(), "the issued certificate")
    bundle = TrustBundle.from_pem(ca_pem.encode())
    name = bundle.verify(chain)
    if also_trust is not None:
        TrustBundle.from_pem(also_trust).verify(chain)
    if (name.fleet, name.node) != (fleet, node):
        raise IdentityError(f"the certificate names {name.node!r} of {name.fleet!r}, not {node!r} of {fleet!r}")
    key = load_key(files.key)
    if chain[0].public_key().public_numbers() != key.public_key().public_numbers():
        raise IdentityError("the certificate is not for this box's key")
    write_file(files.cert, cert_pem(*chain), 0o644)
    write_file(files.ca, ca_pem.encode(), 0o644)
    return name


async def ask_signer(mqtt, prefix: str, fleet: str, request: Request, timeout: float) -> Answer:
    """Publish `request` and wait for the signer's answer on the request's own reply topic."""
    from ..cloud.session import Inbound, MqttSession, PublishError

    loop = asyncio.get_running_loop()
    got: asyncio.Future[Answer] = loop.create_future()

    def on_answer(message: Inbound) -> None:
        with contextlib.suppress(IdentityError):
            answer = decode_answer(message.payload)
            if answer.id == request.id and not got.done():
                got.set_result(answer)

    logging.getLogger("edged.cloud.session").setLevel(logging.ERROR)  # the outcome is said by the caller
    session = MqttSession(mqtt, client_id=f"edged-ca-{request.node}-{request.id[:8]}")
    session.subscribe(reply_topic(prefix, fleet, request.node, request.id), on_answer, qos=1)
    session.start()
    try:
        if not await session.wait_connected(timeout):
            raise IdentityError(f"cannot reach the broker at {mqtt.url}: {session.last_error or 'timed out'}")
        try:
            await session.publish(request_topic(prefix, fleet), request.encode(), qos=1, timeout=timeout)
        except PublishError as exc:
            raise IdentityError(f"cannot send the request: {exc}") from None
        try:
            return await asyncio.wait_for(got, timeout)
        except asyncio.TimeoutError:
            raise IdentityError(
                f"no answer from the fleet CA within {timeout:g}s (is `edged fleet ca serve` running?)"
            ) from None
    finally:
        await session.close()


async def enroll(
    files: IdentityFiles,
    mqtt,
    prefix: str,
    fleet: str,
    node: str,
    token: str,
    *,
    timeout: float,
    also_trust: bytes | None = None,
):
    """First enrollment with a one-time join token: key here, CSR to the signer, certificate and bundle back."""
    token_id, secret = split_token(token)
    key = node_key(files)
    csr = csr_pem(make_csr(key, fleet, node)).decode()
    request_id = random_id()
    request = Request(request_id, node, csr, token=token_id, proof=enroll_proof(secret, request_id, csr))
    answer = await ask_signer(mqtt, prefix, fleet, request, timeout)
    if answer.error is not None:
        raise IdentityError(f"the fleet CA refused: {answer.error}")
    if answer.mac is None or not hmac.compare_digest(
        issued_mac(secret, request_id, answer.cert, answer.ca), answer.mac
    ):
        raise IdentityError("the answer does not carry the join token's proof: not from the fleet CA, refused")
    return install(files, answer.cert, answer.ca, fleet, node, also_trust)


async def renew(identity: NodeIdentity, files: IdentityFiles, mqtt, prefix: str, *, timeout: float):
    """A new certificate for the same key, asked with the current one; the answer must be signed by a CA of
    the current bundle (a forged answer on the broker is refused)."""
    csr = csr_pem(make_csr(identity.key, identity.fleet, identity.node)).decode()
    request_id = random_id()
    sig = identity.sign(renew_message(request_id, csr)).hex()
    request = Request(request_id, identity.node, csr, chain=identity.chain_pem.decode(), sig=sig)
    answer = await ask_signer(mqtt, prefix, identity.fleet, request, timeout)
    if answer.error is not None:
        raise IdentityError(f"the fleet CA refused the renewal: {answer.error}")
    current = TrustBundle.load(files.ca)
    signed = answer.sig is not None and any(_signed(ca, answer, request_id) for ca in current.cas)
    if not signed:
        raise IdentityError("the renewal answer is not signed by a CA this node trusts: refused")
    return install(files, answer.cert, answer.ca, identity.fleet, identity.node, also_trust=None)


def _signed(ca, answer: Answer, request_id: str) -> bool:
    try:
        verify_signature(ca, answer_message(request_id, answer.cert, answer.ca), bytes.fromhex(answer.sig or ""))
    except (IdentityError, ValueError):
        return False
    return True


def write_csr(files: IdentityFiles, fleet: str, node: str) -> str:
    """Offline enrollment, step 1: the key (made here if missing) and `node.csr` next to it; its path."""
    key = node_key(files)
    path = os.path.join(files.dir, "node.csr")
    write_file(path, csr_pem(make_csr(key, fleet, node)), 0o644)
    return path
