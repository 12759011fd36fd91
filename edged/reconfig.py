"""What a reload of edged.toml may change in a running daemon, and what has to wait for a restart.

Pure functions over two `Config` values: the daemon applies the live part and reports the rest as
"pending restart" until the file and the running config agree again.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace

from .config import SECTIONS, Config

# Tables and keys a reload applies at once. Everything else (listen addresses, the socket, state dir, node
# name, mDNS, the other MQTT keys, vitals, fleet keys) is read once at start: a change waits for
# `systemctl restart edged`.
LIVE_SECTIONS = ("services", "tenants", "access", "authz", "quotas", "log", "demo")
# [mqtt] keys the cloud tier applies on a reload: the broker list (the session moves to the new first broker),
# what it follows, and credentials and TLS files (a new connection with them).
LIVE_MQTT_FIELDS = (
    "url",
    "fallback_urls",
    "switch_back",
    "follow",
    "username",
    "password_file",
    "ca_file",
    "cert_file",
    "key_file",
    "reconnect_max",
)
LIVE_KEYS = frozenset(f"mqtt.{f}" for f in LIVE_MQTT_FIELDS if f != "fallback_urls")

# Field names that are one key in the file.
_KEY_OF_FIELD = {"listen_host": "listen", "listen_port": "listen", "fallback_urls": "url"}


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys of edged.toml whose values differ (`api.listen`, `log.level`; `tenants` as a whole)."""
    keys: list[str] = []
    for section in SECTIONS:
        a, b = getattr(old, section), getattr(new, section)
        if a == b:
            continue
        if is_dataclass(a):
            for f in fields(a):
                key = f"{section}.{_KEY_OF_FIELD.get(f.name, f.name)}"
                if getattr(a, f.name) != getattr(b, f.name) and key not in keys:
                    keys.append(key)
        else:
            keys.append(section)
    return keys


def is_live(key: str) -> bool:
    return key.split(".", 1)[0] in LIVE_SECTIONS or key in LIVE_KEYS


def with_live_keys(running: Config, new: Config) -> Config:
    """The config to run after a reload: the live tables from `new`, everything else as it runs now."""
    mqtt = replace(running.mqtt, **{f: getattr(new.mqtt, f) for f in LIVE_MQTT_FIELDS})
    return replace(running, secret_files=new.secret_files, mqtt=mqtt, **{s: getattr(new, s) for s in LIVE_SECTIONS})
