"""Who is calling, and what they may do: the identity seam of every entry point.

A caller gets an `Identity` (a name, a tenant, a set of rights, and the id that authorization rules match)
from the first of these that applies: a verified peer certificate (the peer ingress: `node_identity`), a
bearer JWT (`[access.jwt]`, edged/jwt_auth.py; verified tokens are cached until they expire), a static bearer
token (an app's or a tenant's), the Unix-socket peer credentials (`SO_PEERCRED` uid/gid, mapped to an app in
`[access.apps.NAME]`; root and the daemon's own user are admins), or, from a loopback address, the anonymous
identity (`[access] anonymous`: at most read + call; "none": loopback callers need a token). Rights: `read`
(services, resolve, status, events), `call` (the call path), `write` (register, renew and remove its own
registrations, set policies), `admin` (anyone's registrations, every tenant's views, rules and quotas,
`/metrics` and node-wide views when `[access] node_views = "admin"`).
Caller ids: `TENANT/APP` locally (`TENANT/anonymous`, `TENANT/token` for a tenant's static token,
`default/admin`), `spiffe://FLEET/node/NODE` for a peer node.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from .config import _LABEL, LABEL_WHAT, Table, TenantConfig
from .errors import CallError, IdentityError
from .http.message import Request
from .identity.names import spiffe_id
from .model import DEFAULT_TENANT

if TYPE_CHECKING:  # jwt_auth is loaded only when [access.jwt] is configured
    from .jwt_auth import JwtConfig, JwtVerifier

READ, CALL, WRITE, ADMIN = "read", "call", "write", "admin"
ANONYMOUS_LEVELS: Mapping[str, frozenset[str]] = MappingProxyType(
    {"none": frozenset(), "read": frozenset({READ}), "call": frozenset({READ, CALL})}
)
APP_RIGHTS = frozenset({READ, CALL, WRITE})
ADMIN_RIGHTS = frozenset({READ, CALL, WRITE, ADMIN})
LOOPBACK_PEERS = ("127.", "::1", "::ffff:127.")
JWT_CACHE = 4096  # verified tokens kept (each until it expires)
_APP = re.compile(r"[^\s/]{1,128}")  # an app or JWT subject, as it stands in an id


def is_loopback(peer: str) -> bool:
    """Whether a TCP request came from this box."""
    return peer.startswith(LOOPBACK_PEERS)


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller: `name` owns what it registers; `tenant` scopes what it sees; `rights` is what it may do."""

    name: str
    tenant: str
    rights: frozenset[str]
    by_token: bool = False  # named by an Authorization header (which is then not passed upstream)
    id: str = ""  # what authorization rules match: TENANT/APP, or spiffe://FLEET/node/NODE
    kind: str = "app"  # app | tenant | jwt | anonymous | admin | node
    via: str = ""  # a call made for TENANT/APP by a peer node: the node's id (rules match either)
    # The APP of a local caller's id TENANT/APP ("" for a node): made with the identity, read once per call.
    app: str = field(init=False, default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", f"{self.tenant}/{self.name}")
        object.__setattr__(self, "app", "" if self.kind == "node" else self.id.partition("/")[2])

    def require(self, right: str) -> None:
        """403 `forbidden` (401 for the anonymous caller, who could bring a token) without `right`."""
        if right not in self.rights:
            status = 401 if self.name == "anonymous" and not self.rights else 403
            raise CallError(status, "forbidden" if status == 403 else "unauthorized", f"{self.name} may not {right}")

    def may_change(self, owner: str | None) -> bool:
        """Whether this caller may renew, change or remove something `owner` registered."""
        return ADMIN in self.rights or (WRITE in self.rights and owner == self.name)


def node_identity(fleet: str, node: str, tenant: str = DEFAULT_TENANT) -> Identity:
    """A peer node, named by its verified certificate (`identity.PeerName`; on an `insecure` ingress, by its
    headers): it may read and call in `tenant` (the tenant its call names). 403 for a name no certificate
    could carry."""
    try:
        caller_id = spiffe_id(fleet, node)
    except IdentityError as exc:
        raise CallError(403, "forbidden", str(exc)) from None
    return Identity(f"node:{node}", tenant, frozenset({READ, CALL}), id=caller_id, kind="node")


def relayed_identity(node: Identity, app: str) -> Identity:
    """A call a verified peer node makes for one of its apps (`app` in the node's signed request): the rules
    see both ids, TENANT/APP and the node's (a deny of either denies; an allow of either allows)."""
    if not app or not _APP.fullmatch(app):
        return node
    return Identity(f"{app}@{node.name}", node.tenant, node.rights, id=f"{node.tenant}/{app}", kind="node", via=node.id)


@dataclass(frozen=True, slots=True)
class AppConfig:
    """`[access.apps.NAME]`: a local application that may write, and how it is recognized."""

    name: str
    tenant: str = DEFAULT_TENANT
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    tokens: frozenset[str] = frozenset()
    admin: bool = False


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """`[access]`: the rights of callers without an identity, extra API host names, and the apps."""

    anonymous: str = "call"  # "none" | "read" | "call"
    anonymous_tenant: str = DEFAULT_TENANT
    hosts: tuple[str, ...] = ()
    apps: Mapping[str, AppConfig] = field(default_factory=lambda: MappingProxyType({}))
    jwt: JwtConfig | None = None
    node_views: str = "read"  # who may read /metrics and the peers and config of /v1/status: "read" | "admin"


def load_access(
    t: Table, read_tokens: Callable[[Table, str], list[str]], resolve: Callable[[str], str]
) -> AccessConfig:
    """Read `[access]` (the config loader hands over its table, token-file reader and path resolver)."""
    t.only(("anonymous", "anonymous_tenant", "hosts", "apps", "jwt", "node_views"))
    d = AccessConfig()
    apps: dict[str, AppConfig] = {}
    at = t.table("apps")
    for name in at.names():
        if not _LABEL.fullmatch(name):
            at.fail(name, f"expected an app name: {LABEL_WHAT}, got {name!r}")
        a = at.table(name)
        a.only(("tenant", "uids", "gids", "tokens", "token_file", "admin"))
        ids = {}
        for key in ("uids", "gids"):
            arr = a.array(key, [])
            ids[key] = frozenset(arr.integer(i, lo=0, hi=2**32 - 1) for i in range(len(arr)))
        tokens = list(a.strings("tokens", (), what="a token (no spaces)"))
        token_file = a.string("token_file", None, what="a file path")
        if token_file is not None:
            tokens += read_tokens(a, resolve(token_file))
        apps[name] = AppConfig(
            name=name,
            tenant=a.string("tenant", DEFAULT_TENANT, pattern=_LABEL, what=LABEL_WHAT),
            uids=ids["uids"],
            gids=ids["gids"],
            tokens=frozenset(tokens),
            admin=a.boolean("admin", False),
        )
    return AccessConfig(
        anonymous=t.choice("anonymous", d.anonymous, tuple(ANONYMOUS_LEVELS)),
        anonymous_tenant=t.string("anonymous_tenant", d.anonymous_tenant, pattern=_LABEL, what=LABEL_WHAT),
        hosts=tuple(h.lower() for h in t.strings("hosts", (), what="a host name")),
        apps=MappingProxyType(apps),
        jwt=_load_jwt(t.table("jwt"), resolve) if t.has("jwt") else None,
        node_views=t.choice("node_views", d.node_views, ("read", "admin")),
    )


def _load_jwt(t: Table, resolve: Callable[[str], str]) -> JwtConfig:
    from .jwt_auth import load_jwt  # only with [access.jwt]: a node without JWTs does not carry the module

    return load_jwt(t, resolve)


def _digest(token: bytes) -> bytes:
    # Tokens are looked up by their hash: a dict probe then reveals nothing about a token's bytes.
    return hashlib.sha256(token).digest()


class Access:
    """Maps a request to its `Identity` (see the module doc)."""

    def __init__(
        self,
        config: AccessConfig,
        tenants: Mapping[str, TenantConfig],
        *,
        daemon_uid: int | None = None,
        fleet_keys: Callable[[], tuple] = tuple,  # JWKs of signed fleet config (`[access.jwt] fleet_keys`)
    ) -> None:
        self._admin_uids = {0, os.getuid() if daemon_uid is None else daemon_uid}
        self._tokens: dict[bytes, Identity] = {}
        for name, tenant in tenants.items():
            ident = Identity(f"tenant:{name}", name, APP_RIGHTS, by_token=True, id=f"{name}/token", kind="tenant")
            self._tokens.update((_digest(tok.encode()), ident) for tok in tenant.tokens)
        self._uids: dict[int, Identity] = {}
        self._gids: dict[int, Identity] = {}
        for app in config.apps.values():
            rights = ADMIN_RIGHTS if app.admin else APP_RIGHTS
            by_token = Identity(app.name, app.tenant, rights, True)
            self._tokens.update((_digest(tok.encode()), by_token) for tok in app.tokens)
            ident = Identity(app.name, app.tenant, rights)
            self._uids.update((uid, ident) for uid in app.uids)
            self._gids.update((gid, ident) for gid in app.gids)
        self._jwt: JwtVerifier | None = None
        if config.jwt is not None:
            from .jwt_auth import JwtVerifier  # only with [access.jwt]

            self._jwt = JwtVerifier(config.jwt, fleet_keys=fleet_keys)
        self._verified: dict[bytes, tuple[Identity, float]] = {}  # digest -> (identity, expires): JWTs
        self._jwt_generation = 0
        self._next_look = 0.0
        self.node_views = ADMIN if config.node_views == "admin" else READ
        tenant = config.anonymous_tenant
        open_tenant = tenants[tenant].open_on_loopback if tenant in tenants else tenant == DEFAULT_TENANT
        rights = ANONYMOUS_LEVELS[config.anonymous] if open_tenant else frozenset()
        self.anonymous = Identity("anonymous", tenant, rights, kind="anonymous")
        self.admin = Identity("admin", DEFAULT_TENANT, ADMIN_RIGHTS, kind="admin")

    def identify(self, req: Request) -> Identity:
        """The caller of `req`. 401 `unauthorized` for a bad token, or no identity from a remote address."""
        authorization: bytes | None = None
        for name, value in req.headers:  # req.header(b"authorization"), inline: once per call
            if name == b"authorization":
                authorization = value
                break
        if authorization:
            scheme, _, token = authorization.partition(b" ")
            token = token.strip()
            if scheme.lower() != b"bearer" or not token:
                raise CallError(401, "unauthorized", "Authorization must be 'Bearer <token>'")
            digest = _digest(token)
            ident = self._tokens.get(digest)
            if ident is None:
                if self._jwt is None or token.count(b".") != 2:
                    raise CallError(401, "unauthorized", "unknown token")
                return self._from_jwt(token, digest)
            return ident
        cred = req.cred
        if cred is not None:
            _, uid, gid = cred
            if uid in self._admin_uids:
                return self.admin
            return self._uids.get(uid) or self._gids.get(gid) or self.anonymous
        if req.peer.startswith(LOOPBACK_PEERS):  # is_loopback, inline: once per call
            if not self.anonymous.rights:
                raise CallError(401, "unauthorized", "a bearer token is required")
            return self.anonymous
        raise CallError(401, "unauthorized", "a bearer token is required from this address")

    def _from_jwt(self, token: bytes, digest: bytes) -> Identity:
        """A JWT's identity: from the cache while it has not expired, else checked (signature and claims)."""
        jwt = self._jwt
        assert jwt is not None
        now = time.time()
        if now >= self._next_look:  # a rotated JWKS file: tokens of a removed key are checked again
            self._next_look = now + 1.0
            if jwt.look() or jwt.generation != self._jwt_generation:
                self._jwt_generation = jwt.generation
                self._verified.clear()
        cached = self._verified.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        v = jwt.verify(token)
        rights = {READ, CALL}
        if "write" in v.roles or "admin" in v.roles:
            rights.add(WRITE)
        if "admin" in v.roles:
            rights.add(ADMIN)
        ident = Identity(
            f"jwt:{v.subject}", v.tenant, frozenset(rights), True, id=f"{v.tenant}/{v.subject}", kind="jwt"
        )
        if len(self._verified) >= JWT_CACHE:
            self._verified = {d: c for d, c in self._verified.items() if c[1] > now}
            if len(self._verified) >= JWT_CACHE:
                self._verified.clear()
        self._verified[digest] = (ident, v.expires)
        return ident
