"""`edged fleet ls`: the whole fleet's registry, read from the broker on demand.

A box keeps only what it routes to (see `registry_sync.py`); the full view is one command away: this reads
the retained status and service entries of every node (or of the nodes serving one service) straight from
the broker, prints them, and forgets them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from .. import jsonbody
from ..errors import EdgedError
from ..limits import Limits
from .session import Inbound, MqttSession
from .signing import SealError, identity_files, load_seals, sealed_payload
from .topics import Topics

MAX_NODES = 100_000  # a bound on what one listing holds
MAX_JSON_DEPTH = Limits().json_depth  # nesting of a status, checked before decoding


async def read_fleet(config: Any, *, service: str | None, quiet: float, timeout: float) -> list[dict]:
    """Every node the broker holds a retained status or entry for: node, state, zone, vitals, services.
    Retained messages arrive right after subscribing: the listing ends `quiet` seconds after the last one
    (at the latest `timeout` seconds after connecting)."""
    topics = Topics(config.mqtt.topic_prefix, config.node.fleet)
    try:
        seals = load_seals(identity_files(config).dir, skew=config.identity.clock_skew, required=False)
    except SealError:
        seals = None
    nodes: dict[str, dict] = {}
    last = [time.monotonic()]

    def node_doc(node: str) -> dict | None:
        if node not in nodes and len(nodes) >= MAX_NODES:
            return None
        return nodes.setdefault(node, {"node": node, "state": "unknown", "zone": "", "vitals": {}, "services": []})

    def on_status(msg: Inbound) -> None:
        last[0] = time.monotonic()
        parsed = topics.parse_node_topic(msg.topic)
        if parsed is None or not msg.payload:
            return
        payload = msg.payload
        if payload[:1] != b"{":  # sealed (signing.py): checked when this box has an identity, else only read
            try:
                payload = seals.open(msg.topic, payload)[1] if seals is not None else sealed_payload(payload)
            except SealError:
                return
        try:
            doc = jsonbody.loads(payload, MAX_JSON_DEPTH)
        except ValueError:
            return
        out = node_doc(parsed[0]) if isinstance(doc, dict) else None
        if out is not None:
            out["state"] = str(doc.get("state", "unknown"))
            out["zone"] = str(doc.get("zone") or "")
            out["vitals"] = doc.get("vitals") if isinstance(doc.get("vitals"), dict) else {}
            if doc.get("role"):
                out["role"] = str(doc["role"])

    def on_service(msg: Inbound) -> None:
        last[0] = time.monotonic()
        parsed = topics.parse_node_topic(msg.topic)
        out = node_doc(parsed[0]) if parsed is not None and msg.payload else None
        if out is not None and parsed is not None:
            out["services"].append(parsed[2])

    logging.getLogger("edged.cloud.session").setLevel(logging.ERROR)  # the outcome is printed by the caller
    session = MqttSession(config.mqtt, client_id=f"edged-fleet-ls-{os.getpid()}")
    session.subscribe(topics.service_filter(service) if service else topics.all_services, on_service, qos=1)
    session.subscribe(topics.all_status, on_status, qos=1)
    session.start()
    try:
        if not await session.wait_connected(timeout):
            raise EdgedError(f"cannot reach the broker at {session.broker}: {session.last_error or 'timed out'}")
        deadline = time.monotonic() + timeout
        last[0] = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline or now - last[0] >= quiet:
                break
            await asyncio.sleep(min(0.05, quiet))
    finally:
        await session.close()
    listed = sorted(nodes.values(), key=lambda n: n["node"])
    if service:
        listed = [n for n in listed if n["services"]]
    for n in listed:
        n["services"].sort()
    return listed


def format_fleet(nodes: list[dict]) -> str:
    """The listing as a table: one line per node."""
    lines = [f"{'NODE':<24} {'STATE':<8} {'ZONE':<12} SERVICES"]
    for n in nodes:
        services = ", ".join(n["services"][:8]) + (f", ... ({len(n['services'])})" if len(n["services"]) > 8 else "")
        name = n["node"] + (f" ({n['role']})" if n.get("role") else "")
        lines.append(f"{name:<24} {n['state']:<8} {n['zone'] or '-':<12} {services or '-'}")
    online = sum(1 for n in nodes if n["state"] == "online")
    lines.append(f"{len(nodes)} nodes, {online} online, {sum(len(n['services']) for n in nodes)} service entries")
    return "\n".join(lines)
