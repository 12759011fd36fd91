"""Signed fleet config: policies and settings pushed to the whole fleet as one retained MQTT message.

Topics `{prefix}/{fleet}/config` (every node) and `.../config/{node}` (one node; overrides the fleet-wide
document service by service). On the wire, a signed document is JSON:

    {"format": "hubmesh-fleet-config/1", "document": "<JSON text>", "key_id": "<hex>", "signature": "<b64>"}

A policy table overrides the keys it names: the other keys keep the values of the service's manifest
`[policy]` (or the defaults). A node's document overrides the fleet's, key by key.

`signature` is Ed25519 over SIGNING_CONTEXT + the UTF-8 bytes of `document`, by a key whose public half
is listed in `[fleet] keys`. The document itself:

    {"version": 7,                       # integer, must grow with each push (per topic)
     "fleet": "home",                    # required: must be this node's fleet
     "node": "pi-kitchen",               # required on config/{node}, and must be that node; never on config
     "issued_at": "2026-12-02T08:00:00+00:00",   # required: when it was signed (ISO 8601, with its offset)
     "policies": {"thermo": {...}, "garden/pump": {...}},   # [policy] keys, by service or tenant/service
     "settings": {"telemetry_interval": "30s"},
     "authz": {"rules": [{...}], "quotas": {"garden": {...}}, "jwt_keys": [{...}]},  # edged/authz.py
     "comment": "..."}

A node document is withdrawn by a signed tombstone, `{"version", "fleet", "node", "issued_at",
"withdrawn": true}` on `config/{node}` with a higher version: the node's own overrides end, and its version
stays the newest seen (an old node document replayed afterwards is still refused).

Replays. A node refuses a document older (by version) than the one in force for that topic, which it keeps
in its state dir; with none (a new box, or a wiped state), it refuses one issued longer ago than
`[fleet] max_age`, so that an old retained document cannot roll a fresh box back. (A box whose clock is far
behind takes every document as recent: the version check still holds once it has one.)

Unsigned, badly signed, unparseable, invalid, misaddressed, older or stale documents are refused, counted
(`edged_fleet_config_refused_total{reason}`) and logged; the last good config stays in force, and is
kept in the state dir so that it survives a restart with the broker down.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Union

from .. import jsonbody
from ..authz import FleetAuthz, load_fleet_authz
from ..document import Doc, Table, parse_toml, read_text, toml_locator
from ..errors import ConfigError, EdgedError
from ..limits import Limits
from ..logs import log_event
from ..manifest import parse_policy, policy_dict
from ..model import DEFAULT_TENANT, PolicySpec
from ..registry import Draft, Key, Layer, Registry
from .persist import StateSaver
from .session import Inbound
from .telemetry import CloudMetrics

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# `cryptography` is imported only where a key is made, a document signed or a signature checked: loading its
# Rust extension costs about 7 MiB of RSS, which a node pays only once a fleet document arrives.
# A trusted key: its 32 raw bytes (as `[fleet] keys` are read), or a cryptography public key object.
PublicKey = Union[bytes, "Ed25519PublicKey"]

log = logging.getLogger("edged.cloud.fleet")

SIGNED_FORMAT = "hubmesh-fleet-config/1"
SIGNING_CONTEXT = b"hubmesh-fleet-config/1\x00"  # a signature made for something else never verifies here
STATE_FILE = "fleet-config.json"
SCOPES = ("fleet", "node")
REASONS = (
    "unsigned",
    "unparseable",
    "unknown_key",
    "bad_signature",
    "invalid",
    "wrong_scope",
    "older",
    "stale",
    "conflict",
)
_DOC_KEYS = ("version", "fleet", "node", "policies", "settings", "authz", "comment", "issued_at", "withdrawn")
MAX_JSON_DEPTH = Limits().json_depth  # nesting of a fleet document from the broker, checked before decoding
MAX_VERSION = 2**53  # versions stay exact in JSON everywhere (a bignum is refused before any comparison)
DEFAULT_MAX_AGE = 30 * 86400.0
_SETTINGS = ("telemetry_interval",)
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class FleetConfigError(EdgedError):
    """A fleet config document is refused; `reason` is one of REASONS (the metric label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class FleetKeyError(EdgedError):
    """A key file cannot be read or is not an Ed25519 key."""


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """Settings a fleet config may carry. None: not set by this document."""

    telemetry_interval: float | None = None

    def merged(self, over: FleetSettings) -> FleetSettings:
        """These settings with those set in `over` taking precedence."""
        return FleetSettings(
            telemetry_interval=over.telemetry_interval
            if over.telemetry_interval is not None
            else self.telemetry_interval
        )


@dataclass(frozen=True, slots=True)
class FleetDocument:
    """A verified, parsed document, and the exact signed bytes it came in (stored as they are)."""

    version: int
    fleet: str | None
    node: str | None
    policies: Mapping[tuple[str, str], PolicySpec]  # each table alone (checked when the document came)
    tables: Mapping[tuple[str, str], Mapping[str, Any]]  # the tables as written, laid over manifests
    settings: FleetSettings
    key_id: str
    signed: bytes = field(repr=False)
    ignored_settings: tuple[str, ...] = ()
    issued_at: float = 0.0  # unix time
    withdrawn: bool = False  # a tombstone: ends the node's document, keeps its version
    authz: FleetAuthz = field(default_factory=FleetAuthz)  # rules and JWT keys (edged/authz.py)


# -- keys ---------------------------------------------------------------------------------------------------


# DER of an Ed25519 SubjectPublicKeyInfo up to the key (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 },
# BIT STRING (32 bytes) }. A public key PEM is exactly these 12 bytes and the raw key.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_PUBLIC_KEY = re.compile(rb"-----BEGIN PUBLIC KEY-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END PUBLIC KEY-----")


def key_id(public_key: PublicKey) -> str:
    """16 hex digits naming a public key: the start of the SHA-256 of its raw bytes."""
    if isinstance(public_key, bytes):
        raw = public_key
    else:
        from cryptography.hazmat.primitives import serialization

        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_bytes(pem: bytes) -> bytes:
    """The raw 32 bytes of an Ed25519 public key PEM (SubjectPublicKeyInfo); ValueError if it is not one."""
    match = _PEM_PUBLIC_KEY.search(pem)
    if match is None:
        raise ValueError("no '-----BEGIN PUBLIC KEY-----' block")
    try:
        der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the PEM block is not base64") from None
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        raise TypeError("not an Ed25519 public key")
    return der[len(_ED25519_SPKI_PREFIX) :]


def generate_key() -> tuple[bytes, bytes, str]:
    """A new Ed25519 key pair: (private PEM, public PEM, key id)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem, key_id(public)


def load_public_key(path: str) -> bytes:
    """The raw bytes of an Ed25519 public key from a PEM file (`edged fleet keygen` writes NAME.pub)."""
    try:
        with open(path, "rb") as f:
            return public_key_bytes(f.read(64 * 1024))
    except OSError as exc:
        raise FleetKeyError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise FleetKeyError(f"{path}: not a PEM public key: {exc}") from None
    except TypeError:
        raise FleetKeyError(f"{path}: not an Ed25519 public key") from None


def load_private_key(path: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from an unencrypted PEM file (`edged fleet keygen` writes NAME.key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as exc:
        raise FleetKeyError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise FleetKeyError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FleetKeyError(f"{path}: not an Ed25519 private key")
    return key


def load_trusted_keys(paths: tuple[str, ...]) -> dict[str, PublicKey]:
    """The `[fleet] keys` by key id (raw bytes). A bad file is logged and skipped: the daemon runs without it."""
    keys: dict[str, PublicKey] = {}
    for path in paths:
        try:
            key = load_public_key(path)
        except FleetKeyError as exc:
            log.error("fleet key not loaded: %s", exc)
            continue
        keys[key_id(key)] = key
    return keys


# -- signing and verifying ---------------------------------------------------------------------------------


def sign_document(text: str, private_key: Ed25519PrivateKey) -> bytes:
    """The signed wire form of a document text."""
    signature = private_key.sign(SIGNING_CONTEXT + text.encode("utf-8"))
    wire = {
        "format": SIGNED_FORMAT,
        "document": text,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    return (json.dumps(wire, indent=1) + "\n").encode("utf-8")


def verify(signed: bytes, keys: Mapping[str, PublicKey]) -> tuple[str, str]:
    """(document text, key id) of a signed document; FleetConfigError when it is not one or does not verify."""
    try:
        wire = jsonbody.loads(signed, MAX_JSON_DEPTH)
    except ValueError as exc:
        raise FleetConfigError("unparseable", f"not JSON: {exc}") from None
    if not isinstance(wire, dict):
        raise FleetConfigError("unparseable", "expected a JSON object")
    if wire.get("format") != SIGNED_FORMAT:
        if "version" in wire or "policies" in wire:
            raise FleetConfigError("unsigned", "a bare document: sign it with `edged fleet sign`")
        raise FleetConfigError("unparseable", f"format must be {SIGNED_FORMAT!r}")
    text, signature = wire.get("document"), wire.get("signature")
    if not isinstance(text, str):
        raise FleetConfigError("unparseable", "'document' must be a string")
    if not signature:
        raise FleetConfigError("unsigned", "no signature")
    try:
        raw = base64.b64decode(str(signature), validate=True)
    except (binascii.Error, ValueError):
        raise FleetConfigError("bad_signature", "signature is not base64") from None
    named = str(wire.get("key_id", ""))
    message = SIGNING_CONTEXT + text.encode("utf-8")
    candidates = [named] if named in keys else list(keys)
    if candidates:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    for kid in candidates:
        key = keys[kid]
        try:
            public = Ed25519PublicKey.from_public_bytes(key) if isinstance(key, bytes) else key
            public.verify(raw, message)
        except (InvalidSignature, ValueError):  # ValueError: raw bytes that are not a valid key
            continue
        return text, kid
    if named in keys:
        raise FleetConfigError("bad_signature", f"signature does not verify with key {named}")
    raise FleetConfigError("unknown_key", f"signed by key {named or '?'}, not one of [fleet] keys")


# -- documents ------------------------------------------------------------------------------------------------


def _policy_key(name: str) -> tuple[str, str] | None:
    tenant, slash, service = name.partition("/")
    if not slash:
        tenant, service = DEFAULT_TENANT, name
    if _LABEL.fullmatch(tenant) and _LABEL.fullmatch(service):
        return tenant, service
    return None


def check_document(data: object, source: str, locate=None) -> tuple[dict, dict, FleetSettings, tuple[str, ...]]:
    """Validate a decoded document: (policies by (tenant, service), each table alone; the tables as written;
    settings; names of ignored settings).

    Raises ConfigError naming the dotted key (and the line when `locate` knows it). Settings this version
    does not know are ignored (and logged when applied), so that a newer fleet document still applies.
    """
    doc = Doc(source, locate)
    if not isinstance(data, Mapping):
        raise doc.error((), "a fleet config document must be a table of keys")
    top = Table(doc, data)
    top.only(_DOC_KEYS)
    top.integer("version", lo=1, hi=MAX_VERSION)
    top.string("fleet", None)
    top.string("node", None)
    top.string("comment", None, allow_empty=True)
    issued = top.string("issued_at", None)
    if issued is not None and issued_time(issued) is None:
        top.fail("issued_at", f"expected an ISO 8601 time with its UTC offset, got {issued!r}")
    if top.boolean("withdrawn", False):
        if top.get("node", None) is None:
            top.fail("withdrawn", "only a node's document can be withdrawn (name the node)")
        if any(top.has(k) for k in ("policies", "settings")):
            top.fail("withdrawn", "a tombstone carries no policies or settings")
    policies: dict[tuple[str, str], PolicySpec] = {}
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    table = top.table("policies")
    for name in table.names():
        key = _policy_key(name)
        if key is None:
            table.fail(name, "expected a service name or tenant/service (lower-case labels)")
        sub = table.table(name)
        tables[key] = dict(sub.data)  # type: ignore[arg-type]
        try:
            policies[key] = parse_policy(sub.data, source)
        except ConfigError as exc:
            where = ("policies", name, *(exc.key.split(".") if exc.key else ()))
            raise doc.error(where, exc.message) from None
    load_fleet_authz(top.table("authz"))  # checked here, kept by parse_document
    settings = top.table("settings")
    ignored = tuple(k for k in settings.names() if k not in _SETTINGS)
    interval = settings.duration("telemetry_interval", None)
    return policies, tables, FleetSettings(telemetry_interval=interval), ignored


def issued_time(text: str) -> float | None:
    """Unix time of an `issued_at` (ISO 8601 with an offset, as `document_text` writes it), or None."""
    try:
        when = datetime.fromisoformat(text)
    except (ValueError, TypeError):
        return None
    return when.timestamp() if when.tzinfo is not None else None


def parse_document(text: str, *, key: str, signed: bytes, source: str) -> FleetDocument:
    """A verified document's text, parsed and validated; FleetConfigError("unparseable" | "invalid"), or
    "wrong_scope" when it does not name its fleet."""
    try:
        data = jsonbody.loads(text.encode("utf-8"), MAX_JSON_DEPTH)
    except ValueError as exc:
        raise FleetConfigError("unparseable", f"document is not JSON: {exc}") from None
    try:
        policies, tables, settings, ignored = check_document(data, source)
    except ConfigError as exc:
        raise FleetConfigError("invalid", str(exc)) from None
    if not isinstance(data.get("fleet"), str):
        raise FleetConfigError("wrong_scope", "the document names no fleet: sign it again with `edged fleet sign`")
    if not isinstance(data.get("issued_at"), str):
        raise FleetConfigError("invalid", "the document has no issued_at: sign it again with `edged fleet sign`")
    return FleetDocument(
        version=data["version"],
        fleet=data.get("fleet"),
        node=data.get("node"),
        policies=policies,
        tables=tables,
        settings=settings,
        key_id=key,
        signed=signed,
        ignored_settings=ignored,
        issued_at=issued_time(data["issued_at"]) or 0.0,
        withdrawn=data.get("withdrawn") is True,
        authz=load_fleet_authz(Table(Doc(source), data, ()).table("authz")),
    )


def read_source_document(path: str) -> dict:
    """An operator's unsigned document (TOML, or JSON by extension), checked; version defaults to now."""
    text = read_text(path)
    locate = None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(path, f"not JSON: {exc}") from None
    else:
        data = parse_toml(text, path)
        locate = toml_locator(text)
    if isinstance(data, dict) and "version" not in data:
        data = {"version": int(time.time()), **data}
    check_document(data, path, locate)
    return data


def document_text(data: Mapping[str, Any]) -> str:
    """The document as the text that gets signed (JSON, sorted keys), stamped with `issued_at` (now)."""
    stamped = {**data, "issued_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return json.dumps(stamped, sort_keys=True, separators=(",", ":"))


def addressed(data: Mapping[str, Any], *, fleet: str | None, node: str | None) -> dict[str, Any]:
    """A source document named for its fleet (and node): what `edged fleet sign` fills in. EdgedError when
    the document already names another one, or when no fleet is known."""
    out = dict(data)
    for key, value in (("fleet", fleet), ("node", node)):
        if value is None:
            continue
        if out.get(key, value) != value:
            raise EdgedError(f"the document names {key} {out[key]!r}, not {value!r}")
        out[key] = value
    if not out.get("fleet"):
        raise EdgedError("name the fleet: --fleet NAME, --config with [node] fleet, or fleet = ... in the document")
    return out


def tombstone(node: str, version: int | None = None) -> dict[str, Any]:
    """The document that withdraws a node's document (its version defaults to now, as with sources); name
    its fleet with `addressed`."""
    return {"version": version or int(time.time()), "node": node, "withdrawn": True}


# -- the source of fleet policies in a running daemon ---------------------------------------------------------


class FleetConfigSource:
    """Checks documents as they arrive, keeps the last good one per scope, lays their policies over the
    manifests as the registry's "fleet" policy layer (`layer`), and saves them. Sync: the session calls
    `on_message` on the event loop."""

    def __init__(
        self,
        *,
        registry: Registry,
        keys: Mapping[str, PublicKey],
        node: str,
        fleet: str,
        metrics: CloudMetrics,
        saver: StateSaver | None = None,
        on_settings: Callable[[FleetSettings], None] | None = None,
        max_age: float = DEFAULT_MAX_AGE,
        clock: Callable[[], float] = time.time,
        on_authz: Callable[[FleetAuthz], None] | None = None,
    ) -> None:
        self._registry = registry
        self._max_age = max_age
        self._clock = clock
        self._keys = dict(keys)
        self.node = node
        self.fleet = fleet
        self._metrics = metrics
        self._saver = saver
        self._on_settings = on_settings
        self._on_authz = on_authz
        self.docs: dict[str, FleetDocument] = {}  # scope -> the document in force
        self.refused: dict[str, int] = {}  # reason -> count
        self.applied_at: float | None = None  # unix time the config in force was applied
        self._alone: set[tuple[Key, str]] = set()  # policies used alone (did not combine), already logged
        self.layer = Layer("fleet", policies=self.policies)

    def __repr__(self) -> str:
        versions = {scope: doc.version for scope, doc in self.docs.items()}
        return f"<FleetConfigSource {self.node}@{self.fleet} versions={versions} refused={self.refused}>"

    def versions(self) -> dict[str, int]:
        """The version in force per scope (a withdrawn node document keeps its version)."""
        return {scope: doc.version for scope, doc in self.docs.items()}

    def on_message(self, msg: Inbound, scope: str) -> None:
        """A document arrived on `config` (scope "fleet") or `config/{node}` (scope "node")."""
        if not msg.payload:
            return  # the retained document was cleared: the last good config stays
        self.offer(msg.payload, scope, msg.topic)

    def offer(self, signed: bytes, scope: str, origin: str) -> bool:
        """Check a signed document for `scope`; apply it if good. True when it is (now) in force."""
        try:
            doc = self._check(signed, scope, origin)
        except FleetConfigError as exc:
            self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            self._metrics.fleet_refused.inc((exc.reason,))
            log_event(
                log, logging.WARNING, "fleet_config.refused", reason=exc.reason, origin=origin, detail=exc.message
            )
            return False
        if doc is None:
            return True  # the document in force, delivered again (a reconnect)
        before = self._policy_keys()
        self.docs[scope] = doc
        self.apply(before | self._policy_keys())
        if self._saver is not None:
            self._saver.mark(STATE_FILE, self.state)
        log_event(
            log,
            logging.INFO,
            "fleet_config.withdrawn" if doc.withdrawn else "fleet_config.applied",
            scope=scope,
            version=doc.version,
            key_id=doc.key_id,
            policies=sorted("/".join(k) for k in doc.policies),
            ignored_settings=list(doc.ignored_settings),
        )
        return True

    def _check(self, signed: bytes, scope: str, origin: str, *, restoring: bool = False) -> FleetDocument | None:
        if not self._keys:
            raise FleetConfigError("unknown_key", "no trusted keys: set [fleet] keys to accept fleet config")
        text, kid = verify(signed, self._keys)
        doc = parse_document(text, key=kid, signed=signed, source=origin)
        if doc.fleet != self.fleet:
            raise FleetConfigError("wrong_scope", f"document is for fleet {doc.fleet!r}, this is {self.fleet!r}")
        if scope == "node" and doc.node != self.node:
            raise FleetConfigError("wrong_scope", f"document is for node {doc.node!r}, this is {self.node!r}")
        if scope == "fleet" and doc.node is not None:
            raise FleetConfigError("wrong_scope", f"a document for node {doc.node!r} on the fleet-wide topic")
        current = self.docs.get(scope)
        if current is not None:
            if doc.version < current.version:
                raise FleetConfigError("older", f"version {doc.version} < {current.version} in force")
            if doc.version == current.version:
                if doc.signed == current.signed or text == _text_of(current.signed):
                    return None
                raise FleetConfigError("conflict", f"another document with version {doc.version} is in force")
        elif not restoring:
            age = self._clock() - doc.issued_at
            if age > self._max_age:
                days = age / 86400
                raise FleetConfigError(
                    "stale",
                    f"issued {days:.1f} days ago, over [fleet] max_age, and no newer document is known here "
                    "(sign it again to push it to new boxes)",
                )
        return doc

    def policies(self, draft: Draft) -> dict[Key, PolicySpec]:
        """The layer: each service's manifest `[policy]` with the fleet document's keys laid over it, then
        this node's document's keys."""
        tables: dict[tuple[str, str], dict[str, Any]] = {}
        alone: dict[tuple[str, str], PolicySpec] = {}
        for scope in SCOPES:
            doc = self.docs.get(scope)
            if doc is not None:
                for key, table in doc.tables.items():
                    tables[key] = {**tables.get(key, {}), **table}
                    alone[key] = doc.policies[key]
        out: dict[tuple[str, str], PolicySpec] = {}
        for key, table in tables.items():
            declared = draft.manifests.get(key)
            base = policy_dict(declared.policy) if declared is not None else {}
            try:
                out[key] = parse_policy({**base, **table}, "fleet config")
            except ConfigError as exc:  # e.g. a longer per_try_timeout than the manifest's timeout
                if (key, str(exc)) not in self._alone:
                    self._alone.add((key, str(exc)))
                    log.warning("fleet policy for %s does not combine with its manifest (%s): used alone", key, exc)
                out[key] = alone[key]
        return out

    def _in_force(self) -> list[FleetDocument]:
        """The documents in force, the fleet's first: a node's document overrides it."""
        return [self.docs[scope] for scope in SCOPES if scope in self.docs]

    def settings(self) -> FleetSettings:
        merged = FleetSettings()
        for doc in self._in_force():
            merged = merged.merged(doc.settings)
        return merged

    def _policy_keys(self) -> set[Key]:
        """The services the documents in force set policies for."""
        return {key for doc in self.docs.values() for key in doc.tables}

    def apply(self, touched: set[Key] | None = None) -> None:
        """Put the config in force into the registry and the settings into their owners. `touched`: the
        services whose policies may have changed (those the documents set before and after), recomputed
        alone; None: every service (a box following a whole fleet keeps ten thousand: a new document must not
        rebuild them all)."""
        if touched is None:
            self._registry.refresh()
        else:
            self._registry.refresh_keys(touched)
        for scope in SCOPES:
            doc = self.docs.get(scope)
            self._metrics.fleet_version.set((scope,), doc.version if doc else 0)
        self.applied_at = time.time()
        if self._on_settings is not None:
            self._on_settings(self.settings())
        if self._on_authz is not None:
            self._on_authz(self.authz())

    def authz(self) -> FleetAuthz:
        """The rules and JWT keys in force: the fleet document's, then this node's (a rule by name)."""
        merged = FleetAuthz()
        for doc in self._in_force():
            merged = merged.over(doc.authz)
        return merged

    # -- persistence ----------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"format": 1, **{scope: doc.signed.decode("utf-8") for scope, doc in self.docs.items()}}

    def load(self, saved: object) -> list[str]:
        """Restore the saved documents, checked again with today's keys; returns the scopes restored."""
        if not isinstance(saved, dict) or saved.get("format") != 1:
            return []
        restored = []
        for scope in SCOPES:
            text = saved.get(scope)
            if not isinstance(text, str):
                continue
            try:
                doc = self._check(text.encode("utf-8"), scope, f"{STATE_FILE}:{scope}", restoring=True)
            except FleetConfigError as exc:
                log.warning("saved fleet config (%s) no longer accepted: %s", scope, exc)
                continue
            if doc is not None:
                self.docs[scope] = doc
                restored.append(scope)
        if restored:
            self.apply()
        return restored


def _text_of(signed: bytes) -> str | None:
    try:
        return jsonbody.loads(signed, MAX_JSON_DEPTH).get("document")  # type: ignore[attr-defined]
    except (ValueError, AttributeError):
        return None


def write_private(path: str, data: bytes) -> None:
    """Write a private key readable by its owner only (0600), refusing to overwrite one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
