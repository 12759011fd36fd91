"""End to end, strategy `geo`: real daemons with real zeroconf on 127.0.0.1, each in a zone at a location.

The caller and two peers are in Munich, one peer 356 km away in Vienna: calls stay in the caller's zone; when
one Munich peer fails its health checks, 30 % spill to Vienna (Envoy's formula: 1/2 x 1.4 = 70 % stay); when
the other dies (SIGKILL, no goodbye) they all go to Vienna. Not one call fails.
"""

# ruff: noqa: F811  (the fixtures imported from fixtures_netns are test parameters)
from __future__ import annotations

from collections import Counter

from fixtures_netns import (
    edge_nodes,  # noqa: F401  (fixtures)
    thermo_manifest,
    unique_fleet,
    wait_for,
)

MUNICH = 'zone = "munich"\nlocation = [48.1374, 11.5755]'
VIENNA = 'zone = "vienna"\nlocation = [48.2082, 16.3738]'
CALLER = """
service_name = "thermo"
endpoint_types = ["edge"]
[health_check]
http = "/healthz"
interval = "300ms"
timeout = "200ms"
rise = 1
fall = 1
[policy]
strategy = "geo"
per_try_timeout = "200ms"
retries = 2
"""


def test_calls_stay_in_the_callers_zone_and_spill_to_the_next_zone_as_its_hosts_fail(edge_nodes, backends):
    fleet = unique_fleet()
    peers, served = {}, {}
    for name, where in (("munich-1", MUNICH), ("munich-2", MUNICH), ("vienna-1", VIENNA)):
        backend = served[name] = backends(name)
        peers[name] = edge_nodes(
            name, fleet=fleet, manifests={"thermo.toml": thermo_manifest(backend.port)}, node_extra=where, tls=False
        ).start()
    a = edge_nodes("caller", fleet=fleet, manifests={"thermo.toml": CALLER}, node_extra=MUNICH, tls=False).start()
    short = {node.name: name for name, node in peers.items()}  # (node names have a suffix of their own)

    def up() -> set[str]:
        edge = [ep for ep in a.endpoints("thermo") if ep["tier"] == "edge" and ep["up"]]
        return {short.get(ep["id"].rpartition(":")[2], ep["id"]) for ep in edge}

    wait_for(lambda: up() == set(peers), 15, what="three edge endpoints up")
    view = a.get("/v1/resolve/thermo")
    assert view["strategy"] == "geo" and view["note"] == ""
    places = {loc["locality"]: loc for loc in view["localities"]}
    assert places["munich"]["here"] and places["munich"]["share"] == 100.0 and places["munich"]["total"] == 2
    assert abs(places["vienna"]["distance_km"] - 356) < 2 and places["vienna"]["share"] == 0.0
    assert view["ranked"][0]["reason"].startswith("geo: munich, caller's zone")
    # The policy API takes the geo keys, and refuses bad ones naming the key.
    status, _, body = a.admin.request("PUT", "/v1/policies/thermo", b'{"zone_weights": {"vienna": -1}}')
    assert status == 400 and b"zone_weights.vienna" in body, body
    status, _, body = a.admin.request("PUT", "/v1/policies/thermo", b'{"geo_order": "distance"}')
    assert status == 200 and a.get("/v1/policies/thermo")["policy"]["geo_order"] == "distance", body

    def calls(n: int) -> Counter:
        got: Counter = Counter()
        for _ in range(n):
            status, headers, body = a.call("thermo", "/r")
            assert status == 200, body  # not one failed call, through both deaths
            got[short[dict(headers)["x-edged-endpoint"].rpartition(":")[2]]] += 1
        return got

    before = calls(200)
    assert before["munich-1"] + before["munich-2"] == 200, before  # (least loaded between them)

    served["munich-1"].set_healthy(False)  # half of Munich: 1/2 x 1.4 = 70 % stays, 30 % spills
    during = calls(40)  # (noticed within a check or two; a call that meets it meanwhile goes on to the next)
    wait_for(lambda: "munich-1" not in up(), 10, what="munich-1 seen unhealthy")
    spilled = calls(400)
    assert spilled["munich-1"] == 0, (during, spilled)
    assert 0.18 < spilled["vienna-1"] / 400 < 0.42, spilled  # 30 %: 120 of 400 (sd 9): 6 sd either way
    rows = {loc["locality"]: loc for loc in a.get("/v1/resolve/thermo")["localities"]}
    assert (rows["munich"]["healthy"], rows["munich"]["share"], rows["vienna"]["share"]) == (1, 70.0, 30.0)

    peers["munich-2"].kill()  # none left in Munich: everything goes to Vienna
    calls(60)
    wait_for(lambda: "munich-2" not in up(), 10, what="munich-2 seen down")
    assert calls(100) == {"vienna-1": 100}
