"""Bearer JWTs from an existing identity provider (OAuth 2 / OIDC), checked with PyJWT against local keys.

Keys come from a JWKS file (`[access.jwt] jwks_file`, re-read when it changes: `kid` rotation needs no
restart), inline JWKs (`keys = [{kty = ..., ...}]`) and, with `fleet_keys = true`, the `authz.jwt_keys` of
signed fleet config: checking works offline. A token must name a
known `kid` (or there must be one key only), use the algorithm of that key (the key's `alg`, else the one
its type implies: RSA -> RS256, EC P-256 -> ES256, Ed25519 -> EdDSA, oct -> HS256) and one listed in
`algorithms`: `alg: none` and HS/RS confusion (an HMAC made with an RSA public key as its secret) never
verify. `iss`, `aud` (when configured), `exp` (with `leeway`) and `sub` are required; the tenant and the
subject come from the claims named `tenant_claim` and `subject_claim`, and rights beyond read + call from
`roles_claim` ("write", "admin").

PyJWT (and with it cryptography's extension) is imported only when `[access.jwt]` is configured.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import _LABEL, LABEL_WHAT
from .document import Table
from .errors import CallError

ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
SYMMETRIC = ("HS256", "HS384", "HS512")
DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
MAX_TOKEN = 8192  # bytes of a bearer token taken in; longer ones are refused before decoding
MAX_JWKS = 256 * 1024
RECHECK = 1.0  # seconds between looks at the JWKS file's mtime
_SUBJECT = re.compile(r"[^\s/]{1,128}")
log = logging.getLogger("edged.jwt")


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """`[access.jwt]`."""

    issuer: str
    audience: str | None = None
    jwks_file: str | None = None
    keys: tuple[dict, ...] = ()  # inline JWKs
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway: float = 30.0
    tenant_claim: str = "tenant"
    subject_claim: str = "sub"
    roles_claim: str = "roles"
    default_tenant: str | None = None  # tenant of tokens without the tenant claim; None: such tokens are refused
    fleet_keys: bool = False  # also the JWKs of signed fleet config (`authz.jwt_keys`)


def load_jwt(t: Table, resolve: Callable[[str], str]) -> JwtConfig:
    """Read `[access.jwt]` (the keys themselves are read and checked when the verifier is built)."""
    t.only(JwtConfig.__slots__)
    algorithms = t.strings("algorithms", DEFAULT_ALGORITHMS, what="a JWS algorithm")
    for i, alg in enumerate(algorithms):
        if alg not in ASYMMETRIC + SYMMETRIC:
            t.array("algorithms").fail(i, f"expected one of {', '.join(ASYMMETRIC + SYMMETRIC)}, got {alg!r}")
    arr = t.array("keys", [])
    keys = tuple(dict(arr.table(i).data) for i in range(len(arr)))  # type: ignore[arg-type]
    jwks = t.string("jwks_file", None, what="a file path")
    fleet_keys = t.boolean("fleet_keys", False)
    if jwks is None and not keys and not fleet_keys:
        t.fail(None, "give the keys: jwks_file, keys and/or fleet_keys = true")
    config = JwtConfig(
        issuer=t.string("issuer"),
        audience=t.string("audience", None),
        jwks_file=None if jwks is None else resolve(jwks),
        keys=keys,
        algorithms=tuple(algorithms),
        leeway=t.duration("leeway", 30.0, positive=False),
        tenant_claim=t.string("tenant_claim", "tenant"),
        subject_claim=t.string("subject_claim", "sub"),
        roles_claim=t.string("roles_claim", "roles"),
        default_tenant=t.string("default_tenant", None, pattern=_LABEL, what=LABEL_WHAT),
        fleet_keys=fleet_keys,
    )
    try:
        JwtVerifier(config)  # a bad key or file is a config error now, not a 401 later
    except CallError as exc:
        t.fail(None, str(exc.detail))
    return config


@dataclass(frozen=True, slots=True)
class Verified:
    """What a valid token says: subject, tenant, roles, and when it expires (unix time)."""

    subject: str
    tenant: str
    roles: frozenset[str]
    expires: float


def _unauthorized(detail: str) -> CallError:
    return CallError(401, "unauthorized", f"bearer JWT refused: {detail}")


class JwtVerifier:
    """Checks tokens against the configured keys (see the module doc). Not thread-safe; the event loop's."""

    def __init__(
        self,
        config: JwtConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        fleet_keys: Callable[[], tuple] = tuple,
    ) -> None:
        import jwt  # noqa: F401 - fails early (ImportError) rather than at the first token

        self.config = config
        self._clock = clock
        self._inline = self._parse_keys(config.keys, "keys")
        self._fleet = fleet_keys if config.fleet_keys else tuple
        self._fleet_seen: tuple = ()
        self._fleet_keys: dict[str | None, Any] = {}
        self._file_keys: dict[str | None, Any] = {}
        self._file_stamp: tuple[int, int] | None = None
        self._next_look = 0.0
        self.generation = 0  # grows when the key set changes: verified tokens are then checked again
        self._load_file()

    def _parse_keys(self, jwks: list[dict] | tuple[dict, ...], where: str) -> dict[str | None, Any]:
        from jwt import PyJWK, PyJWTError

        keys: dict[str | None, Any] = {}
        for i, data in enumerate(jwks):
            if not isinstance(data, dict):
                raise CallError(500, "bad_key", f"{where}[{i}]: a JWK must be an object")
            try:
                key = PyJWK(data)
            except (PyJWTError, ValueError, TypeError, KeyError) as exc:
                raise CallError(500, "bad_key", f"{where}[{i}]: not a usable JWK: {exc}") from None
            if key.algorithm_name not in self.config.algorithms:
                continue  # a key for an algorithm not accepted here (e.g. an HMAC key when only RS256 is listed)
            keys[data.get("kid")] = key
        return keys

    def _load_file(self) -> bool:
        """Re-read the JWKS file if it changed; True when the key set changed."""
        path = self.config.jwks_file
        if path is None:
            return False
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._file_stamp:
                return False
            if st.st_size > MAX_JWKS:
                raise CallError(500, "bad_key", f"{path}: larger than {MAX_JWKS} bytes")
            with open(path, "rb") as f:
                data = json.loads(f.read(MAX_JWKS))
        except (OSError, ValueError) as exc:
            if self._file_stamp is None:
                raise CallError(500, "bad_key", f"{path}: cannot read a JWKS: {exc}") from None
            return False  # a half-written file during rotation: keep the last good keys
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list):
            raise CallError(500, "bad_key", f"{path}: a JWKS is an object with a 'keys' array")
        self._file_keys = self._parse_keys(keys, path)
        self._file_stamp = stamp
        self.generation += 1
        return True

    def look(self) -> bool:
        """Look at the JWKS file (at most once a second); True when the keys changed."""
        now = self._clock()
        if now < self._next_look:
            return False
        self._next_look = now + RECHECK
        changed = False
        fleet = self._fleet()
        if fleet is not self._fleet_seen:
            self._fleet_seen = fleet
            try:
                self._fleet_keys = self._parse_keys([dict(k) for k in fleet], "fleet config authz.jwt_keys")
            except CallError as exc:
                log.warning("JWT keys of fleet config not used: %s", exc.detail)
                self._fleet_keys = {}
            self.generation += 1
            changed = True
        try:
            return self._load_file() or changed
        except CallError:
            return changed  # the last good keys stay

    def _key(self, kid: object) -> Any:
        if kid is not None and not isinstance(kid, str):
            return None
        key = self._inline.get(kid) or self._file_keys.get(kid) or self._fleet_keys.get(kid)  # type: ignore[arg-type]
        if key is None and kid is None:
            every = {**self._fleet_keys, **self._file_keys, **self._inline}
            if len(every) == 1:
                key = next(iter(every.values()))
        return key

    def verify(self, token: bytes) -> Verified:
        """The claims of a valid token; CallError 401 `unauthorized` (with the reason) otherwise."""
        import jwt

        if len(token) > MAX_TOKEN:
            raise _unauthorized(f"longer than {MAX_TOKEN} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _unauthorized(f"not a JWT ({exc})") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.config.algorithms:  # "none" is never listed
            raise _unauthorized(f"algorithm {alg!r} is not accepted")
        key = self._key(kid)
        if key is None and self.look():
            key = self._key(kid)
        if key is None:
            raise _unauthorized(f"unknown key id {kid!r}")
        if key.algorithm_name != alg:
            raise _unauthorized(f"key {kid!r} is for {key.algorithm_name}, the token says {alg}")
        c = self.config
        require = ["exp", "iss", c.subject_claim]
        if c.audience is not None:
            require.append("aud")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=c.audience,
                issuer=c.issuer,
                leeway=c.leeway,
                options={"require": require, "verify_aud": c.audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise _unauthorized(str(exc) or type(exc).__name__) from None
        subject = claims.get(c.subject_claim)
        if not isinstance(subject, str) or not _SUBJECT.fullmatch(subject):
            raise _unauthorized(f"claim {c.subject_claim!r} is not a name (1-128 characters, no spaces or '/')")
        tenant = claims.get(c.tenant_claim, c.default_tenant)
        if not isinstance(tenant, str) or not _LABEL.fullmatch(tenant):
            raise _unauthorized(f"claim {c.tenant_claim!r} does not name a tenant")
        roles = claims.get(c.roles_claim, ())
        if isinstance(roles, str):
            roles = roles.split()
        if not isinstance(roles, (list, tuple)):
            roles = ()
        return Verified(subject, tenant, frozenset(r for r in roles if isinstance(r, str)), float(claims["exp"]))
