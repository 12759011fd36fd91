"""mDNS / DNS-SD over python-zeroconf: advertise, browse, resolve, and liveness that does not trust mDNS alone.

zeroconf's browser reports `Removed` only on a goodbye (or when a PTR record expires, which takes 20 minutes or
more: PTR TTLs are raised to at least 1125 s). So a peer that was SIGKILLed or cut off is found here instead:
every `resolve_interval`, each known instance that was not heard from lately is asked for its SRV record with
a plain multicast question (no known answers, so its responder must answer), and a record listener notes every
record that arrives for it. A responder answers a question about a record it multicast less than a second
ago only a second later (RFC 6762 s. 14; python-zeroconf adds up to 320 ms of delay and aggregation), so a
healthy peer asked every 300 ms is heard about every 1.6-1.8 s. Silence alone is therefore a poor verdict: a
peer whose CPU is busy adds its own lag to that, and a daemon that fell behind itself sees every peer silent.
An instance is lost once it has been silent for `stale_after` seconds *and* left `MISSED_QUESTIONS`
questions unanswered for `ANSWER_WAIT` seconds each, counting only questions asked when its responder had
nothing to hold back (more than `RATE_LIMIT_SLACK` after its last answer). A lost instance is still asked
every two seconds, and the first record heard from it again (a healed partition, a restart) brings it back.

A goodbye (a record with TTL 0) is unauthenticated: anyone on the LAN can send one for any instance. With
`confirm_goodbye`, the owner (the edge tier) may take a goodbye for an instance it can check another way (a
peer whose TLS handshake proved it) as a hint only: the instance stays live until that check says it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import ifaddr
from zeroconf import (
    DNSOutgoing,
    DNSQuestion,
    InterfaceChoice,
    IPVersion,
    RecordUpdate,
    RecordUpdateListener,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf import Error as ZeroconfError
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..aio import cancel_and_wait
from ..errors import EdgedError
from ..logs import log_event
from .txt import decode_txt

log = logging.getLogger("edged.edge.mdns")

RESOLVE_TIMEOUT_MS = 1500
LOST_PROBE_SECONDS = 2.0  # a lost instance is still asked this often (a healed partition brings it back)
RATE_LIMIT_SLACK = 1.0  # seconds: a responder may hold a repeated multicast answer back for 1 s (RFC 6762 s. 14)
MISSED_QUESTIONS = 3  # questions an instance must leave unanswered (each for ANSWER_WAIT) before it is lost
ANSWER_WAIT = 1.0  # seconds: an answer may take 0.5 s of aggregation, plus a busy responder's lag


class MdnsError(EdgedError):
    """mDNS could not be started or used (no usable interface, a socket error)."""


# DNS constants (RFC 1035, RFC 2782), ours rather than zeroconf's private `const._...` names.
DNS_FLAGS_QUERY = 0x0000
DNS_TYPE_PTR = 12
DNS_TYPE_SRV = 33
DNS_CLASS_IN = 1


def srv_query(names: Iterable[str]) -> DNSOutgoing:
    """A hand-built SRV query for these instances. zeroconf's own requests answer from its cache and add
    known answers, which makes a responder stay silent; liveness must hear from the responder itself.
    DNSOutgoing and DNSQuestion are exported by zeroconf but not listed in its `__all__`: pyproject.toml pins
    the tested zeroconf, and tests/test_mdns.py fails loudly if an upgrade changes them."""
    out = DNSOutgoing(DNS_FLAGS_QUERY)
    for name in names:
        out.add_question(DNSQuestion(name, DNS_TYPE_SRV, DNS_CLASS_IN))
    return out


def ptr_query(service_type: str) -> DNSOutgoing:
    """A PTR query for a type with no known answers: every responder of the type answers (browsers re-learn it)."""
    out = DNSOutgoing(DNS_FLAGS_QUERY)
    out.add_question(DNSQuestion(service_type, DNS_TYPE_PTR, DNS_CLASS_IN))
    return out


def stale_after(resolve_interval: float) -> float:
    """Seconds of silence after which an instance counts as gone: three missed rounds, plus the rate-limit slack."""
    return max(3 * resolve_interval, 1.5) + RATE_LIMIT_SLACK


@dataclass(frozen=True, slots=True)
class Instance:
    """A resolved DNS-SD instance: where it listens and what its TXT record says."""

    type: str  # "_thermo._tcp.local."
    name: str  # "pi-b._thermo._tcp.local."
    addresses: tuple[str, ...]  # usable ones, best first (see order_addresses)
    port: int
    txt: tuple[tuple[str, str], ...]

    @property
    def props(self) -> dict[str, str]:
        return dict(self.txt)

    @property
    def label(self) -> str:
        """The name without `.local.`, for endpoint ids and logs."""
        return self.name[: -len(".local.")] if self.name.endswith(".local.") else self.name.rstrip(".")


def order_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """Usable addresses, best first: IPv4, then global IPv6, then link-local IPv6 that carries its scope.

    Link-local IPv6 without a scope cannot be connected to, and unspecified or multicast addresses never.
    """
    v4, v6, scoped = [], [], []
    for text in addresses:
        base, _, scope = text.partition("%")
        try:
            ip = ipaddress.ip_address(base)
        except ValueError:
            continue
        if ip.is_unspecified or ip.is_multicast:
            continue
        if ip.version == 4:
            v4.append(text)
        elif ip.is_link_local:
            if scope:
                scoped.append(text)
        else:
            v6.append(text)
    return tuple(dict.fromkeys(v4 + v6 + scoped))


def interface_choice(interfaces: str | tuple[str, ...]) -> tuple[object, IPVersion]:
    """zeroconf's `interfaces` and IP version for `mdns.interfaces`: "all", or addresses and interface names.

    `InterfaceChoice.Default` is never used: it fails with ENODEV on a box without a multicast or default route.
    """
    if interfaces == "all":
        return InterfaceChoice.All, IPVersion.V4Only
    chosen: list[str | int] = []
    by_name = {a.nice_name: a for a in ifaddr.get_adapters()}
    for item in interfaces:
        try:
            ipaddress.ip_address(item)
        except ValueError:
            adapter = by_name.get(item)
            if adapter is None:
                raise MdnsError(f"mdns.interfaces: no interface or address {item!r} on this box") from None
            for ip in adapter.ips:
                if isinstance(ip.ip, str):
                    chosen.append(ip.ip)
                elif ip.ip[2]:  # IPv6: zeroconf takes the interface index
                    chosen.append(ip.ip[2])
        else:
            chosen.append(item)
    if not chosen:
        raise MdnsError(f"mdns.interfaces: {list(interfaces)} have no addresses")
    v6 = any(isinstance(c, int) or ":" in c for c in chosen)
    return list(dict.fromkeys(chosen)), (IPVersion.All if v6 else IPVersion.V4Only)


def local_addresses(interfaces: str | tuple[str, ...]) -> list[str]:
    """The addresses this node advertises for `mdns.interfaces`: IPv4 first; loopback only if there is nothing else
    (or when it was named)."""
    adapters = ifaddr.get_adapters()
    wanted = None if interfaces == "all" else set(interfaces)
    found = []
    for adapter in adapters:
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv4 only: the mDNS sockets are IPv4 unless IPv6 addresses were named
            if wanted is None or ip.ip in wanted or adapter.nice_name in wanted:
                found.append(ip.ip)
    if wanted is not None:
        found += [w for w in wanted if _is_ip(w) and w not in found]
    usable = [a for a in found if not ipaddress.ip_address(a.partition("%")[0]).is_loopback]
    return list(order_addresses(usable or found))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class _Known:
    """What discovery keeps per instance name."""

    type: str
    name: str
    instance: Instance | None = None
    alive: bool = False
    last_heard: float = 0.0
    lost_since: float = 0.0
    rounds_lost: int = 0
    server_key: str = ""
    asked: list[float] = field(default_factory=list)  # when it was asked questions it must answer, since last heard


class _Heard(RecordUpdateListener):
    """zeroconf calls this for every record of every response it receives (new, refreshed or changed)."""

    def __init__(self, on_record: Callable[[str], None]) -> None:
        super().__init__()
        self._on_record = on_record

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            if update.new.ttl:  # a goodbye (TTL 0) is no sign of life
                self._on_record(update.new.key)

    def async_update_records_complete(self) -> None:
        pass


class Mdns:
    """One AsyncZeroconf: advertises this node's records, browses the types it is told to, keeps instances alive.

    `on_change(reason)` is called (from the event loop) whenever the set of live instances or what they say
    changed. Own records are never reported.
    """

    def __init__(
        self,
        *,
        interfaces: str | tuple[str, ...],
        resolve_interval: float,
        on_change: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        confirm_goodbye: Callable[[Instance], Awaitable[bool] | None] | None = None,
    ) -> None:
        self._interfaces = interfaces
        self.resolve_interval = resolve_interval
        self.stale_after = stale_after(resolve_interval)
        self._on_change = on_change
        self._clock = clock
        self._aiozc: AsyncZeroconf | None = None
        self._browsers: dict[str, AsyncServiceBrowser] = {}
        self._known: dict[str, _Known] = {}  # instance key (lower-case name) -> state
        self._by_server: dict[str, set[str]] = {}  # host key -> instance keys
        self._pending: set[str] = set()  # instance keys to resolve
        self._resolve_wake = asyncio.Event()
        self._heard = _Heard(self._on_record)
        self._registered: dict[str, tuple[AsyncServiceInfo, tuple]] = {}  # wanted name -> (info, fingerprint)
        self._own: set[str] = set()  # keys of the names we registered (zeroconf may have renamed them)
        self._leaving = False
        self._tasks: list[asyncio.Task] = []
        # confirm_goodbye(instance): None = believe the goodbye; else an awaitable, True once the instance is gone.
        self._confirm_goodbye = confirm_goodbye
        self._doubted: dict[str, asyncio.Task] = {}  # instance key -> the check of a goodbye received for it

    def __repr__(self) -> str:
        alive = sum(1 for k in self._known.values() if k.alive)
        return f"<Mdns types={sorted(self._browsers)} instances={len(self._known)} alive={alive} own={len(self._own)}>"

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the sockets and start the resolver and liveness loops. MdnsError when mDNS cannot run here."""
        choice, version = interface_choice(self._interfaces)
        try:
            self._aiozc = AsyncZeroconf(interfaces=choice, ip_version=version)  # type: ignore[arg-type]
        except (OSError, ZeroconfError, ValueError, RuntimeError) as exc:
            raise MdnsError(f"cannot start mDNS on {self._interfaces!r}: {exc}") from exc
        self._aiozc.zeroconf.async_add_listener(self._heard, None)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._resolver(), name="edged-mdns:resolve"))
        self._tasks.append(loop.create_task(self._liveness(), name="edged-mdns:liveness"))

    async def goodbye(self) -> None:
        """Withdraw every record we advertise (goodbye packets: peers drop us at once) and advertise no more."""
        if self._aiozc is None or self._leaving:
            return
        self._leaving = True
        # Also what is still being announced: zeroconf's registry holds a record as soon as probing ended.
        log_event(log, logging.INFO, "mdns.goodbye", records=sorted(self._registered), at=time.time())
        try:
            await self._aiozc.async_unregister_all_services()
        except (OSError, ZeroconfError) as exc:
            log.warning("mDNS goodbye failed: %s", exc)
        self._registered.clear()

    async def close(self) -> None:
        """Stop the loops and browsers and close the sockets (goodbye first if not sent yet)."""
        await cancel_and_wait([*self._tasks, *self._doubted.values()])
        self._tasks.clear()
        self._doubted.clear()
        if self._aiozc is None:
            return
        for browser in self._browsers.values():
            with contextlib.suppress(OSError, ZeroconfError):
                await browser.async_cancel()
        self._browsers.clear()
        with contextlib.suppress(OSError, ZeroconfError):
            self._aiozc.zeroconf.async_remove_listener(self._heard)
        await self.goodbye()
        try:
            await self._aiozc.async_close()
        except (OSError, ZeroconfError) as exc:
            log.warning("closing mDNS failed: %s", exc)
        self._aiozc = None

    # -- what is seen ---------------------------------------------------------------------------------
    def instances(self, service_type: str | None = None) -> list[Instance]:
        """Live, resolved instances (of one type, or all), sorted by name."""
        out = [
            k.instance
            for k in self._known.values()
            if k.alive and k.instance is not None and (service_type is None or k.type == service_type)
        ]
        return sorted(out, key=lambda i: i.name)

    def last_resolved(self, name: str) -> Instance | None:
        """The instance `name` as it was last resolved (live or lost); None when it never was (or is forgotten)."""
        known = self._known.get(name.lower())
        return known.instance if known is not None else None

    def describe(self) -> list[dict]:
        """Every instance known, live or lost, for `edged status`."""
        now = self._clock()
        return [
            {
                "instance": k.name,
                "type": k.type,
                "alive": k.alive,
                "resolved": k.instance is not None,
                "heard_s_ago": round(now - k.last_heard, 1) if k.last_heard else None,
            }
            for k in sorted(self._known.values(), key=lambda k: k.name)
        ]

    # -- browsing -------------------------------------------------------------------------------------
    async def browse(self, types: Iterable[str]) -> None:
        """Browse exactly these DNS-SD types (full names, `_x._tcp.local.`); instances of dropped types go."""
        if self._aiozc is None:
            return
        wanted = set(types)
        for service_type in sorted(set(self._browsers) - wanted):
            browser = self._browsers.pop(service_type)
            with contextlib.suppress(OSError, ZeroconfError):
                await browser.async_cancel()
            gone = [key for key, k in self._known.items() if k.type == service_type]
            for key in gone:
                self._forget(key)
            if gone:
                self._on_change(f"stopped browsing {service_type}")
        for service_type in sorted(wanted - set(self._browsers)):
            try:
                self._browsers[service_type] = AsyncServiceBrowser(
                    self._aiozc.zeroconf, [service_type], handlers=[self._on_browse]
                )
            except (OSError, ZeroconfError, ValueError) as exc:
                log.error("cannot browse %s: %s", service_type, exc)

    def _on_browse(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        """Browser callback (event loop). Added/Updated: resolve; Removed (a goodbye): drop, at once unless its owner
        checks it first (see the module doc)."""
        key = name.lower()
        if key in self._own:
            return
        if state_change is ServiceStateChange.Removed:
            known = self._known.get(key)
            if known is None or key in self._doubted:
                return
            check = None
            if known.alive and known.instance is not None and self._confirm_goodbye is not None:
                check = self._confirm_goodbye(known.instance)
            if check is None:
                self._goodbye(key, known)
                return
            log_event(log, logging.INFO, "mdns.goodbye_received", instance=name, checking=True, at=time.time())
            task = asyncio.get_running_loop().create_task(self._weigh_goodbye(key, known, check))
            self._doubted[key] = task
            return
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = _Known(type=service_type, name=name)
        known.last_heard = self._clock()
        known.asked.clear()
        self._want_resolve(key)

    def _goodbye(self, key: str, known: _Known) -> None:
        was_alive = known.alive
        self._forget(key)
        if was_alive:
            log_event(log, logging.INFO, "mdns.removed", instance=known.name, reason="goodbye", at=time.time())
            self._on_change("goodbye")

    async def _weigh_goodbye(self, key: str, known: _Known, check: Awaitable[bool]) -> None:
        """A goodbye for an instance its owner can check: dropped only once the check says it is gone."""
        try:
            gone = await check
        finally:
            self._doubted.pop(key, None)
        if self._known.get(key) is not known:
            return  # forgotten meanwhile (no longer browsed)
        if gone:
            self._goodbye(key, known)
        else:
            if self._aiozc is not None:  # the goodbye emptied the browser's cache: have the real one re-learned,
                with contextlib.suppress(OSError, ZeroconfError):  # or its own goodbye would go unseen
                    self._aiozc.zeroconf.async_send(ptr_query(known.type))
            log_event(
                log,
                logging.WARNING,
                "mdns.goodbye_refuted",
                instance=known.name,
                detail=f"a goodbye for {known.name} was received, but it still answers as itself: kept (forged?)",
            )

    def _forget(self, key: str) -> None:
        known = self._known.pop(key, None)
        self._pending.discard(key)
        if known is not None and known.server_key:
            keys = self._by_server.get(known.server_key)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_server[known.server_key]

    def _want_resolve(self, key: str) -> None:
        self._pending.add(key)
        self._resolve_wake.set()

    async def _resolver(self) -> None:
        while True:
            await self._resolve_wake.wait()
            self._resolve_wake.clear()
            batch = sorted(self._pending)
            self._pending.clear()
            if batch:
                await asyncio.gather(*(self._resolve(key) for key in batch))

    async def _resolve(self, key: str) -> None:
        known = self._known.get(key)
        if known is None or self._aiozc is None:
            return
        info = AsyncServiceInfo(known.type, known.name)
        try:
            ok = await info.async_request(self._aiozc.zeroconf, RESOLVE_TIMEOUT_MS)
        except (OSError, ZeroconfError, ValueError) as exc:
            log.debug("resolving %s failed: %s", known.name, exc)
            return
        if self._known.get(key) is not known:
            return  # said goodbye while we asked
        addresses = order_addresses(info.parsed_scoped_addresses()) if ok else ()
        if not ok or not addresses or not info.port:
            return  # the liveness loop asks again while it is heard from
        instance = Instance(
            type=known.type,
            name=known.name,
            addresses=addresses,
            port=info.port,
            txt=tuple(sorted(decode_txt(info.properties).items())),
        )
        if info.server_key and info.server_key != known.server_key:
            self._by_server.setdefault(info.server_key, set()).add(key)
            known.server_key = info.server_key
        revived = not known.alive
        changed = revived or instance != known.instance
        known.instance, known.alive, known.lost_since, known.rounds_lost = instance, True, 0.0, 0
        if revived:
            log_event(log, logging.INFO, "mdns.up", instance=known.name, address=addresses[0], port=info.port)
        if changed:
            self._on_change("resolved")

    # -- liveness -------------------------------------------------------------------------------------
    def _on_record(self, key: str) -> None:
        """A record arrived for an instance (SRV, TXT) or for its host (A, AAAA): it is alive."""
        now = self._clock()
        known = self._known.get(key)
        if known is not None:
            self._heard_from(key, known, now)
            return
        for instance_key in self._by_server.get(key, ()):
            known = self._known.get(instance_key)
            if known is not None:
                self._heard_from(instance_key, known, now)

    def _heard_from(self, key: str, known: _Known, now: float) -> None:
        known.last_heard = now
        known.asked.clear()
        if not known.alive:
            self._want_resolve(key)  # back from a partition or a restart: resolve again (it may have moved)

    async def _liveness(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_interval)
            try:
                self.check_liveness()
            except (OSError, ZeroconfError) as exc:
                log.warning("mDNS liveness round failed: %s", exc)

    def check_liveness(self) -> None:
        """One round: drop instances silent for `stale_after`, ask those not heard from this round."""
        if self._aiozc is None:
            return
        now = self._clock()
        quiet_for = 0.9 * self.resolve_interval
        ask: list[str] = []
        lost: list[_Known] = []
        for key, known in self._known.items():
            silent = now - known.last_heard
            if known.alive and silent > self.stale_after and self._missed(known, now) >= MISSED_QUESTIONS:
                known.alive, known.lost_since, known.rounds_lost = False, now, 0
                lost.append(known)
            if silent < quiet_for:
                continue
            if known.alive or silent <= self.stale_after:
                ask.append(known.name)
                if silent >= RATE_LIMIT_SLACK and len(known.asked) < MISSED_QUESTIONS:
                    known.asked.append(now)  # one its responder must answer: nothing to hold back
            else:
                known.rounds_lost += 1
                if known.rounds_lost % max(1, round(LOST_PROBE_SECONDS / self.resolve_interval)) == 0:
                    ask.append(known.name)
            if known.instance is None and silent < self.stale_after:
                self._pending.add(key)
        if ask:
            self._aiozc.zeroconf.async_send(srv_query(ask))
        if self._pending:
            self._resolve_wake.set()
        for known in lost:
            log_event(
                log,
                logging.INFO,
                "mdns.removed",
                instance=known.name,
                reason="silent",
                silent_s=round(self.stale_after),
            )
        if lost:
            self._on_change("silent")

    @staticmethod
    def _missed(known: _Known, now: float) -> int:
        """Questions it had to answer and did not, within ANSWER_WAIT (the list empties when it is heard from)."""
        return sum(1 for asked in known.asked if now - asked >= ANSWER_WAIT)

    # -- advertising ----------------------------------------------------------------------------------
    async def advertise(self, wanted: Mapping[str, AsyncServiceInfo]) -> None:
        """Make what we advertise equal `wanted` (keyed by the wanted full name): register what is new (probing
        takes about 1.2 s), send changed TXT records, withdraw the rest. Failures are logged, never raised."""
        if self._aiozc is None or self._leaving:
            return
        aiozc = self._aiozc
        for name in sorted(set(self._registered) - set(wanted)):
            info, _ = self._registered.pop(name)
            self._own.discard(info.key)
            await self._quietly(aiozc.async_unregister_service(info), f"withdrawing {name}")
        news, updates = [], []
        for name, info in wanted.items():
            fingerprint = _fingerprint(info)
            current = self._registered.get(name)
            if current is None:
                news.append((name, info, fingerprint))
            elif current[1] != fingerprint:
                old = current[0]
                info.name = old.name  # keep the name zeroconf may have made unique
                updates.append((name, info, fingerprint))
        for name, info, fingerprint in updates:
            if await self._quietly(aiozc.async_update_service(info), f"updating {name}"):
                self._registered[name] = (info, fingerprint)
        if news:
            for _, info, _ in news:
                self._own.add(info.key)
            await asyncio.gather(*(self._register(aiozc, name, info, fp) for name, info, fp in news))

    async def _register(self, aiozc: AsyncZeroconf, name: str, info: AsyncServiceInfo, fingerprint: tuple) -> None:
        """Probe (about 1.2 s), then announce. Ours from the end of probing on, so a goodbye covers it."""
        try:
            broadcast = await aiozc.async_register_service(info, allow_name_change=True)
        except (OSError, ZeroconfError, ValueError) as exc:
            log.error("mDNS registering %s failed: %s", name, exc)
            return
        self._own.add(info.key)  # renamed on a conflict: the new name is ours too
        self._registered[name] = (info, fingerprint)
        if info.name != name:
            log.warning("mDNS name %s was taken; advertising as %s", name, info.name)
        try:
            await broadcast
        except (OSError, ZeroconfError) as exc:
            log.warning("mDNS announcing %s failed: %s", name, exc)

    async def _quietly(self, step, what: str) -> bool:
        """Await a zeroconf registration step and the broadcast it starts; log a failure instead of raising."""
        try:
            broadcast = await step
            await broadcast
        except (OSError, ZeroconfError, ValueError) as exc:
            log.error("mDNS %s failed: %s", what, exc)
            return False
        return True


def _fingerprint(info: AsyncServiceInfo) -> tuple:
    return (info.port, tuple(info.parsed_addresses()), tuple(sorted(info.properties.items())), info.server)


def service_info(
    service_type: str, instance: str, *, port: int, addresses: list[str], txt: Mapping[str, str], server: str
) -> AsyncServiceInfo:
    """A record set to advertise: `{instance}.{type}` on `server` with these addresses and TXT keys."""
    packed = [ipaddress.ip_address(address.partition("%")[0]).packed for address in addresses]
    return AsyncServiceInfo(
        service_type,
        f"{instance}.{service_type}",
        port=port,
        addresses=packed,
        properties=dict(txt),
        server=server,
    )
