"""Sealed statuses and deletions: which `online`, `offline` and tombstone of a node to believe.

Signed (`signing.py`), a node's status and its entry deletions are sealed like its entries, and each names
the *epoch* of the MQTT connection it belongs to (random, new at every connect). The last will is made and
sealed when the connection is opened, with that connection's epoch, so the `offline` the broker publishes
for a lost box is as authentic as its `online`. What a seal alone cannot stop is a replay: anyone who read
an old sealed `offline` (or a deletion) could publish it again later. So, per node:

- an `offline` is believed only for the epoch of the `online` it answers (or when no `online` of the node is
  known: nothing better is);
- an `online` is not believed for an epoch an `offline` has already ended;
- a deletion is a sealed tombstone, a retained CBOR map `{"gone": epoch}` on the entry's topic, believed
  only for the node's current epoch (or when none is known). An empty retained payload, which anyone can
  publish and nobody can seal, deletes nothing on a signed fleet.

A replay can still overwrite the retained message on the broker (only the ACL stops that): the node sees
it on its own topic and posts its status or entry again (`RegistrySync`).

Pure bookkeeping, bounded by the nodes the caller keeps (it forgets a node with its status).
"""

from __future__ import annotations

import os
import re

import cbor2

ONLINE, OFFLINE = "online", "offline"
_EPOCH = re.compile(r"[0-9a-f]{16}")


def new_epoch() -> str:
    """A connection's epoch: 8 random bytes, in hex."""
    return os.urandom(8).hex()


def valid_epoch(value: object) -> bool:
    return isinstance(value, str) and _EPOCH.fullmatch(value) is not None


def tombstone(epoch: str) -> bytes:
    """The payload (sealed, retained) that deletes an entry of this node's connection `epoch`."""
    return cbor2.dumps({"gone": epoch})


def tombstone_epoch(payload: bytes) -> str | None:
    """The epoch of a tombstone; None when `payload` is not one (an entry, or garbage left to the entry
    parser to refuse). Tombstones are tiny: anything longer than 64 bytes is not one."""
    if len(payload) > 64:
        return None
    try:
        obj = cbor2.loads(payload)
    except Exception:  # cbor2 raises many types on garbage
        return None
    if not isinstance(obj, dict) or set(obj) != {"gone"}:
        return None
    epoch = obj["gone"]
    return epoch if valid_epoch(epoch) else ""


class Epochs:
    """Per node: the epoch of its current `online`, and the last epoch an `offline` ended."""

    def __init__(self) -> None:
        self._current: dict[str, str] = {}
        self._ended: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<Epochs current={len(self._current)} ended={len(self._ended)}>"

    def status(self, node: str, state: str, epoch: object) -> str | None:
        """Why a sealed status of `node` must not be believed, or None (then noted)."""
        if not valid_epoch(epoch):
            return "a sealed status names no connection epoch"
        assert isinstance(epoch, str)
        if state == ONLINE:
            if self._ended.get(node) == epoch:
                return "an online status of a connection that has ended (replayed)"
            self._current[node] = epoch
            return None
        current = self._current.get(node)
        if current is not None and current != epoch:
            return "an offline status of another connection than the current one (replayed)"
        self._current.pop(node, None)
        self._ended[node] = epoch
        return None

    def current(self, node: str) -> str | None:
        """The epoch of the node's current `online`, when known."""
        return self._current.get(node)

    def deletion(self, node: str, epoch: str) -> str | None:
        """Why a sealed tombstone of `node` must not be believed, or None."""
        if not epoch:
            return "a tombstone names no connection epoch"
        current = self._current.get(node)
        if current is not None and current != epoch:
            return "a deletion from another connection than the current one (replayed)"
        return None

    def forget(self, node: str) -> None:
        self._current.pop(node, None)
        self._ended.pop(node, None)
