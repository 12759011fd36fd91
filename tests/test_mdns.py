"""mDNS: TXT records, the peers -> endpoints mapping, and real zeroconf on 127.0.0.1 (advertise, browse, goodbye,
liveness of a responder that stops answering and comes back)."""

# ruff: noqa: F811  (the fixtures imported from fixtures_netns are test parameters)
from __future__ import annotations

import asyncio
import signal
import time

import pytest
from fixtures_netns import (
    free_port,
    plain_services,  # noqa: F401  (a fixture)
    unique_type,
)

from edged.edge.mdns import Instance, Mdns, MdnsError, interface_choice, order_addresses, service_info, stale_after
from edged.edge.peers import LinkEstimator, Peer, build, offered
from edged.edge.txt import (
    HUBMESH_TYPE,
    TXT_LIMIT,
    node_txt,
    parse_node_txt,
    parse_service_ref,
    service_path,
    txt_size,
)
from edged.model import EndpointSpec, ServiceSpec
from edged.registry import Registry
from edged.vitals import Vitals

# -- TXT ----------------------------------------------------------------------------------------------


def test_node_txt_round_trips_and_stays_under_400_bytes():
    vitals = Vitals(cpu=12, bat=None, power="", link=80)
    props = node_txt(
        node="pi-b",
        fleet="home",
        zone="kitchen",
        vitals=vitals,
        services=["thermo", "garden/pump"],
        addresses=["1.2.3.4"],
    )
    assert txt_size(props) < TXT_LIMIT
    assert set(props) == {"v", "fleet", "node", "zone", "cpu", "bat", "pwr", "link", "ih", "svcs"}
    record = parse_node_txt(props)
    assert record is not None
    assert (record.node, record.fleet, record.zone, record.vitals) == ("pi-b", "home", "kitchen", vitals)
    assert record.services == (("default", "thermo"), ("garden", "pump"))


def test_a_long_service_list_becomes_a_hash_that_peers_fetch():
    many = [f"service-number-{i:03d}" for i in range(40)]
    props = node_txt(node="pi-b", fleet="home", zone="", vitals=Vitals(), services=many, addresses=[])
    assert txt_size(props) < TXT_LIMIT
    assert props["svcs"].startswith("#")
    record = parse_node_txt(props)
    assert record is not None and record.services is None and record.services_hash == props["svcs"][1:]


def test_a_peers_garbled_txt_is_refused_or_trimmed():
    assert parse_node_txt({"fleet": "home"}) is None  # no node name: not a HubMesh node we can use
    record = parse_node_txt({"node": "x", "fleet": "home", "svcs": "ok,BAD NAME,,a/b/c,t/fine", "cpu": "???"})
    assert record is not None
    assert record.services == (("default", "ok"), ("t", "fine"))
    assert record.vitals == Vitals()
    assert parse_service_ref("garden/pump") == ("garden", "pump")
    assert service_path("garden", "pump") == "/t/garden/svc/pump" and service_path("default", "x") == "/svc/x"


# -- mapping ------------------------------------------------------------------------------------------


def peer(node: str, fleet: str = "home", services=(("default", "thermo"),), vitals: Vitals | None = None) -> Peer:
    props = node_txt(
        node=node,
        fleet=fleet,
        zone="",
        vitals=vitals or Vitals(),
        services=[n if t == "default" else f"{t}/{n}" for t, n in services],
        addresses=[],
    )
    record = parse_node_txt(props)
    assert record is not None
    return Peer(record, "10.0.0.2", 7701, f"{node}.{HUBMESH_TYPE}", tuple(services))


def snapshot(*specs: ServiceSpec):
    registry = Registry()
    registry.set_manifests(specs)
    return registry.snapshot()


def merged(*specs: ServiceSpec):
    """The merged services a registry with these manifests hands its layers."""
    return {key: svc.spec for key, svc in snapshot(*specs).services.items()}


def test_a_peers_service_becomes_an_edge_endpoint_and_is_declared_when_unknown_here():
    eps, specs = build(
        [peer("pi-b", vitals=Vitals(cpu=10, bat=50, power="battery")), peer("me"), peer("pi-x", fleet="other")],
        [],
        merged(),
        node="me",
        fleet="home",
    )
    assert [(e.id, e.url, e.tier, e.source) for e in eps] == [
        ("default/thermo/edge/mdns:pi-b", "http://10.0.0.2:7701/svc/thermo", "edge", "mdns")
    ]
    assert dict(eps[0].meta) == {"node": "pi-b", "cpu": "10", "bat": "50", "power": "battery", "link": ""}
    assert [(s.name, s.endpoint_types, s.source) for s in specs] == [("thermo", ("edge",), "mdns:pi-b")]


def test_declared_priority_is_kept_and_a_measured_link_stands_in_for_an_unknown_one():
    spec = ServiceSpec(name="thermo", priority=3, endpoint_types=("local", "edge"))
    eps, _ = build([peer("pi-b")], [], merged(spec), node="me", fleet="home", links={"pi-b": 70})
    assert eps[0].priority == 3 and dict(eps[0].meta)["link"] == "70"
    eps, _ = build(
        [peer("pi-b", vitals=Vitals(link=20))], [], merged(spec), node="me", fleet="home", links={"pi-b": 70}
    )
    assert dict(eps[0].meta)["link"] == "20"  # the peer's own Wi-Fi reading wins


def test_a_manifests_mdns_type_takes_every_instance_of_it_from_any_responder():
    spec = ServiceSpec(
        name="thermo",
        endpoint_types=("edge",),
        endpoints=(EndpointSpec(tier="edge", mdns="_thermo._tcp", priority=2, weight=50),),
    )

    def instance(name: str, txt: dict[str, str], address: str = "10.0.0.9") -> Instance:
        return Instance(
            "_thermo._tcp.local.", f"{name}._thermo._tcp.local.", (address,), 8080, tuple(sorted(txt.items()))
        )

    typed = [
        instance("plain", {"path": "/api/"}),  # Avahi or a bare responder: no HubMesh keys
        instance("pi-b", {"path": "/svc/thermo", "node": "pi-b", "fleet": "home"}, "10.0.0.2"),
        instance("mine", {"path": "/svc/thermo", "node": "me", "fleet": "home"}),  # our own advertisement
        instance("theirs", {"path": "/svc/thermo", "node": "pi-z", "fleet": "other"}),  # another fleet's ingress
        instance("odd", {"path": "no slash"}, "fe80::1%2"),
    ]
    pb = Peer(peer("pi-b").record, "10.0.0.2", 8080, "pi-b", (("default", "thermo"),))
    eps, specs = build([pb], typed, merged(spec), node="me", fleet="home")
    urls = {e.id.rpartition(":")[2]: (e.url, e.priority, e.weight) for e in eps}
    assert urls == {
        "plain._thermo._tcp": ("http://10.0.0.9:8080/api", 2, 50),
        "pi-b._thermo._tcp": ("http://10.0.0.2:8080/svc/thermo", 2, 50),
        "odd._thermo._tcp": ("http://[fe80::1%2]:8080", 2, 50),
    }  # pi-b's own ingress route is not added twice through its _hubmesh record
    assert specs == [ServiceSpec(name="thermo", endpoint_types=("edge",), source="mdns:pi-b")]


def test_offered_services_need_a_local_endpoint_and_an_edge_audience():
    local = EndpointSpec(tier="local", url="http://127.0.0.1:1")
    snap = snapshot(
        ServiceSpec(name="shared", endpoint_types=("local", "edge"), endpoints=(local,)),
        ServiceSpec(name="private", endpoint_types=("local",), endpoints=(local,)),
        ServiceSpec(name="advertised", endpoint_types=("local",), endpoints=(local,), advertise="_adv._tcp"),
        ServiceSpec(name="remote-only", endpoint_types=("edge",)),
    )
    assert sorted(s.name for s in offered(snap)) == ["advertised", "shared"]


def test_link_estimate_from_rtt_and_loss():
    est = LinkEstimator()
    assert est.update("b", None, 0, 0) is None
    assert est.update("b", 0.001, 10, 0) == 100  # 1 ms round trips, nothing lost
    assert est.update("b", 0.050, 20, 0) == 50  # 50 ms halves it
    assert est.update("b", 0.001, 20, 10) == 70  # 10 of 10 tries failed: loss EWMA 0.3
    assert est.update("b", 0.001, 0, 0) == 70  # counters restarted (endpoint re-added): no bogus negatives


def test_addresses_ipv4_first_and_link_local_ipv6_only_with_its_scope():
    got = order_addresses(["fe80::1", "2001:db8::5", "fe80::2%3", "10.0.0.2", "0.0.0.0", "224.0.0.251", "junk"])
    assert got == ("10.0.0.2", "2001:db8::5", "fe80::2%3")


def test_interface_choice():
    assert interface_choice(("127.0.0.1",))[0] == ["127.0.0.1"]
    assert interface_choice(("lo",))[0][0] == "127.0.0.1"  # an interface name: its addresses
    with pytest.raises(MdnsError, match="no interface"):
        interface_choice(("no-such-if0",))


# -- real zeroconf on 127.0.0.1 -------------------------------------------------------------------------


class Seen:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.event = asyncio.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.event.set()


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def answered_rounds(mdns: Mdns, n: int, interval: float = 0.2, timeout: float = 20.0) -> None:
    """Wait until the (one) instance has been heard in `n` more rounds of `interval`: they ran, and were
    answered. (The records of one answer are heard within a moment: times closer than half a round are one.)"""

    def last_heard() -> float:
        (known,) = mdns._known.values()
        return known.last_heard

    rounds, latest = 0, last_heard()
    deadline = time.monotonic() + timeout
    while rounds < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {n} answered rounds ({rounds} seen)")
        await asyncio.sleep(0.02)
        heard = last_heard()
        if heard - latest > interval / 2:
            rounds, latest = rounds + 1, heard


def test_advertise_browse_update_and_goodbye_between_two_responders():
    stype = unique_type() + ".local."

    async def main() -> None:
        seen_a, seen_b = Seen(), Seen()
        a = Mdns(interfaces=("127.0.0.1",), resolve_interval=0.3, on_change=seen_a)
        b = Mdns(interfaces=("127.0.0.1",), resolve_interval=0.3, on_change=seen_b)
        await a.start()
        await b.start()
        try:
            await a.browse([stype])
            await b.browse([stype])

            def record(txt: dict[str, str]):
                return {
                    f"pi-a.{stype}": service_info(
                        stype, "pi-a", port=7701, addresses=["127.0.0.1"], txt=txt, server="hubmesh-pi-a.local."
                    )
                }

            await a.advertise(record({"cpu": "10"}))
            await until(lambda: b.instances(stype), 5, "b sees a's instance")
            (inst,) = b.instances(stype)
            assert (inst.addresses, inst.port, inst.props) == (("127.0.0.1",), 7701, {"cpu": "10"})
            assert a.instances() == []  # its own record is never reported
            # A TXT update reaches the browser (zeroconf reports it as Updated; we resolve again).
            await a.advertise(record({"cpu": "90"}))
            await until(lambda: b.instances(stype)[0].props == {"cpu": "90"}, 5, "updated TXT")
            # Goodbye: removed for the goodbye itself, not after a TTL or a silence (what the reason says, not
            # a clock: a loaded box may take more than a second either way).
            await a.goodbye()
            await until(lambda: not b.instances(stype), 10, "removal after goodbye")
            assert "goodbye" in seen_b.reasons and "silent" not in seen_b.reasons, seen_b.reasons
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_responder_that_stops_answering_is_dropped_and_comes_back_when_it_answers_again(plain_services):
    stype = unique_type()
    service = plain_services(stype, "frozen", free_port(), txt={"path": "/x"})

    async def main() -> None:
        seen = Seen()
        mdns = Mdns(interfaces=("127.0.0.1",), resolve_interval=0.2, on_change=seen)
        await mdns.start()
        try:
            await mdns.browse([stype + ".local."])
            await until(lambda: mdns.instances(), 5, "instance resolved")
            # SIGSTOP: the responder neither answers nor says goodbye (a kill or a partition looks the same).
            service.signal(signal.SIGSTOP)
            t0 = time.monotonic()
            await until(lambda: not mdns.instances(), stale_after(0.2) + 3, "silent instance dropped")
            assert time.monotonic() - t0 >= stale_after(0.2) - 0.5 and "silent" in seen.reasons
            assert mdns.describe()[0]["alive"] is False
            service.signal(signal.SIGCONT)  # it answers the next question: back without any browser event
            await until(lambda: mdns.instances(), 5, "instance back")
        finally:
            await mdns.close()

    asyncio.run(main())


def test_a_daemon_that_fell_behind_does_not_drop_a_peer_that_answers(plain_services):
    # A slow or starved CPU: the daemon's liveness rounds do not run for longer than `stale_after` (here its
    # clock jumps ahead, as it does for a loop that stood still). The peer left no question unanswered, so it
    # stays: silence measured in wall time alone is not a lost peer.
    stype = unique_type()
    plain_services(stype, "alive", free_port(), txt={"path": "/x"})
    ahead = [0.0]
    # Rounds of 0.5 s: the responder, which answered a moment before in real time, may hold its next answer
    # back for a second (RFC 6762 s. 6) while the jumped clock counts every question as one it must answer; at
    # 0.2 s three questions went unanswered within 1.4 s, too close to that second on a loaded box.
    interval = 0.5

    async def main() -> None:
        seen = Seen()
        mdns = Mdns(
            interfaces=("127.0.0.1",),
            resolve_interval=interval,
            on_change=seen,
            clock=lambda: time.monotonic() + ahead[0],
        )
        await mdns.start()
        try:
            await mdns.browse([stype + ".local."])
            await until(lambda: mdns.instances(), 5, "instance resolved")
            await answered_rounds(mdns, 1, interval)  # liveness rounds, answered
            ahead[0] = 10 * stale_after(interval)
            # Rounds run again and are answered: waited for, not slept for (answers come a second apart at
            # most once: the second is to a question asked after the jump).
            await answered_rounds(mdns, 2, interval)
            assert mdns.instances() and "silent" not in seen.reasons, seen.reasons
        finally:
            await mdns.close()

    asyncio.run(main())


def test_mdns_on_an_interface_that_does_not_exist_is_an_error_not_a_crash():
    async def main() -> None:
        mdns = Mdns(interfaces=("no-such-if0",), resolve_interval=1.0, on_change=lambda reason: None)
        with pytest.raises(MdnsError):
            await mdns.start()
        await mdns.close()

    asyncio.run(main())


def test_ingress_paths_name_the_tenant_and_the_service():
    from edged.edge.ingress import _split

    assert _split("/svc/thermo/readings") == ("default", "thermo", "/readings")
    assert _split("/t/garden/svc/pump/on") == ("garden", "pump", "/on")
    assert _split("/svc/thermo") == ("default", "thermo", "/")
    assert _split("/v1/status")[1] is None and _split("/t//svc/x")[1] is None and _split("/svc/")[1] is None


def test_the_zeroconf_names_edged_relies_on_are_there_and_do_what_edged_expects():
    """edged talks to zeroconf through its public API (`zeroconf.__all__`, `zeroconf.asyncio`), except for the
    liveness probe, built with DNSOutgoing/DNSQuestion (exported, not listed as public). pyproject.toml pins
    the tested zeroconf; an upgrade that changes any of this fails here, naming what broke."""
    import zeroconf
    import zeroconf.asyncio

    from edged.edge.mdns import srv_query

    public = {"InterfaceChoice", "IPVersion", "RecordUpdate", "RecordUpdateListener", "ServiceStateChange"}
    public |= {"Zeroconf", "Error"}
    assert public <= set(zeroconf.__all__), public - set(zeroconf.__all__)
    assert {"AsyncServiceBrowser", "AsyncServiceInfo", "AsyncZeroconf"} <= set(zeroconf.asyncio.__all__)
    for method in ("async_add_listener", "async_remove_listener", "async_send"):
        assert callable(getattr(zeroconf.Zeroconf, method, None)), f"zeroconf.Zeroconf.{method} is gone"
    (packet,) = srv_query(["pi-b._hubmesh._tcp.local.", "x._thermo._tcp.local."]).packets()
    parsed = zeroconf.DNSIncoming(packet)
    assert parsed.is_query() and [(q.name, q.type, q.class_) for q in parsed.questions] == [
        ("pi-b._hubmesh._tcp.local.", 33, 1),  # SRV, IN: asked afresh, not answered from the cache
        ("x._thermo._tcp.local.", 33, 1),
    ]
