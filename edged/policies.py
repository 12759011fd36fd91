"""Policies changed at runtime through the local API (`PUT /v1/policies/{name}`, `edged policy set`).

An override is a partial policy table laid key by key over what the service would otherwise have (fleet
config, else its manifest), so `{"strategy": "latency"}` keeps the manifest's timeouts. Overrides rank
above fleet config, are kept in the state dir, and are laid again when a manifest or fleet config changes:
they are the registry's "api" policy layer (`layer`), recomputed at each rebuild.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from .errors import CallError, ConfigError
from .events import EventBus
from .manifest import parse_policy, policy_dict
from .model import PolicySpec
from .registry import Draft, Key, Layer, Registry
from .state import StateStore
from .state_writer import DocumentWriter

log = logging.getLogger("edged.policies")
STATE_FILE = "policies.json"
SOURCE = "api"


class PolicyOverrides:
    """Owns the "api" policy layer of the registry (add `layer` to it)."""

    def __init__(self, registry: Registry, store: StateStore, events: EventBus) -> None:
        self._registry = registry
        self._store = store
        self._events = events
        self._tables: dict[Key, dict[str, Any]] = {}
        self._unfit: set[tuple[Key, str]] = set()  # overrides that no longer fit their base, already logged
        self.layer = Layer(SOURCE, policies=self.policies)
        self.writer = DocumentWriter(store, STATE_FILE, self._state_document)

    def load(self) -> int:
        """Restore the overrides kept in the state dir; returns how many."""
        data = self._store.read_json(STATE_FILE, {"policies": []})
        for item in data.get("policies", []) if isinstance(data, dict) else []:
            try:
                self._tables[(item["tenant"], item["service"])] = dict(item["policy"])
            except (KeyError, TypeError, ValueError):
                log.warning("policy override in state not usable, dropped: %r", item)
        self._registry.refresh()
        return len(self._tables)

    def table(self, tenant: str, name: str) -> dict[str, Any] | None:
        """The override as it was set (only the keys it changes), or None."""
        return self._tables.get((tenant, name))

    def preview(self, tenant: str, name: str, table: object) -> PolicySpec:
        """The policy the service would have with `table` as its override; 400 if it is not valid."""
        if not isinstance(table, dict):
            raise CallError(400, "invalid_policy", "the body must be a JSON object of [policy] keys")
        base = self._registry.base_policy(tenant, name, SOURCE)
        if base is None:
            raise CallError(404, "unknown_service", f"no service {name!r} for tenant {tenant!r}")
        try:
            return parse_policy({**policy_dict(base), **table}, "policy")
        except ConfigError as exc:
            raise CallError(400, "invalid_policy", f"{exc.key}: {exc.message}" if exc.key else exc.message) from None

    def set(self, tenant: str, name: str, table: object) -> tuple[PolicySpec, asyncio.Future[None]]:
        """Put an override in force (replacing an earlier one) and keep it; returns the policy now in force and
        a future that resolves once it is on disk (StateError if that failed)."""
        policy = self.preview(tenant, name, table)
        assert isinstance(table, dict)
        self._tables[(tenant, name)] = dict(table)
        self._registry.refresh_keys([(tenant, name)])  # one service, not every one a box follows
        saved = self.writer.changed()
        self._events.publish("policy_changed", tenant=tenant, service=name, source=SOURCE, keys=sorted(table))
        return policy, saved

    def delete(self, tenant: str, name: str) -> asyncio.Future[None] | None:
        """Drop the override: the fleet's or the manifest's policy is back in force. A future for "on disk",
        None when there was no override."""
        if self._tables.pop((tenant, name), None) is None:
            return None
        self._registry.refresh_keys([(tenant, name)])
        saved = self.writer.changed()
        self._events.publish("policy_changed", tenant=tenant, service=name, source="removed")
        return saved

    def policies(self, draft: Draft) -> dict[Key, PolicySpec]:
        """The layer: each override laid key by key over the policy the service has below it (fleet config,
        else its manifest). An override waits while its service is gone."""
        policies: dict[Key, PolicySpec] = {}
        for key, table in self._tables.items():
            spec = draft.services.get(key)
            if spec is None:
                continue
            try:
                policies[key] = parse_policy({**policy_dict(spec.policy), **table}, "policy")
            except ConfigError as exc:  # e.g. the manifest's new timeout is shorter than the override's per-try
                if (key, str(exc)) not in self._unfit:
                    self._unfit.add((key, str(exc)))
                    log.warning("policy override for %s/%s no longer fits its base (%s); not applied", *key, exc)
        return policies

    def _state_document(self) -> bytes:
        items = [{"tenant": t, "service": n, "policy": table} for (t, n), table in sorted(self._tables.items())]
        return json.dumps({"version": 1, "policies": items}, separators=(",", ":"), sort_keys=True).encode() + b"\n"

    async def close(self) -> None:
        """Write what is not on disk yet, then stop the writer."""
        await self.writer.close()
