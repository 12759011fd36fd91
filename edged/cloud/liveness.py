"""Liveness of remote nodes as the central registry tells it, and which cloud services have a live server.

A node is `online` while its retained status says so; `offline` from its last will or its clean stop;
`stale` when an online status was not renewed within `stale_after` (a last will the broker lost, a
retained status of a box long gone); `suspect` when calls to services only it serves time out again and
again while other nodes answer (passive detection: a box whose power was cut looks online until the
broker's keepalive runs out).

A cloud service whose every known provider is not live is *withdrawn*: the cloud transport refuses its calls
at once (the router skips the endpoint with the reason, as when the broker is down), so routing never waits
for a per-try timeout to learn what the registry already knows. So is a service whose last provider removed
its entry (a clean stop), until a provider appears again or `ttl` passes. A service with no known provider
(served by an MQTT worker that is not edged) is never withdrawn: nothing says it is down.

The withdrawn set is kept up to date incrementally (a node's death touches only its own services), so the
per-call check is one set lookup and a thousand boxes dying costs no registry rebuild. What time alone
changes (a status going stale, a suspicion ending) is applied by `refresh`, called every few seconds.

Pure bookkeeping on a clock it is given: no I/O, no event loop, so every rule is tested directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ONLINE = "online"
OFFLINE = "offline"
STALE = "stale"
SUSPECT = "suspect"
UNKNOWN = "unknown"  # entries seen, status not (yet): retained status and entries arrive in any order

LIVE = frozenset({ONLINE, UNKNOWN})

SUSPECT_AFTER = 3  # consecutive timed-out calls to services only this node serves
SUSPECT_HOLD = 15.0  # seconds a suspect node gets no calls; then one call may try it again

ServiceKey = tuple[str, str]  # (tenant, service)


@dataclass(slots=True)
class NodeView:
    """What this node knows of a remote node's life. Times come from the clock the owner passes in: a
    monotonic one, so that a box without a real-time clock, whose time jumps at boot, judges no one stale."""

    state: str  # ONLINE or OFFLINE as its status says
    seen: float  # last status message
    since: float  # last change of `state`
    timeouts: int = 0  # consecutive timed-out calls to services only it serves
    suspect_until: float = 0.0
    live: bool = True  # as last applied to the withdrawn set


class Liveness:
    """Node states, the providers of each cloud service, and the services that have no live provider."""

    def __init__(self, *, stale_after: float, suspect_after: int = SUSPECT_AFTER, suspect_hold: float = SUSPECT_HOLD):
        self.stale_after = stale_after
        self.suspect_after = suspect_after
        self.suspect_hold = suspect_hold
        self.nodes: dict[str, NodeView] = {}
        # Tuples, not sets: most services have one or two providers (a set of one costs 216 bytes, a tuple 48).
        self._providers: dict[ServiceKey, tuple[str, ...]] = {}
        self._offers: dict[str, tuple[ServiceKey, ...]] = {}  # node -> services it provides (to update it fast)
        # node -> `(node,)`, the providers of every service it alone serves (most of them): one tuple per node,
        # not one per service (a box following a whole fleet keeps ten thousand services)
        self._alone: dict[str, tuple[str]] = {}
        self._gone: dict[ServiceKey, float] = {}  # services whose last provider left cleanly -> when
        self._withdrawn: set[ServiceKey] = set()
        self._last_answer = float("-inf")  # when any node last answered a call

    def __repr__(self) -> str:
        return f"<Liveness nodes={len(self.nodes)} services={len(self._providers)} withdrawn={len(self._withdrawn)}>"

    # -- what the registry says ---------------------------------------------------------------------------

    def status(self, node: str, state: str, now: float) -> bool:
        """A status message. True when the node went from live to dead or back (not for unknown -> online:
        both are routed)."""
        view = self.nodes.get(node)
        if view is None or view.state != state:
            view = self.nodes[node] = NodeView(state=state, seen=now, since=now, live=view is None or view.live)
        else:
            view.seen = now
        if state == ONLINE:
            view.suspect_until = 0.0  # it spoke: whatever made it suspect is over
        return self._apply(node, now)

    def forget_status(self, node: str, now: float) -> bool:
        """The node's status was deleted (not its entries): its liveness is unknown again."""
        self.nodes.pop(node, None)
        return self._update(self._offers.get(node, ()), now)

    def forget(self, node: str, now: float) -> None:
        """The node and everything it offered are gone from the registry."""
        self.nodes.pop(node, None)
        for key in list(self._offers.get(node, ())):
            self.remove_provider(key, node, now)

    def provided(self) -> Iterable[ServiceKey]:
        """The services some node provides (a view: do not change providers while iterating it)."""
        return self._providers.keys()

    def serving(self, key: ServiceKey) -> tuple[str, ...]:
        """The nodes known to provide `key`."""
        return self._providers.get(key, ())

    def add_provider(self, key: ServiceKey, node: str, now: float) -> None:
        nodes = self._providers.get(key, ())
        if not nodes:
            alone = self._alone.get(node)
            if alone is None:
                alone = self._alone[node] = (node,)
            self._providers[key] = alone
        elif node not in nodes:
            self._providers[key] = (*nodes, node)
        offers = self._offers.get(node, ())
        if key not in offers:
            self._offers[node] = (*offers, key)
        self._gone.pop(key, None)
        self._update((key,), now)

    def remove_provider(self, key: ServiceKey, node: str, now: float, *, departed: bool = False) -> None:
        """`node` no longer offers `key`. `departed`: it said so itself (its entry was deleted): when it was
        the last provider, the service stays withdrawn (nobody serves it) rather than unknown."""
        nodes = self._providers.get(key)
        if nodes is not None:
            nodes = self._providers[key] = tuple(n for n in nodes if n != node)
            if not nodes:
                del self._providers[key]
                if departed:
                    self._gone[key] = now
        offers = self._offers.get(node)
        if offers is not None:
            offers = self._offers[node] = tuple(k for k in offers if k != key)
            if not offers:
                del self._offers[node]
                self._alone.pop(node, None)
        self._update((key,), now)

    # -- what calls say -----------------------------------------------------------------------------------

    def timed_out(self, key: ServiceKey, now: float, sent: float) -> bool:
        """A cloud call to `key`, sent at `sent`, got no answer. When the service has one live provider,
        that node's count grows; at `suspect_after` it becomes suspect. Only when some node answered after
        the call was sent: without that, the fault may be ours or the broker's (a congested connection
        drops answers), and no node is to blame. True when some node's liveness changed."""
        if self._last_answer < sent:
            return False
        live = [n for n in self._providers.get(key, ()) if self.state(n, now) in LIVE]
        if len(live) != 1:
            return False  # several servers (the broker picks one) or none: no node to blame
        view = self.nodes.get(live[0])
        if view is None:
            return False
        view.timeouts += 1
        if view.timeouts < self.suspect_after:
            return False
        view.suspect_until = now + self.suspect_hold
        return self._apply(live[0], now)

    def answered(self, node: str, now: float) -> bool:
        """An answer came from `node`: it is alive. True when its liveness changed."""
        self._last_answer = now
        view = self.nodes.get(node)
        if view is None:
            return False
        view.timeouts = 0
        view.suspect_until = 0.0
        return self._apply(node, now)

    def refresh(self, now: float) -> bool:
        """Apply what time alone changes: statuses gone stale, suspicions over. True if anything changed."""
        changed = False
        for node in self.nodes:
            changed |= self._apply(node, now)
        return changed

    # -- decisions ----------------------------------------------------------------------------------------

    def state(self, node: str, now: float) -> str:
        """online | offline | stale | suspect | unknown."""
        view = self.nodes.get(node)
        if view is None:
            return UNKNOWN
        if view.state != ONLINE:
            return OFFLINE
        if view.suspect_until > now:
            return SUSPECT
        if self.stale_after > 0 and now - view.seen > self.stale_after:
            return STALE
        return ONLINE

    def reachable(self, key: ServiceKey, now: float) -> bool | None:
        """Whether a cloud call to `key` can be served now: None when no provider is known."""
        nodes = self._providers.get(key)
        if not nodes:
            return False if key in self._gone else None
        return any(self.state(n, now) in LIVE for n in nodes)

    def is_withdrawn(self, key: ServiceKey) -> bool:
        """The per-call check: a set lookup (kept up to date as news arrives and by `refresh`)."""
        return key in self._withdrawn

    def withdrawn(self) -> frozenset[ServiceKey]:
        """Services whose known providers are all not live, or whose last provider left."""
        return frozenset(self._withdrawn)

    def providers(self, key: ServiceKey, now: float) -> list[tuple[str, str]]:
        """The known providers of a service and their liveness, by node name."""
        return [(node, self.state(node, now)) for node in sorted(self._providers.get(key, ()))]

    def expired(self, now: float, ttl: float) -> list[str]:
        """Nodes that have not been live for longer than `ttl`: their entries should be dropped."""
        out = []
        for node, view in self.nodes.items():
            state = self.state(node, now)
            # Offline since its will or clean stop; stale since its last status.
            last_live = view.since if state == OFFLINE else view.seen if state == STALE else now
            if now - last_live > ttl:
                out.append(node)
        return out

    def forget_departed(self, now: float, ttl: float) -> bool:
        """Forget services that left cleanly more than `ttl` ago (they become unknown). True if any."""
        old = [key for key, when in self._gone.items() if now - when > ttl]
        for key in old:
            del self._gone[key]
        self._update(old, now)
        return bool(old)

    # -- keeping the withdrawn set ------------------------------------------------------------------------

    def _apply(self, node: str, now: float) -> bool:
        """Re-judge one node; when it went from live to dead or back, re-judge the services it offers."""
        view = self.nodes.get(node)
        live = self.state(node, now) in LIVE
        if view is None or view.live == live:
            return False
        view.live = live
        self._update(self._offers.get(node, ()), now)
        return True

    def _update(self, keys, now: float) -> bool:
        changed = False
        for key in keys:
            out = self.reachable(key, now) is False
            if out != (key in self._withdrawn):
                changed = True
                if out:
                    self._withdrawn.add(key)
                else:
                    self._withdrawn.discard(key)
        return changed
