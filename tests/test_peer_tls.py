"""Mutual TLS to peers, below the daemon: the pool's TLS connections and their checks, peer admission rules."""

from __future__ import annotations

import asyncio
import json

import pytest
from fixtures_identity import FleetCA

from edged.edge.admission import Admission, PeerTls
from edged.errors import ConnectFailed, IdentityError
from edged.http.client import UpstreamPool
from edged.http.server import HttpServer
from edged.identity.tls import server_context
from edged.model import parse_target


async def serve(files, handler=None):
    async def answer(req, resp):
        resp.send_json(200, {"peer": req.peer_cert is not None})

    server = HttpServer(handler or answer)
    _, port = await server.listen_tcp("127.0.0.1", 0, server_context(files))
    return server, port


def test_a_burst_over_tls_opens_few_connections_and_a_wrong_name_none(tmp_path):
    ca = FleetCA("home")
    me, peer = ca.enroll(tmp_path / "me", "me"), ca.enroll(tmp_path / "peer", "pi-2")

    async def main():
        server, port = await serve(peer)
        tls = PeerTls(me, "home")
        pool = UpstreamPool(tls=tls.upstream())
        target = parse_target(f"https://127.0.0.1:{port}")
        try:
            tls.claim("127.0.0.1", port, "pi-9")  # advertised as pi-9, but the certificate says pi-2
            with pytest.raises(ConnectFailed, match="names node 'pi-2', not the advertised 'pi-9'"):
                await pool.request(target, "GET", "/", [], b"", 5.0)
            assert target.key not in pool.stats()  # nothing was opened for it
            tls.forget(set())
            assert tls.claim("127.0.0.1", port, "pi-2") is None

            async def one():
                answer = await pool.request(target, "GET", "/", [], b"", 10.0)
                return answer.status, await answer.read()

            results = await asyncio.gather(*(one() for _ in range(30)))
            assert all(status == 200 and json.loads(body) == {"peer": True} for status, body in results)
            opened = pool.stats()[target.key]["opened"]
            assert opened < 30, opened  # handshakes in flight are capped: the burst reuses connections
            assert tls.proved[("127.0.0.1", port)] == "pi-2"
            # Once proved, the address is pi-2's: another name advertised there is refused without a handshake.
            assert "names node 'pi-2', not the advertised 'pi-3'" in tls.claim("127.0.0.1", port, "pi-3")
        finally:
            await pool.close()
            await server.shutdown(1.0)

    asyncio.run(main())


def test_admission_refuses_a_listener_without_a_fleet_certificate_and_backs_off(tmp_path):
    ca = FleetCA("home")
    me, peer = ca.enroll(tmp_path / "me", "me"), ca.enroll(tmp_path / "peer", "pi-2")
    stranger = FleetCA("home").enroll(tmp_path / "stranger", "pi-3")

    async def main():
        good, good_port = await serve(peer)
        rogue, rogue_port = await serve(stranger)
        tls = PeerTls(me, "home")
        pool = UpstreamPool(tls=tls.upstream())
        refused: list[str] = []
        admission = Admission(tls, pool, timeout=5.0, on_refused=refused.append)
        try:
            assert await admission.admit("pi-2", "127.0.0.1", good_port) is True
            assert await admission.admit("pi-3", "127.0.0.1", rogue_port) is False
            assert refused == ["pi-3"] and "tls" in admission.refused()[0]["reason"]
            assert await admission.admit("pi-3", "127.0.0.1", rogue_port) is False  # backing off: no new try
            assert refused == ["pi-3"]
            admission.forget({("pi-2", "127.0.0.1", good_port)})
            assert admission.refused() == [] and admission.admitted == {"pi-2": ("127.0.0.1", good_port)}
        finally:
            await pool.close()
            await good.shutdown(1.0)
            await rogue.shutdown(1.0)

    asyncio.run(main())


def test_a_certificate_of_another_fleet_is_refused_by_the_check(tmp_path):
    tls = PeerTls(FleetCA("home").enroll(tmp_path, "me"), "home")
    tls.claim("10.0.0.2", 7701, "pi-2")
    target = parse_target("https://10.0.0.2:7701")
    with pytest.raises(IdentityError, match="fleet 'office'"):
        tls.check(target, {"subjectAltName": (("URI", "spiffe://office/node/pi-2"),)})
    with pytest.raises(IdentityError, match="exactly one URI SAN"):
        tls.check(target, {"subjectAltName": (("URI", "spiffe://home/node/pi-2"), ("URI", "spiffe://home/node/x"))})
    with pytest.raises(IdentityError, match="no certificate"):
        tls.check(target, None)
