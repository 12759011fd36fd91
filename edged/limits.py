"""`[limits]`: every buffer, table and wait that someone else can fill has a bound here.

Each limit has a default that fits a 1 GB box, a config key, and a count in `edged_limit_hits_total{limit}`
when it bites (metric series have their own count: `edged_metric_series_refused_total{metric}`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .answers import WHOLE_ANSWER
from .config import KIB, MIB
from .document import Table


@dataclass(frozen=True, slots=True)
class Limits:
    connections: int = 1024  # open connections per listener (API TCP, API socket, ingress): beyond, 503 + close
    output_buffer: int = 256 * KIB  # answers queued for a client that does not read them: then its requests wait
    header_timeout: float = 10.0  # a whole request head must arrive within this
    body_timeout: float = 30.0  # a whole request body must arrive within this (a byte now and then is not enough)
    registrations: int = 4096  # local registrations in total
    registrations_per_owner: int = 256  # local registrations of one app
    metric_series: int = 2000  # series per metric
    mqtt_message: int = 1 * MIB  # largest MQTT message taken in (the broker is told, on MQTT 5)
    peer_services: int = 256 * KIB  # largest /peer/services answer read from a peer
    peer_services_timeout: float = 2.0  # whole /peer/services fetch
    peers: int = 4096  # peers tracked (mDNS and MQTT each; a few hundred bytes each): a fleet of 4,000 boxes fits
    learned_entries: int = 12000  # registry entries learned over MQTT, in total (about 3 KiB of RSS each)
    learned_entries_per_node: int = 200  # ... and from one node
    answer_buffer: int = WHOLE_ANSWER  # answers up to this length are read whole before the caller sees them
    json_depth: int = 32  # nesting of a JSON request body (registrations, policies)
    handshakes: int = 64  # TLS handshakes in progress on the peer ingress: beyond, a new connection is closed at once
    handshakes_per_source: int = 4  # ... from one address
    handshake_timeout: float = 5.0  # a peer's TLS handshake must end within this (a mutual one takes milliseconds)


def load_limits(t: Table) -> Limits:
    """Read `[limits]` (called by the config loader)."""
    d = Limits()
    t.only(Limits.__slots__)
    return Limits(
        connections=t.integer("connections", d.connections, lo=1),
        output_buffer=t.size("output_buffer", d.output_buffer),
        header_timeout=t.duration("header_timeout", d.header_timeout),
        body_timeout=t.duration("body_timeout", d.body_timeout),
        registrations=t.integer("registrations", d.registrations, lo=0),
        registrations_per_owner=t.integer("registrations_per_owner", d.registrations_per_owner, lo=0),
        metric_series=t.integer("metric_series", d.metric_series, lo=1),
        mqtt_message=t.size("mqtt_message", d.mqtt_message),
        peer_services=t.size("peer_services", d.peer_services),
        peer_services_timeout=t.duration("peer_services_timeout", d.peer_services_timeout),
        peers=t.integer("peers", d.peers, lo=0),
        learned_entries=t.integer("learned_entries", d.learned_entries, lo=0),
        learned_entries_per_node=t.integer("learned_entries_per_node", d.learned_entries_per_node, lo=0),
        answer_buffer=t.size("answer_buffer", d.answer_buffer),
        json_depth=t.integer("json_depth", d.json_depth, lo=2),
        handshakes=t.integer("handshakes", d.handshakes, lo=1),
        handshakes_per_source=t.integer("handshakes_per_source", d.handshakes_per_source, lo=1),
        handshake_timeout=t.duration("handshake_timeout", d.handshake_timeout),
    )
