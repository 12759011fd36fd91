"""SPIFFE names of fleet members: `spiffe://{fleet}/node/{node}`, the one URI SAN of a node certificate.

Pure string work (no `cryptography`): the peer ingress reads names from `ssl`'s decoded certificates with it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..errors import IdentityError

SCHEME = "spiffe://"
MAX_URI = 256  # longer than any name we make; an attacker's URI is refused before it is parsed
# SPIFFE: a trust domain is lowercase letters, digits, dots, dashes and underscores; a path segment also
# allows uppercase. Node names follow edged's own `[node] name` rule (config.py), which fits in a segment.
_FLEET = re.compile(r"[a-z0-9]([a-z0-9._-]{0,62})")
_NODE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,62})")


class PeerName(NamedTuple):
    """Who a verified certificate names."""

    fleet: str
    node: str


def check_fleet(fleet: str) -> str:
    """The fleet name, or IdentityError when it cannot be a SPIFFE trust domain."""
    if not _FLEET.fullmatch(fleet):
        raise IdentityError(
            f"fleet {fleet[:80]!r} cannot name a trust domain: use 1-63 lowercase letters, digits, '.', '_' or '-'"
        )
    return fleet


def check_node(node: str) -> str:
    """The node name, or IdentityError when it is not a valid node name."""
    if not _NODE.fullmatch(node):
        raise IdentityError(f"node {node[:80]!r} is not a node name: 1-63 letters, digits, '.', '_' or '-'")
    return node


def spiffe_id(fleet: str, node: str) -> str:
    """`spiffe://{fleet}/node/{node}`: the one URI SAN of a node certificate."""
    return f"{SCHEME}{check_fleet(fleet)}/node/{check_node(node)}"


def trust_domain_id(fleet: str) -> str:
    """`spiffe://{fleet}`: the URI SAN of a fleet CA, naming the only fleet it may issue for."""
    return f"{SCHEME}{check_fleet(fleet)}"


def parse_spiffe_id(uri: str) -> tuple[str, str]:
    """`spiffe://home/node/pi-1` -> ("home", "pi-1"); IdentityError for anything else (no port, query, ...)."""
    if len(uri) > MAX_URI or not uri.startswith(SCHEME):
        raise IdentityError(f"not a node SPIFFE ID: {uri[:80]!r}")
    parts = uri[len(SCHEME) :].split("/")
    if len(parts) != 3 or parts[1] != "node" or not _FLEET.fullmatch(parts[0]) or not _NODE.fullmatch(parts[2]):
        raise IdentityError(f"not a node SPIFFE ID (spiffe://FLEET/node/NODE): {uri[:80]!r}")
    return PeerName(parts[0], parts[2])


def parse_trust_domain(uri: str) -> str:
    """`spiffe://home` -> "home"; IdentityError for anything else."""
    if len(uri) > MAX_URI or not uri.startswith(SCHEME) or not _FLEET.fullmatch(uri[len(SCHEME) :]):
        raise IdentityError(f"not a trust domain SPIFFE ID (spiffe://FLEET): {uri[:80]!r}")
    return uri[len(SCHEME) :]


def single_uri(uris: list[str]) -> str:
    """The one URI SAN of a certificate; IdentityError when there are none or several (SPIFFE: exactly one)."""
    if len(uris) != 1:
        raise IdentityError(f"a node certificate must carry exactly one URI SAN, this one has {len(uris)}")
    return uris[0]
