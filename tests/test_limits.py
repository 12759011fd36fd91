"""`[limits]`: each bound holds against the input that used to get past it, and normal requests keep working."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest
from test_http_server import start

from edged.access import APP_RIGHTS, Identity
from edged.config import ApiConfig, Config, IngressConfig, MdnsConfig, StateConfig
from edged.core import MeshCore
from edged.discovery.registrations import Registrations
from edged.edge import EdgeTier
from edged.edge.mdns import Instance
from edged.edge.peers import Discovered
from edged.edge.txt import HUBMESH_TYPE, node_txt
from edged.errors import CallError
from edged.events import EventBus
from edged.limits import Limits
from edged.methods import PathPattern
from edged.model import MethodRule
from edged.paths import normalize_path
from edged.registry import Registry
from edged.state import StateStore
from edged.telemetry import Metrics
from edged.vitals import Vitals


def hits() -> tuple[list[str], object]:
    seen: list[str] = []
    return seen, seen.append


async def get_ok(port: int) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    return data.startswith(b"HTTP/1.1 200")


def test_connections_over_the_limit_get_503_and_are_closed() -> None:
    async def main() -> None:
        seen, on_limit = hits()
        server, port = await start(max_connections=3, on_limit=on_limit)
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 503") and b"overloaded" in answer
        assert seen == ["connections"]
        for _, w in held:
            w.close()
        await asyncio.sleep(0.1)
        assert await get_ok(port)  # the slots came back
        await server.shutdown(1)

    asyncio.run(main())


def test_a_client_that_never_reads_its_answers_gets_no_more_of_them_buffered() -> None:
    async def main() -> None:
        seen, on_limit = hits()
        server, port = await start(max_output=64 * 1024, on_limit=on_limit)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 1000
        loop = asyncio.get_running_loop()
        sent = 0
        for _ in range(200):  # pipeline for a while, reading nothing
            try:
                sent += sock.send(request)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            await asyncio.sleep(0)
        for _ in range(100):  # the server answers 8 pipelined requests a turn: give it the turns it needs
            if "output" in seen:
                break
            await asyncio.sleep(0.05)
        (conn,) = list(server._conns)
        buffered = conn._transport.get_write_buffer_size()
        # Before: every answer was queued in the server (80 MB after 6 s); now it stops at the limit + one answer.
        assert buffered <= 64 * 1024 + 4096, buffered
        assert "output" in seen and conn._read_paused
        assert await get_ok(port)  # others are served meanwhile
        sock.close()
        await loop.run_in_executor(None, lambda: None)
        await server.shutdown(1)

    asyncio.run(main())


def test_a_body_trickling_in_is_cut_at_the_body_deadline() -> None:
    async def main() -> None:
        seen, on_limit = hits()
        server, port = await start(body_timeout=0.5, idle_timeout=0.3, on_limit=on_limit)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
        answer = b""
        for _ in range(20):  # a byte every 0.1 s: well within the idle timeout each time
            writer.write(b"a")
            await asyncio.sleep(0.1)
            with contextlib.suppress(asyncio.TimeoutError):
                answer += await asyncio.wait_for(reader.read(1000), 0.001)
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert seen == ["body_timeout"]
        assert await get_ok(port)
        await server.shutdown(1)

    asyncio.run(main())


def test_a_full_metric_refuses_new_series_counts_them_and_keeps_updating_the_old() -> None:
    m = Metrics(max_series=2)
    calls = m.counter("edged_calls_total", "calls", ("service",))
    calls.inc(("a",))
    calls.inc(("b",))
    calls.inc(("c",))  # refused
    calls.inc(("a",), 2)
    text = m.render()
    assert 'edged_calls_total{service="a"} 3' in text and 'service="c"' not in text
    assert 'edged_metric_series_refused_total{metric="edged_calls_total"} 1' in text


def test_registrations_per_owner_and_in_total(tmp_path) -> None:
    seen, on_limit = hits()

    async def main() -> None:
        regs = Registrations(
            Registry(), StateStore(str(tmp_path)), EventBus(), max_total=3, max_per_owner=2, on_limit=on_limit
        )
        a, b = (Identity(name, "default", APP_RIGHTS) for name in ("a", "b"))

        def manifest(name: str) -> dict:
            return {"manifest": {"service_name": name, "endpoints": [{"type": "local", "url": "http://127.0.0.1:9"}]}}

        for name in ("a1", "a2"):
            await regs.register(a, manifest(name))[2]
        with pytest.raises(CallError) as err:
            regs.register(a, manifest("a3"))
        assert err.value.status == 429
        await regs.register(b, manifest("b1"))[2]
        with pytest.raises(CallError):
            regs.register(b, manifest("b2"))
        await regs.register(a, manifest("a1"))[2]  # replacing one of its own is not a new one
        assert len(regs) == 3 and seen == ["registrations_per_owner", "registrations"]
        await regs.close()

    asyncio.run(main())


def test_a_registration_burst_costs_a_few_writes_not_one_each(tmp_path) -> None:
    async def main() -> None:
        regs = Registrations(Registry(), StateStore(str(tmp_path)), EventBus())
        app = Identity("app", "default", APP_RIGHTS)
        futures = [
            regs.register(
                app,
                {"manifest": {"service_name": f"s{i}", "endpoints": [{"type": "local", "url": "http://127.0.0.1:9"}]}},
            )[2]
            for i in range(200)
        ]
        await asyncio.gather(*futures)
        assert regs.writer.writes <= 2, regs.writer
        doc = json.loads((tmp_path / "registrations.json").read_text())
        assert len(doc["registrations"]) == 200
        await regs.close()

    asyncio.run(main())


def test_method_patterns_are_linear_and_bounded() -> None:
    # The 12-wildcard pattern that took 1.2 s on a 28-character path is refused when it is declared.
    with pytest.raises(ValueError, match=r"'\*' only at the end"):
        MethodRule.parse("GET /" + "*a" * 12)
    with pytest.raises(ValueError, match="longer than"):
        PathPattern.parse("/" + "a" * 300)
    twelve = PathPattern.parse("/" + "/".join(f"{{p{i}}}" for i in range(12)))
    assert twelve.matches("/" + "/".join("a" * 2 for _ in range(12)))
    assert not twelve.matches("/" + "a" * 28)
    cases = {
        "/readings": (["/readings", "/readings/"], ["/readings/x", "/reading"]),
        "/zones/{id}": (["/zones/1", "/zones/1/"], ["/zones/", "/zones/1/2"]),
        "/v{n}.json": (["/v2.json"], ["/v.json", "/v2.xml"]),
        "/sleep/*": (["/sleep/1", "/sleep/", "/sleep/a/b"], ["/sleep"]),
        "/*": (["/", "/a/b"], []),
        "/files/img*": (["/files/img1.png", "/files/img/a"], ["/files/x"]),
    }
    for pattern, (good, bad) in cases.items():
        p = PathPattern.parse(pattern)
        assert all(p.matches(x) for x in good), pattern
        assert not any(p.matches(x) for x in bad), pattern


def test_paths_are_resolved_inside_the_service() -> None:
    assert normalize_path("/static/a.css") == "/static/a.css"
    assert normalize_path("/static/../../admin") == "/admin"
    assert normalize_path("/a/./b/../c/") == "/a/c/"
    assert normalize_path("/a/%2e%2E/b") == "/b"
    assert normalize_path("/a/..") == "/"
    for bad in ("/a%2fb", "/a%2F..", "/a%00", "/a\\..\\b", "/a%5cb"):
        with pytest.raises(CallError) as err:
            normalize_path(bad)
        assert err.value.status == 400 and err.value.code == "bad_path"


def test_a_peer_service_list_is_read_with_a_size_and_a_time_limit(tmp_path) -> None:
    """A peer's /peer/services used to be read whole with no deadline (61 to 195 MB in 7 s)."""

    async def serve(reader, writer, body) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            await body(writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def endless(writer) -> None:
        while True:
            writer.write(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
            await writer.drain()

    async def trickle(writer) -> None:
        while True:
            writer.write(b"1\r\n \r\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    async def good(writer) -> None:
        doc = b'{"services": ["thermo", "garden/lamp"]}'
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(doc), doc))

    async def main() -> None:
        servers, ports = [], []
        for body in (endless, trickle, good):
            srv = await asyncio.start_server(lambda r, w, body=body: serve(r, w, body), "127.0.0.1", 0)
            servers.append(srv)
            ports.append(srv.sockets[0].getsockname()[1])
        limits = Limits(peer_services=64 * 1024, peer_services_timeout=0.5)
        config = Config(
            state=StateConfig(str(tmp_path)),
            api=ApiConfig(socket=None),
            mdns=MdnsConfig(enabled=False),
            ingress=IngressConfig(enabled=False, insecure=True),  # about limits, not identity
            limits=limits,
        )
        core = MeshCore(config, tiers=[EdgeTier])
        edge, metrics = core.tiers[0], core.metrics
        assert await edge._fetch_services("p1", "h1", "127.0.0.1", ports[0]) == ()
        assert metrics.value("edged_limit_hits_total", {"limit": "peer_services"}) == 1
        assert await edge._fetch_services("p2", "h2", "127.0.0.1", ports[1]) == ()
        assert metrics.value("edged_limit_hits_total", {"limit": "peer_services_timeout"}) == 1
        services = await edge._fetch_services("p3", "h3", "127.0.0.1", ports[2])
        assert services == (("default", "thermo"), ("garden", "lamp"))
        await core.pool.close()
        for srv in servers:
            srv.close()

    asyncio.run(main())


def test_many_pipelined_requests_in_one_read_are_not_taken_for_one_huge_head() -> None:
    """The raw-head bound counted a whole read when a head was open at its start: a read of many whole
    pipelined requests then answered 431 and cut the connection."""

    async def main() -> None:
        server, port = await start(max_header_bytes=4096)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /first HTTP/1.1\r\nHost: loc")  # a head left open...
        await writer.drain()
        await asyncio.sleep(0.05)
        many = b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n" * 2000  # ...then 60 KB of whole requests at once
        writer.write(b"alhost\r\n\r\n" + many + b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)
        assert data.count(b"HTTP/1.1 200") == 2002 and b"431" not in data
        writer.close()
        await server.shutdown(1)

    asyncio.run(main())


def test_peers_tracked_over_mdns_are_bounded(tmp_path) -> None:
    """Any box on the LAN can advertise made-up nodes; past `[limits] peers` they are not tracked."""

    class FakeMdns:
        def __init__(self, instances: list[Instance]) -> None:
            self._instances = instances

        def instances(self, type_: str | None = None) -> list[Instance]:
            return [i for i in self._instances if type_ is None or i.type == type_]

    def instance(node: str) -> Instance:
        txt = node_txt(node=node, fleet="home", zone="", vitals=Vitals(), services=["thermo"], addresses=[])
        name = f"{node}.{HUBMESH_TYPE}"
        return Instance(HUBMESH_TYPE, name, ("127.0.0.1",), 7701, tuple(txt.items()))

    async def main() -> None:
        config = Config(
            state=StateConfig(str(tmp_path)),
            api=ApiConfig(socket=None),
            mdns=MdnsConfig(enabled=False),
            ingress=IngressConfig(enabled=False, insecure=True),  # about limits, not identity
            limits=Limits(peers=3),
        )
        core = MeshCore(config, tiers=[EdgeTier])
        edge = core.tiers[0]
        edge._found = Discovered(tuple(await edge._live_peers(FakeMdns([instance(f"box{i}") for i in range(7, 10)]))))
        peers = await edge._live_peers(FakeMdns([instance(f"box{i}") for i in range(10)]))
        assert [p.node for p in peers] == ["box7", "box8", "box9"]  # the known ones keep their place
        assert core.metrics.value("edged_limit_hits_total", {"limit": "peers"}) == 7
        await core.pool.close()

    asyncio.run(main())
