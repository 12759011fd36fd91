"""Online issuance over MQTT request/response: the messages, their proofs, and the signer's decisions (pure).

Topics (under `{prefix}/{fleet}/`, next to the cloud tier's): a box publishes its request to `ca/req`; the
signer (`edged fleet ca serve`) answers on `ca/reply/{node}/{id}`, where `id` is the request's random id.

- **Enrollment** (no certificate yet): the operator makes a one-time join token `ID.SECRET` with `edged fleet
  ca token`; the box sends the token's ID and `proof = HMAC-SHA256(SECRET, "hubmesh-enroll" | id | csr)`,
  never the secret, so a listener on the broker can neither reuse the token nor swap in its own CSR. The
  answer carries `mac = HMAC-SHA256(SECRET, "hubmesh-issued" | id | cert | ca)`: the box trusts the bundle
  it receives because only the signer knows the secret.
- **Renewal** (a valid certificate): the box sends its chain and an ECDSA signature of the same message by
  its current key; the answer is signed by the CA key (`sig`), checked against the box's current bundle.

Each message is JSON, at most MAX_MESSAGE bytes. Keys are made on the box and never leave it: only CSRs move.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass

from ..errors import IdentityError
from .names import check_node

VERSION = 1
MAX_MESSAGE = 24 * 1024
TOKEN_ID_BYTES = 6
_ENROLL = b"hubmesh-enroll"
_ISSUED = b"hubmesh-issued"
_RENEW = b"hubmesh-renew"


def request_topic(prefix: str, fleet: str) -> str:
    return f"{prefix}/{fleet}/ca/req"


def reply_topic(prefix: str, fleet: str, node: str, request_id: str) -> str:
    return f"{prefix}/{fleet}/ca/reply/{node}/{request_id}"


def new_token() -> tuple[str, str]:
    """(token id, secret): the operator hands `ID.SECRET` to the box being enrolled."""
    return secrets.token_hex(TOKEN_ID_BYTES), secrets.token_urlsafe(24)


def split_token(token: str) -> tuple[str, bytes]:
    """`ID.SECRET` -> (ID, SECRET bytes); IdentityError when it is not one."""
    token_id, dot, secret = token.strip().partition(".")
    if not dot or len(token_id) != 2 * TOKEN_ID_BYTES or not secret or len(secret) > 128:
        raise IdentityError("a join token looks like ID.SECRET (from edged fleet ca token)")
    return token_id, secret.encode()


def _message(tag: bytes, *parts: str) -> bytes:
    return b"\0".join([tag, *(p.encode() for p in parts)])


def enroll_proof(secret: bytes, request_id: str, csr_pem: str) -> str:
    return hmac.new(secret, _message(_ENROLL, request_id, csr_pem), hashlib.sha256).hexdigest()


def issued_mac(secret: bytes, request_id: str, cert_pem: str, ca_pem: str) -> str:
    return hmac.new(secret, _message(_ISSUED, request_id, cert_pem, ca_pem), hashlib.sha256).hexdigest()


def renew_message(request_id: str, csr_pem: str) -> bytes:
    return _message(_RENEW, request_id, csr_pem)


def answer_message(request_id: str, cert_pem: str, ca_pem: str) -> bytes:
    return _message(_ISSUED, request_id, cert_pem, ca_pem)


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request to the signer."""

    id: str
    node: str
    csr: str
    token: str | None = None  # enrollment: the join token's id ...
    proof: str | None = None  # ... and the HMAC proof
    chain: str | None = None  # renewal: the current certificate chain ...
    sig: str | None = None  # ... and the signature by the current key

    def encode(self) -> bytes:
        doc = {"v": VERSION, "id": self.id, "node": self.node, "csr": self.csr}
        for key in ("token", "proof", "chain", "sig"):
            value = getattr(self, key)
            if value is not None:
                doc[key] = value
        return json.dumps(doc, separators=(",", ":")).encode()


def _load(payload: bytes, what: str) -> dict:
    if len(payload) > MAX_MESSAGE:
        raise IdentityError(f"the {what} is larger than {MAX_MESSAGE} bytes")
    try:
        doc = json.loads(payload)
    except ValueError as exc:
        raise IdentityError(f"the {what} is not JSON") from exc
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise IdentityError(f"the {what} is not a version {VERSION} message")
    return doc


def _text(doc: dict, key: str, *, required: bool = True) -> str | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise IdentityError(f"the message lacks {key!r}")
    return value


def decode_request(payload: bytes) -> Request:
    doc = _load(payload, "request")
    request_id = _text(doc, "id")
    assert request_id is not None
    if not (8 <= len(request_id) <= 64) or not request_id.isalnum():
        raise IdentityError("the request id must be 8..64 letters and digits")
    node = check_node(_text(doc, "node") or "")
    return Request(
        id=request_id,
        node=node,
        csr=_text(doc, "csr") or "",
        token=_text(doc, "token", required=False),
        proof=_text(doc, "proof", required=False),
        chain=_text(doc, "chain", required=False),
        sig=_text(doc, "sig", required=False),
    )


@dataclass(frozen=True, slots=True)
class Answer:
    id: str
    cert: str = ""
    ca: str = ""
    mac: str | None = None  # enrollment: HMAC with the token's secret
    sig: str | None = None  # renewal: signature by the CA key
    error: str | None = None

    def encode(self) -> bytes:
        doc: dict = {"v": VERSION, "id": self.id}
        if self.error is not None:
            doc["error"] = self.error
        else:
            doc.update(cert=self.cert, ca=self.ca)
            if self.mac is not None:
                doc["mac"] = self.mac
            if self.sig is not None:
                doc["sig"] = self.sig
        return json.dumps(doc, separators=(",", ":")).encode()


def decode_answer(payload: bytes) -> Answer:
    doc = _load(payload, "answer")
    request_id = _text(doc, "id") or ""
    error = doc.get("error")
    if error is not None:
        return Answer(id=request_id, error=str(error)[:300])
    return Answer(
        id=request_id,
        cert=_text(doc, "cert") or "",
        ca=_text(doc, "ca") or "",
        mac=_text(doc, "mac", required=False),
        sig=_text(doc, "sig", required=False),
    )


# -- the signer's join tokens -------------------------------------------------------------------------------


class TokenStore:
    """One-time join tokens in `{ca dir}/tokens.json` (0600, next to the CA key): id -> secret, node, expiry, use."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise IdentityError(f"{self.path}: cannot read the join tokens: {exc}") from exc
        return doc if isinstance(doc, dict) else {}

    def _write(self, doc: dict) -> None:
        from .files import write_file

        write_file(self.path, json.dumps(doc, indent=1, sort_keys=True).encode(), 0o600)

    def add(self, node: str | None, ttl: float, now: float | None = None) -> str:
        """A new token `ID.SECRET`, valid for `ttl` seconds, for `node` (or any node when None)."""
        if node is not None:
            check_node(node)
        token_id, secret = new_token()
        doc = self._read()
        at = time.time() if now is None else now
        doc = {k: v for k, v in doc.items() if v.get("expires", 0) > at - 7 * 86400}  # forget week-old ones
        doc[token_id] = {"secret": secret, "node": node, "expires": at + ttl, "used": None}
        self._write(doc)
        return f"{token_id}.{secret}"

    def spend(self, request: Request, now: float | None = None) -> bytes:
        """The secret of the request's token, marked used; IdentityError (what the box is told) otherwise."""
        doc = self._read()
        entry = doc.get(request.token or "")
        at = time.time() if now is None else now
        if not isinstance(entry, dict) or not request.proof:
            raise IdentityError("wrong join token")
        secret = str(entry.get("secret", "")).encode()
        if not hmac.compare_digest(enroll_proof(secret, request.id, request.csr), request.proof):
            raise IdentityError("wrong join token")  # the same words: no oracle for which part was wrong
        if entry.get("used") is not None:
            raise IdentityError("this join token was already used: ask for a new one (edged fleet ca token)")
        if entry.get("expires", 0) < at:
            raise IdentityError("this join token has expired: ask for a new one (edged fleet ca token)")
        if entry.get("node") not in (None, request.node):
            raise IdentityError(f"this join token is for node {entry['node']!r}, not {request.node!r}")
        entry["used"] = at
        entry["used_by"] = request.node
        self._write(doc)
        return secret


def random_id() -> str:
    return os.urandom(12).hex()
