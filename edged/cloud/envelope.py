"""CBOR envelopes of cloud calls: a request (node -> bridge) and its answer (bridge -> node).

The envelope carries the reply topic and the correlation id itself, so it works on MQTT 3.1.1; on MQTT 5
the same values also travel as properties. Keys are short text strings, the body is a CBOR byte string,
headers are `[name, value]` text pairs (latin-1, names lower-case):

    request: {"v": 1, "id": bytes, "reply": str, "method": str, "path": str, "headers": [[str, str]...],
              "body": bytes, "deadline": int, "tenant": str, "service": str, "node": str, "rid": str,
              "ts": int}  # ts (optional): the sender's wall clock, ms, for a bridge's replay check
    answer:  {"v": 1, "id": bytes, "status": int, "headers": [[str, str]...], "body": bytes, "node": str}

`deadline` is the milliseconds the caller still waits, counted from when the request was published
(relative, so that clocks of node and cloud need not agree; MQTT 5 message expiry says the same), from 1 to
MAX_DEADLINE_MS. An answer's `status` is a final HTTP status, 200 to 599: an interim (1xx) or a 101 Switching
Protocols answer cannot be relayed as the one answer to a request (the caller's keep-alive connection would
desynchronize), so it is refused like any other bad answer.
Decoding never trusts its input: anything that would not make a clean HTTP request is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import cbor2

from ..errors import EdgedError

VERSION = 1
MAX_ID_BYTES = 64
MAX_DEADLINE_MS = 3_600_000  # an hour: no call waits longer, and a bignum never reaches float arithmetic
MAX_TS_MS = 2**53
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: header names, methods
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_BAD_PATH = re.compile(r"[\x00-\x20\x7f]")  # the path goes into a request line: no spaces, no controls
_TOPIC_BAD = re.compile(r"[+#\x00]")

Headers = tuple[tuple[bytes, bytes], ...]


class EnvelopeError(EdgedError):
    """A payload is not a valid envelope. `id` and `reply` are set when they could be read anyway,
    so that a bridge can still answer 400 to a request it cannot serve."""

    def __init__(self, message: str, *, id: bytes | None = None, reply: str | None = None) -> None:
        super().__init__(message)
        self.id = id
        self.reply = reply


@dataclass(frozen=True, slots=True)
class CloudRequest:
    """A call sent over MQTT to whoever serves `service` (an `edged bridge`, or any MQTT worker)."""

    id: bytes  # correlation id, unique among this node's calls in flight
    reply: str  # topic the answer goes to
    method: str
    path: str  # within the service, with the query
    headers: Headers
    body: bytes
    deadline_ms: int  # how long the caller still waits, from publication
    tenant: str
    service: str
    node: str = ""  # the calling node, for logs
    request_id: str = ""  # x-request-id of the call
    sent_ms: int = 0  # the sender's wall clock when sent (Unix ms), 0 when not given
    app: str = ""  # the calling app within `tenant` (a claim of the sealing node: trusted only when sealed)


@dataclass(frozen=True, slots=True)
class CloudAnswer:
    """The answer to a CloudRequest, matched by `id`."""

    id: bytes
    status: int
    headers: Headers
    body: bytes
    node: str = ""  # who answered


def _headers_out(headers: Headers) -> list[list[str]]:
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers]


def encode_request(req: CloudRequest) -> bytes:
    """The CBOR bytes of a request envelope."""
    return cbor2.dumps(
        {
            "v": VERSION,
            "id": req.id,
            "reply": req.reply,
            "method": req.method,
            "path": req.path,
            "headers": _headers_out(req.headers),
            "body": req.body,
            "deadline": req.deadline_ms,
            "tenant": req.tenant,
            "service": req.service,
            "node": req.node,
            "rid": req.request_id,
            **({"ts": req.sent_ms} if req.sent_ms else {}),
            **({"app": req.app} if req.app else {}),
        }
    )


def encode_answer(answer: CloudAnswer) -> bytes:
    """The CBOR bytes of an answer envelope."""
    return cbor2.dumps(
        {
            "v": VERSION,
            "id": answer.id,
            "status": answer.status,
            "headers": _headers_out(answer.headers),
            "body": answer.body,
            "node": answer.node,
        }
    )


def error_answer(id: bytes, status: int, code: str, detail: object, node: str = "") -> CloudAnswer:
    """An answer with the mesh's JSON error body `{"error": code, "detail": ...}`."""
    body = json.dumps({"error": code, "detail": detail}, default=str).encode()
    return CloudAnswer(id, status, ((b"content-type", b"application/json"),), body, node)


# -- decoding -------------------------------------------------------------------------------------------


def _load(data: bytes, what: str) -> dict:
    if data[:1] == b"\xff":  # a lone break code: cbor2 < 6.2 returns a marker object instead of raising
        raise EnvelopeError(f"{what} is not CBOR: it starts with a break code")
    try:
        obj = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises many types on garbage (decode, value, recursion, memory)
        raise EnvelopeError(f"{what} is not CBOR: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise EnvelopeError(f"{what} must be a CBOR map, got {type(obj).__name__}")
    version = obj.get("v")
    if version != VERSION:
        raise EnvelopeError(f"{what} has unsupported version {version!r} (expected {VERSION})")
    return obj


_MISSING = object()


def _field(obj: dict, key: str, kind: type, what: str, default: object) -> object:
    value = obj.get(key, default)
    if value is _MISSING:
        raise EnvelopeError(f"{what}: missing {key!r}")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise EnvelopeError(f"{what}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _str(obj: dict, key: str, what: str, default: object = _MISSING) -> str:
    return _field(obj, key, str, what, default)  # type: ignore[return-value]


def _int(obj: dict, key: str, what: str) -> int:
    return _field(obj, key, int, what, _MISSING)  # type: ignore[return-value]


def _bytes(obj: dict, key: str, what: str) -> bytes:
    return _field(obj, key, bytes, what, b"")  # type: ignore[return-value]


def _id(obj: dict, what: str) -> bytes:
    value = obj.get("id")
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_ID_BYTES:
        raise EnvelopeError(f"{what}: 'id' must be 1..{MAX_ID_BYTES} bytes")
    return value


def _headers_in(obj: dict, what: str) -> Headers:
    raw = _field(obj, "headers", list, what, [])
    out = []
    for pair in raw:  # type: ignore[attr-defined]
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise EnvelopeError(f"{what}: each header must be a [name, value] pair of strings")
        try:
            name, value = pair[0].lower().encode("latin-1"), pair[1].encode("latin-1")
        except UnicodeEncodeError:
            raise EnvelopeError(f"{what}: header {pair[0]!r} is not latin-1") from None
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise EnvelopeError(f"{what}: header {pair[0]!r} has a bad name or value")
        out.append((name, value))
    return tuple(out)


def _sent(obj: dict, what: str) -> int:
    sent = _field(obj, "ts", int, what, 0)
    if not 0 <= sent <= MAX_TS_MS:  # type: ignore[operator]
        raise EnvelopeError(f"{what}: ts must be 0..{MAX_TS_MS} (Unix ms)")
    return sent  # type: ignore[return-value]


def _app(obj: dict, what: str) -> str:
    app = _str(obj, "app", what, "")
    if len(app) > 128 or any(c.isspace() or c == "/" for c in app):
        raise EnvelopeError(f"{what}: bad app {app[:40]!r}")
    return app


def decode_request(data: bytes) -> CloudRequest:
    """A request envelope from CBOR bytes; EnvelopeError (with `id` / `reply` when readable) if invalid."""
    obj = _load(data, "request")
    what = "request"
    try:
        cid = _id(obj, what)
        reply = _str(obj, "reply", what)
        if not reply or _TOPIC_BAD.search(reply):
            raise EnvelopeError(f"request: bad reply topic {reply!r}")
        method = _str(obj, "method", what).upper()
        if not _TOKEN.fullmatch(method.encode("latin-1", "replace")):
            raise EnvelopeError(f"request: bad method {method!r}")
        path = _str(obj, "path", what)
        if not path.startswith("/") or _BAD_PATH.search(path):
            raise EnvelopeError(f"request: bad path {path!r}")
        deadline = _int(obj, "deadline", what)
        if not 0 < deadline <= MAX_DEADLINE_MS:
            raise EnvelopeError(f"request: deadline must be 1..{MAX_DEADLINE_MS} ms, got {str(deadline)[:20]}")
        return CloudRequest(
            id=cid,
            reply=reply,
            method=method,
            path=path,
            headers=_headers_in(obj, what),
            body=_bytes(obj, "body", what),
            deadline_ms=deadline,
            tenant=_str(obj, "tenant", what),
            service=_str(obj, "service", what),
            node=_str(obj, "node", what, ""),
            request_id=_str(obj, "rid", what, ""),
            sent_ms=_sent(obj, what),
            app=_app(obj, what),
        )
    except EnvelopeError as exc:
        # Keep what is needed to answer 400, when it is sound.
        cid, reply = obj.get("id"), obj.get("reply")
        ok_id = cid if isinstance(cid, bytes) and 0 < len(cid) <= MAX_ID_BYTES else None
        ok_reply = reply if isinstance(reply, str) and reply and not _TOPIC_BAD.search(reply) else None
        raise EnvelopeError(str(exc), id=ok_id, reply=ok_reply) from None


def decode_answer(data: bytes) -> CloudAnswer:
    """An answer envelope from CBOR bytes; EnvelopeError if invalid (with `id` when it could be read, so that
    the call waiting for it fails at once instead of waiting for its timeout)."""
    obj = _load(data, "answer")
    cid = _id(obj, "answer")
    try:
        status = _int(obj, "status", "answer")
        if not 200 <= status <= 599:
            raise EnvelopeError(f"answer: status {str(status)[:20]} is not a final status (200..599)")
        return CloudAnswer(
            id=cid,
            status=status,
            headers=_headers_in(obj, "answer"),
            body=_bytes(obj, "body", "answer"),
            node=_str(obj, "node", "answer", ""),
        )
    except EnvelopeError as exc:
        raise EnvelopeError(str(exc), id=cid) from None
