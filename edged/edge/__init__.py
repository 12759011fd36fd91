"""The edge tier: peers and services on the LAN over mDNS, the peer ingress, and this node's vitals in TXT.

    core vitals --TXT--> mdns (advertise, browse, resolve, liveness) --> Discovered --> edge_layer (pure)
        --> registry ("mdns" endpoints and services) --> router --> EdgeTransport --> a peer's ingress
                                                                                   --> its LOCAL endpoints

`EdgeTier` is the tier that owns all of it: one task per loop (sync, advertiser), each cancelled and awaited
on stop. It returns its transport, its registry layer, its check headers, its peers and a vitals listener.
Nothing here may take the daemon down: a taken ingress port or a box where mDNS cannot start is logged,
and the local API keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING

from ..aio import cancel_and_wait
from ..errors import EdgedError
from ..http.client import UpstreamPool
from ..identity import CertSummary, IdentityFiles, clock_problem, summary
from ..identity.keeper import IdentityKeeper
from ..identity.tls import server_context
from ..logs import log_event
from ..model import Endpoint, parse_target
from ..registry import Snapshot
from ..vitals import Vitals
from .admission import Admission, PeerTls
from .handshakes import HandshakeGate
from .ingress import SERVICES_PATH, EdgeTransport, FleetIdentity, Ingress, to_peer
from .peers import Discovered, LinkEstimator, Peer, PeerLabels, edge_layer, offered, url_host
from .txt import (
    HUBMESH_TYPE,
    PROTOCOL_VERSION,
    full_type,
    host_name,
    instance_label,
    node_txt,
    parse_labels_doc,
    parse_node_txt,
    parse_refs,
    service_path,
)

if TYPE_CHECKING:
    from ..core import MeshCore, TierParts
    from .mdns import Mdns

__all__ = ["EdgeTier", "FleetIdentity"]

log = logging.getLogger("edged.edge")


class PeerListTooLarge(EdgedError):
    """A peer's /peer/services answer is larger than `[limits] peer_services`."""


def _wrong_name(config, cert: CertSummary) -> str | None:
    """Why this certificate is not this node's ([node] name and fleet), or None."""
    want = (config.node.fleet, config.node.name)
    if (cert.fleet, cert.node) == want:
        return None
    return (
        f"{IdentityFiles(config.identity_dir).cert} names node {cert.node!r} of fleet {cert.fleet!r}, but this node"
        f" is {want[1]!r} of {want[0]!r} ([node] name and fleet)"
    )


def _peer_tls(config) -> tuple[PeerTls, ssl.SSLContext]:
    """The client and server sides of mutual TLS with peers, from this node's identity; EdgedError saying what
    is missing or wrong (not enrolled, enrolled as another node or fleet)."""
    files = IdentityFiles(config.identity_dir)
    if not files.present():
        raise EdgedError(
            f"this node has no fleet certificate in {files.dir} (edged fleet enroll; or [ingress] insecure = true"
            " for a lab)"
        )
    cert = summary(files.cert)
    wrong = _wrong_name(config, cert)
    if wrong is not None:
        raise EdgedError(wrong)
    problem = clock_problem(cert, time.time(), config.identity.clock_skew)
    if problem is not None:
        log.error("%s", problem)  # the contexts still load: the clock may be set (NTP) while we run
    return PeerTls(files, config.node.fleet), server_context(files)


class EdgeTier:
    """The edge tier (see the module doc), built by the core: `EdgeTier(core)`."""

    name = "edge"

    def __init__(self, core: MeshCore) -> None:
        config = core.config
        self.config = config
        self._registry = core.registry
        self._health = core.health
        self._metrics = core.metrics
        self._events = core.events
        self._pool = core.pool
        self._vitals = core.vitals
        self.limits = config.limits
        ing = config.ingress
        # Mutual TLS unless the config says insecure; without a usable identity, no peer talks to us nor we to them.
        self.peer_tls: PeerTls | None = None
        self.admission: Admission | None = None
        self.peer_pool: UpstreamPool | None = None
        self.tls_problem: str | None = None  # why peers are off (no identity, a bad one), for status and the log
        server_tls = None
        self._tls_ready = not ing.insecure  # False while waiting for `edged fleet enroll` (see _identity_ready)
        if ing.insecure:
            log.warning(
                "INSECURE: [ingress] insecure = true: the peer ingress speaks plain HTTP and believes the fleet and"
                " node callers name in headers; anyone on the LAN can call this node's services (labs and tests only)"
            )
        else:
            try:
                self.peer_tls, server_tls = _peer_tls(config)
            except EdgedError as exc:
                # Waiting: contexts without a certificate, loaded by the keeper when one that names this node is
                # installed; then the ingress starts and peers are admitted, with no restart.
                self.tls_problem = str(exc)
                self._tls_ready = False
                log.warning("peer calls are off until this node is enrolled: %s", exc)
                files = IdentityFiles(config.identity_dir)
                self.peer_tls = PeerTls(files, config.node.fleet, load=False)
                server_tls = server_context(files, load=False)
        self.identity = FleetIdentity(config.node.name, config.node.fleet, tls=not ing.insecure)
        if self.peer_tls is not None:
            # Idle connections live longer than the core pool's (a handshake is dear), but end before a peer's
            # ingress would close them ([api] idle_timeout, 75 s by default): no request meets a closing socket.
            idle = max(5.0, min(60.0, config.api.idle_timeout - 10.0))
            self.peer_pool = UpstreamPool(tls=self.peer_tls.upstream(), idle_timeout=idle)
            self.admission = Admission(
                self.peer_tls,
                self.peer_pool,
                timeout=config.limits.peer_services_timeout,
                on_refused=lambda _node: self._metrics.peers_refused.inc(()),
            )
        self.transport = EdgeTransport(core.pool, self.identity, self.peer_pool)
        self.keeper: IdentityKeeper | None = None
        if self.peer_tls is not None and server_tls is not None:
            self.keeper = IdentityKeeper(
                IdentityFiles(config.identity_dir),
                [self.peer_tls.context, server_tls],
                skew=config.identity.clock_skew,
                renew=self._renew if config.identity.renew and config.mqtt.enabled else None,
                metrics=self._metrics,
                waiting_for=None if self._tls_ready else lambda cert: _wrong_name(config, cert),
                on_ready=None if self._tls_ready else self._identity_ready,
            )
        self._advertised: Vitals | None = None  # the vitals in our TXT record
        self._advertised_at = -math.inf
        self.ingress: Ingress | None = None
        if ing.enabled and (ing.insecure or server_tls is not None):
            self.ingress = Ingress(
                host=ing.listen_host,
                port=ing.listen_port,
                router=core.router,
                registry=core.registry,
                identity=self.identity,
                max_header=config.api.max_header,
                max_body=config.api.max_body,
                idle_timeout=config.api.idle_timeout,
                server_limits=core.server_limits(),
                gate=core.gate,
                tls=server_tls,
                handshakes=None
                if server_tls is None
                else HandshakeGate(
                    total=config.limits.handshakes,
                    per_source=config.limits.handshakes_per_source,
                    timeout=config.limits.handshake_timeout,
                    on_refused=core.limit_hit,
                ),
            )
        self.mdns: Mdns | None = None
        self._advertising = False
        self._found = Discovered()
        self._links = LinkEstimator()
        # node -> (hash, services, their labels)
        self._fetched: dict[str, tuple[str, tuple[tuple[str, str], ...], PeerLabels]] = {}
        self._dirty = asyncio.Event()
        self._advertise_wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []  # the sync loop
        self._advertiser: asyncio.Task | None = None  # ends first, at `leaving`
        self._started = False
        self._stopped = False

    def parts(self) -> TierParts:
        from ..core import TierParts

        return TierParts(
            transports={"edge": self.transport},
            layers=(
                edge_layer(
                    lambda: self._found, node=self.config.node.name, fleet=self.config.node.fleet, tls=self.identity.tls
                ),
            ),
            check_headers={"edge": self._check_headers},
            check_pools={"edge": self.peer_pool} if self.peer_pool is not None else {},
            peers=self.peers,
            on_vitals=self._on_vitals,
            on_registry_change=self._on_registry_change,
            identity=self._identity_state,
        )

    @property
    def vitals(self) -> Vitals:
        """This node's vitals as last read by the core's sampler."""
        return self._vitals.current

    @property
    def _peers(self) -> tuple[Peer, ...]:
        return self._found.peers

    def __repr__(self) -> str:
        return f"<EdgeTier peers={[p.node for p in self._peers]} mdns={self.mdns!r} vitals={self.vitals}>"

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = True
        if self.keeper is not None:
            self.keeper.start()
        self._advertised, self._advertised_at = self.vitals, time.monotonic()
        ready = self.identity.tls is False or self._tls_ready
        listening = ready and self.ingress is not None and await self.ingress.start()
        if self.config.mdns.enabled:
            # Only here: zeroconf costs about 3.5 MiB of RSS, which a node without mDNS does not pay.
            from .mdns import Mdns, MdnsError

            mdns = Mdns(
                interfaces=self.config.mdns.interfaces,
                resolve_interval=self.config.mdns.resolve_interval,
                on_change=self._on_mdns_change,
                confirm_goodbye=self._confirm_goodbye,
            )
            try:
                await mdns.start()
            except MdnsError as exc:
                log.error("mDNS is off: %s (the local API keeps serving)", exc)
                await mdns.close()
            else:
                self.mdns = mdns
        self._advertising = listening and self.mdns is not None
        loop = asyncio.get_running_loop()
        if self.mdns is not None:
            self._tasks.append(loop.create_task(self._sync_loop(), name="edged-edge:sync"))
            self._dirty.set()
        if self._advertising:
            self._advertiser = loop.create_task(self._advertise_loop(), name="edged-edge:advertise")
            self._advertise_wake.set()

    async def leaving(self) -> None:
        """Goodbye packets first: peers drop this node at once while its in-flight calls still finish."""
        self._advertising = False
        if self.ingress is not None:
            self.ingress.leaving = True  # before the goodbye: a peer that checks it hears "leaving" at once
        if self._advertiser is not None:
            await cancel_and_wait([self._advertiser])  # nothing may be (re)announced after the goodbye
            self._advertiser = None
        if self.mdns is not None:
            await self.mdns.goodbye()

    async def stop(self) -> None:
        self._stopped = True
        if self._advertiser is not None:
            await cancel_and_wait([self._advertiser])
            self._advertiser = None
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self.mdns is not None:
            await self.mdns.close()
        if self.ingress is not None:
            await self.ingress.shutdown(self.config.api.drain_timeout)
        if self.peer_pool is not None:
            await self.peer_pool.close()
        if self.keeper is not None:
            await self.keeper.stop()

    # -- identity -------------------------------------------------------------------------------------
    def _identity_ready(self) -> None:
        """The keeper loaded a certificate naming this node into the TLS contexts: go live without a restart."""
        self._tls_ready, self.tls_problem = True, None
        log_event(log, logging.INFO, "edge.identity_ready", detail="enrolled: peer ingress and admission start")
        if self._started and not self._stopped:
            task = asyncio.get_running_loop().create_task(self._go_live(), name="edged-edge:go-live")
            self._tasks.append(task)

    async def _go_live(self) -> None:
        if self._stopped or (self.ingress is not None and self.ingress.leaving):
            return  # enrolled while shutting down: nothing to start
        listening = self.ingress is not None and await self.ingress.start()
        if self._stopped:
            return
        if listening and self.mdns is not None and self._advertiser is None:
            self._advertising = True
            self._advertiser = asyncio.get_running_loop().create_task(
                self._advertise_loop(), name="edged-edge:advertise"
            )
            self._advertise_wake.set()
        self._dirty.set()  # admit the peers seen meanwhile

    async def _renew(self) -> None:
        """Renew this node's certificate online (the keeper calls this two thirds into its life)."""
        from ..identity.node import load_identity
        from ..identity.online import renew

        files = IdentityFiles(self.config.identity_dir)
        current = load_identity(files.dir)
        if current is None:
            raise EdgedError(f"no certificate in {files.dir} to renew")
        mqtt = self.config.mqtt
        await renew(current, files, mqtt, mqtt.topic_prefix, timeout=30.0)

    def _identity_state(self) -> dict:
        if self.identity.tls is False:
            return {"state": "insecure", "detail": "[ingress] insecure = true: peers are not authenticated"}
        if self.keeper is None:
            return {"state": "missing", "detail": self.tls_problem}
        state = self.keeper.state()
        if not self._tls_ready:
            state["detail"] = state.get("detail") or self.tls_problem
        return state

    # -- status ---------------------------------------------------------------------------------------
    def peers(self) -> list[dict]:
        """For `edged status` / `GET /v1/status`: live peers, and instances that went silent."""
        out: list[dict] = []
        for peer in self._peers:
            v = peer.record.vitals
            out.append(
                {
                    "node": peer.node,
                    "fleet": peer.record.fleet,
                    "zone": peer.record.zone,
                    "location": peer.record.location,
                    "address": peer.address,
                    "port": peer.port,
                    "services": [f"{t}/{n}" for t, n in peer.services],
                    "cpu": v.cpu,
                    "bat": v.bat,
                    "power": v.power,
                    "link": v.link,
                    "state": "up",
                    "source": "mdns",
                }
            )
        if self.admission is not None:  # advertised, but their handshake did not prove it: no calls
            out += [{**item, "state": "refused", "source": "mdns"} for item in self.admission.refused()]
        if self.mdns is not None:  # nodes that went silent (they come back when heard from again)
            out += [
                {**item, "state": "lost", "source": "mdns"}
                for item in self.mdns.describe()
                if item["type"] == HUBMESH_TYPE and not item["alive"] and self._of_this_fleet(item["instance"])
            ]
        return out

    def _of_this_fleet(self, instance: str) -> bool:
        """Whether a node's instance said it was of this fleet when last resolved: another fleet's node that went
        silent is no lost peer (it never was one; its live records are ignored too)."""
        last = self.mdns.last_resolved(instance) if self.mdns is not None else None
        record = parse_node_txt(last.props) if last is not None else None
        return record is not None and record.fleet == self.config.node.fleet

    # -- vitals ---------------------------------------------------------------------------------------
    def _on_vitals(self, vitals: Vitals) -> None:
        """Each reading of the core's sampler: peers hear of a meaningful change, at most every txt_min_interval."""
        if not self._started or self._stopped:
            return
        advertised = self._advertised
        if advertised is not None and not vitals.differs_from(advertised):
            return
        now = time.monotonic()
        if now - self._advertised_at < self.config.mdns.txt_min_interval:
            return  # a later reading sends it (no multicast storm from a flapping value)
        self._advertised, self._advertised_at = vitals, now
        self._advertise_wake.set()

    # -- advertising ----------------------------------------------------------------------------------
    async def _advertise_loop(self) -> None:
        mdns = self.mdns
        assert mdns is not None
        while True:
            await self._advertise_wake.wait()
            self._advertise_wake.clear()
            try:
                await mdns.advertise(self._wanted_records())
            except Exception:  # keep advertising after a bug in one round; the daemon must not fall over
                log.exception("advertising failed")

    def _addresses(self) -> list[str]:
        host = self.config.ingress.listen_host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and not ip.is_unspecified:
            return [host]
        from .mdns import local_addresses

        return local_addresses(self.config.mdns.interfaces)

    def _wanted_records(self) -> dict:
        """What this node advertises: itself under `_hubmesh._tcp`, and each service with `advertise = ...`."""
        from .mdns import service_info

        assert self.ingress is not None and self.ingress.address is not None
        node, fleet = self.config.node.name, self.config.node.fleet
        port = self.ingress.address[1]
        addresses = self._addresses()
        server = host_name(node)
        txt = node_txt(
            node=node,
            fleet=fleet,
            zone=self.config.node.zone,
            location=self.config.node.location,
            vitals=self._advertised or self.vitals,
            services=self.ingress.offered_refs(),
            addresses=addresses,
            labels=self.ingress.offered_labels(),
        )
        label = instance_label(node)
        wanted = {
            f"{label}.{HUBMESH_TYPE}": service_info(
                HUBMESH_TYPE, label, port=port, addresses=addresses, txt=txt, server=server
            )
        }
        for svc in offered(self._registry.snapshot()):
            if svc.spec.advertise is None:
                continue
            service_type = full_type(svc.spec.advertise)
            label = instance_label(node, svc.tenant)
            if f"{label}.{service_type}" in wanted:  # two services of one tenant under one type: name them apart
                label = f"{label}-{svc.name}"[:63]
            props = {"v": PROTOCOL_VERSION, "path": service_path(svc.tenant, svc.name), "node": node, "fleet": fleet}
            wanted[f"{label}.{service_type}"] = service_info(
                service_type, label, port=port, addresses=addresses, txt=props, server=server
            )
        return wanted

    # -- discovery -> registry --------------------------------------------------------------------------
    def _on_mdns_change(self, reason: str) -> None:
        self._dirty.set()

    def _confirm_goodbye(self, instance) -> Awaitable[bool] | None:
        """An mDNS goodbye for an admitted peer is checked with the peer itself (edge.admission: `gone`);
        None (believe it) for anything else: a plain DNS-SD service or an insecure fleet has no other proof."""
        admission = self.admission
        if admission is None or instance.type != HUBMESH_TYPE:
            return None
        peer = next((p for p in self._peers if p.instance == instance.name), None)
        if peer is None or not admission.proved(peer.node, peer.address, peer.port):
            return None
        return admission.gone(peer.node, peer.address, peer.port)

    def _on_registry_change(self, old: Snapshot, new: Snapshot) -> None:
        # Observe only (the registry refuses writes from its watchers): the loops pick the change up.
        if not self._started or self._stopped or _cloud_only_change(old, new):
            return
        self._dirty.set()
        self._advertise_wake.set()

    async def _sync_loop(self) -> None:
        """Rebuild the "mdns" part of the registry on every discovery or registry change, and every resolve
        interval (link estimates move with calls and checks)."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.config.mdns.resolve_interval)
            self._dirty.clear()
            try:
                await self.sync()
            except Exception:  # a bad peer record must not end discovery
                log.exception("edge sync failed")

    async def sync(self) -> None:
        """Browse the types manifests name, map live peers and instances to endpoints, hand them to the registry."""
        mdns = self.mdns
        if mdns is None:
            return
        snap = self._registry.snapshot()
        types = {
            full_type(decl.mdns)
            for svc in snap.services.values()
            for decl in svc.spec.endpoints
            if decl.tier == "edge" and decl.mdns is not None
        }
        await mdns.browse({HUBMESH_TYPE, *types})
        peers = await self._live_peers(mdns)
        links = self._measure_links(peers, snap)
        typed = tuple(i for i in mdns.instances() if i.type != HUBMESH_TYPE)
        before = {p.node for p in self._peers}
        self._found = Discovered(tuple(peers), typed, links)
        self._registry.refresh()  # the "mdns" layer reads what was just found
        self._metrics.mdns_peers.set((), len(peers))
        after = {p.node for p in peers}
        for gone in sorted(before - after):
            self._events.publish("peer_down", node=gone)
            log_event(log, logging.INFO, "edge.peer_down", node=gone, at=time.time())
        for came in sorted(after - before):
            self._events.publish("peer_up", node=came)
            log_event(log, logging.INFO, "edge.peer_up", node=came, at=time.time())

    async def _live_peers(self, mdns: Mdns) -> list[Peer]:
        node, fleet = self.config.node.name, self.config.node.fleet
        if self.identity.tls and (self.admission is None or not self._tls_ready):
            return []  # no identity: peers would refuse us, and we could not tell a rogue from a peer
        peers: dict[str, Peer] = {}
        known = {p.instance for p in self._peers}
        # Peers already tracked first: a flood of made-up nodes past `[limits] peers` cannot push them out.
        for instance in sorted(mdns.instances(HUBMESH_TYPE), key=lambda i: i.name not in known):
            record = parse_node_txt(instance.props)
            if record is None or record.node == node or record.fleet != fleet:
                continue
            if record.node in peers:
                log.warning(
                    "two instances claim node %r: %s, %s", record.node, peers[record.node].instance, instance.name
                )
                continue
            if len(peers) >= self.limits.peers:
                self._metrics.limit_hits.inc(("peers",))
                continue
            address = instance.addresses[0]
            peers[record.node] = Peer(record, address, instance.port, instance.name, record.services or ())
        if self.admission is not None:
            # Only those whose TLS handshake proved the node they advertise, in this fleet (edge.admission).
            candidates = [(p.node, p.address, p.port) for p in peers.values()]
            proved = await self.admission.gather(candidates)
            self.admission.forget(set(candidates))
            peers = {c[0]: peers[c[0]] for c, ok in zip(candidates, proved, strict=True) if ok}
        for name, peer in list(peers.items()):
            if peer.record.services is None:
                services = await self._fetch_services(name, peer.record.services_hash, peer.address, peer.port)
                labels = self._fetched[name][2] if name in self._fetched else ()  # fetched with the list
                peers[name] = Peer(peer.record, peer.address, peer.port, peer.instance, services, labels)
        self._fetched = {n: v for n, v in self._fetched.items() if n in peers}
        self._links.forget(peers)
        return [peers[n] for n in sorted(peers)]

    async def _fetch_services(self, node: str, digest: str, address: str, port: int) -> tuple[tuple[str, str], ...]:
        """A peer's service list from its ingress, when its TXT record had only room for a hash or its services
        carry labels (cached by hash, with the labels: `_fetched`)."""
        cached = self._fetched.get(node)
        if cached is not None and cached[0] == digest:
            return cached[1]
        target = parse_target(f"{'https' if self.identity.tls else 'http'}://{url_host(address)}:{port}")
        lim = self.limits
        try:
            # The whole fetch has one deadline, not each read: a trickling peer cannot hold it open.
            body = await asyncio.wait_for(self._read_services(target, lim.peer_services), lim.peer_services_timeout)
            doc = json.loads(body) if body is not None else None
        except asyncio.TimeoutError:
            self._metrics.limit_hits.inc(("peer_services_timeout",))
            log.warning("the service list of %s took over %.1f s", node, lim.peer_services_timeout)
            return cached[1] if cached is not None else ()
        except (EdgedError, ValueError) as exc:
            log.warning("cannot fetch the service list of %s: %s", node, exc)
            return cached[1] if cached is not None else ()
        if not isinstance(doc, dict) or not isinstance(doc.get("services"), list):
            log.warning("peer %s sent a bad service list", node)
            return ()
        services = parse_refs(doc["services"])
        self._fetched[node] = (digest, services, parse_labels_doc(doc.get("labels"), services))
        return services

    async def _read_services(self, target, limit: int) -> bytes | None:
        """The body of a peer's 200 answer to /peer/services (None: another status); LimitExceeded past `limit`."""
        pool = self.peer_pool if target.tls and self.peer_pool is not None else self._pool
        answer = await pool.request(target, "GET", SERVICES_PATH, self.identity.headers(), b"", 60.0)
        if answer.status != 200 or (answer.content_length or 0) > limit:
            answer.discard()
            if answer.status == 200:
                self._metrics.limit_hits.inc(("peer_services",))
                raise PeerListTooLarge(f"announced {answer.content_length} bytes, over {limit}")
            return None
        chunks, size = [], 0
        while chunk := await answer.read():
            size += len(chunk)
            if size > limit:
                answer.discard()
                self._metrics.limit_hits.inc(("peer_services",))
                raise PeerListTooLarge(f"over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _measure_links(self, peers: list[Peer], snap: Snapshot) -> dict[str, int | None]:
        """Per peer: link quality from the RTT and failures of calls and checks to its endpoints."""
        by_node: dict[str, list[Endpoint]] = {}
        for svc in snap.services.values():
            for ep in svc.endpoints:
                if ep.tier == "edge":
                    owner = dict(ep.meta).get("node")
                    if owner:
                        by_node.setdefault(owner, []).append(ep)
        links: dict[str, int | None] = {}
        for peer in peers:
            states = [self._health.state(ep.id) for ep in by_node.get(peer.node, ())]
            latencies = [s.latency_ewma for s in states if s.latency_ewma is not None]
            ok = sum(s.calls_ok + s.checks_ok for s in states)
            failed = sum(s.calls_failed + s.checks_failed for s in states)
            links[peer.node] = self._links.update(peer.node, min(latencies) if latencies else None, ok, failed)
        return links

    def _check_headers(self, endpoint: Endpoint) -> Sequence[tuple[str, str]]:
        """Health checks through a peer's ingress carry this node's fleet identity, like calls do."""
        if endpoint.tier != "edge" or not to_peer(endpoint):
            return ()
        return [(k.decode(), v.decode()) for k, v in self.identity.headers()]


def _cloud_only_change(old: Snapshot, new: Snapshot) -> bool:
    """An incremental change of services that are reachable over the cloud tier only (remote entries learned
    from the MQTT registry): nothing to browse, advertise or map to edge endpoints (each sync is a whole
    registry rebuild: a box following a fleet of thousands must not pay it per burst)."""
    if new.changed is None:
        return False
    for key in new.changed:
        for svc in (old.services.get(key), new.services.get(key)):
            if svc is not None and svc.spec.endpoint_types != ("cloud",):
                return False
    return True
