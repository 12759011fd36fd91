"""Who is calling: every request names its tenant by bearer token; the default tenant may be open on loopback."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from .config import TenantConfig
from .errors import CallError
from .model import DEFAULT_TENANT

LOOPBACK_PEERS = ("127.", "::1", "unix")


def is_loopback(peer: str) -> bool:
    """Whether a request came from this box: a loopback address or the Unix socket."""
    return peer.startswith(LOOPBACK_PEERS) or peer.startswith("::ffff:127.")


class Tenancy:
    """Maps bearer tokens to tenants. Tokens are compared in constant time."""

    def __init__(self, tenants: Mapping[str, TenantConfig]) -> None:
        self._tokens: list[tuple[bytes, str]] = [
            (token.encode(), name) for name, cfg in tenants.items() for token in cfg.tokens
        ]
        self._open = {name for name, cfg in tenants.items() if cfg.open_on_loopback}
        if DEFAULT_TENANT not in tenants:
            self._open.add(DEFAULT_TENANT)

    def identify(self, authorization: bytes | None, peer: str) -> tuple[str, bool]:
        """(tenant, whether a token named it). Raises 401 `unauthorized` for a bad or missing token."""
        if authorization:
            scheme, _, token = authorization.partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                raise CallError(401, "unauthorized", "Authorization must be 'Bearer <token>'")
            token = token.strip()
            found = None
            for known, tenant in self._tokens:
                if hmac.compare_digest(known, token):
                    found = tenant
            if found is None:
                raise CallError(401, "unauthorized", "unknown token")
            return found, True
        if DEFAULT_TENANT in self._open and is_loopback(peer):
            return DEFAULT_TENANT, False
        raise CallError(401, "unauthorized", "a bearer token is required from this address")
