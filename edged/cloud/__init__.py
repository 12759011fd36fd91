"""The cloud tier: MQTT session, cloud calls, central registry, signed fleet config and telemetry.

`CloudTier` is the daemon's cloud tier (`[mqtt] enabled = true`). It owns one MQTT session and returns what
it adds to the core (`parts()`): the "cloud" transport for the router, the registry layers "cloud" (the cloud
endpoints of every service whose endpoint types include "cloud") and "fleet" (fleet policies), a peer source
for `edged status`, a collector and a vitals listener; remote services come in as registry source "mqtt".
Nothing here may slow local calls down: the broker can die at any time.

    tier.py           CloudTier and the cloud endpoints of services (a pure layer)
    session.py        aiomqtt connection, supervisor, reconnect with backoff, outbox
    envelope.py       CBOR request/answer envelopes
    transport.py      the router's cloud transport (correlation ids, timeouts, 413)
    registry_sync.py  retained node status + service entries; remote services into the registry
    fleet.py          signed fleet config documents (Ed25519), versions, last good config
    telemetry.py      metric families, periodic summaries
    bridge.py         `edged bridge`: the cloud side, MQTT requests -> real HTTP endpoints
    cli.py            `edged fleet keygen | sign | push`, `edged bridge`
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tier import CloudTier, cloud_endpoints

__all__ = ["CloudTier", "cloud_endpoints"]


def __getattr__(name: str) -> Any:
    # Lazy: `edged fleet ...` and `edged status` import edged.cloud.cli; they need not load aiomqtt.
    if name in __all__:
        from . import tier

        return getattr(tier, name)
    raise AttributeError(name)
