"""End to end: the attacks of issue 12 against a running daemon, each refused (they all worked before).

Who may write, whose registration is whose, what a browser page can reach, and what a request path can name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from harness import manifest, wait_for

from edged.client import ApiClient, ApiError

ACCESS = """
[access.apps.thermo-app]
tokens = ["t-thermo"]
[access.apps.lamp-app]
tokens = ["t-lamp"]
[access.apps.ops]
tokens = ["t-ops"]
admin = true
"""
JSON = [("Content-Type", "application/json")]


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}"), *JSON]


def post(d, path: str, doc: object, headers) -> tuple[int, dict]:
    status, _, data = d.api.request("POST", path, json.dumps(doc).encode(), headers)
    return status, json.loads(data)


def test_anonymous_loopback_callers_read_and_call_but_cannot_write(backends, edged, tmp_path):
    b = backends("b1")
    d = edged({"thermo.toml": manifest("thermo", [(b.port, 1)])}, ACCESS)
    marker = tmp_path / "pwned"
    evil = {
        "service_name": "evil",
        "endpoints": [{"type": "local", "url": f"http://127.0.0.1:{b.port}"}],
        "health_check": {"command": f"touch {marker}", "interval": "1s", "timeout": "200ms"},
    }
    status, doc = post(d, "/v1/register", {"manifest": evil}, JSON)
    assert status == 403 and doc["error"] == "forbidden", doc
    assert d.api.request("PUT", "/v1/policies/thermo", b'{"retries": 0}', JSON)[0] == 403
    assert d.api.request("DELETE", "/v1/register/x")[0] == 403
    # Reading and calling still work without a token.
    assert d.get("/v1/services")["services"][0]["name"] == "thermo"
    assert d.call("thermo", "/x")[0] == 200
    assert not marker.exists()


def test_anonymous_rights_can_be_turned_down_to_nothing(backends, edged):
    b = backends("b1")
    d = edged({"thermo.toml": manifest("thermo", [(b.port, 1)])}, '[access]\nanonymous = "none"\n' + ACCESS)
    assert d.call("thermo", "/x")[0] == 401
    assert d.api.request("GET", "/v1/services")[0] == 401
    assert d.call("thermo", "/x", headers=[("Authorization", "Bearer t-lamp")])[0] == 200


def test_a_registration_cannot_carry_a_command_health_check(backends, edged, tmp_path):
    b = backends("b1")
    d = edged({}, ACCESS)
    marker = tmp_path / "pwned"
    evil = {
        "service_name": "evil",
        "endpoints": [{"type": "local", "url": f"http://127.0.0.1:{b.port}"}],
        "health_check": {"command": f"touch {marker}", "interval": "1s", "timeout": "200ms"},
    }
    status, doc = post(d, "/v1/register", {"manifest": evil}, bearer("t-ops"))  # not even an admin
    assert status == 400 and "command" in doc["detail"], doc
    assert d.get("/v1/register")["registrations"] == []
    # One saved by an older version (it used to run again at every start) stays inert, kept as it was.
    d.stop()
    record = {"id": "old", "kind": "service", "tenant": "default", "document": evil, "ttl": None, "created": 1.0}
    state = d.root / "state" / "registrations.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"version": 1, "registrations": [record]}))
    d.start()
    time.sleep(1.5)  # more than one check interval
    assert d.get("/v1/register")["registrations"] == []
    assert "evil" not in {s["name"] for s in d.get("/v1/services")["services"]}
    assert not marker.exists()


def test_a_second_app_cannot_remove_or_replace_the_first_ones_registration(backends, edged):
    b1, b2 = backends("b1"), backends("b2")
    d = edged({"thermo.toml": manifest("thermo", [(b1.port, 1)])}, ACCESS)
    reg = {"service": "thermo", "endpoint": {"type": "local", "url": b2.url}, "id": "thermo-2"}
    status, doc = post(d, "/v1/register", reg, bearer("t-thermo"))
    assert status == 201 and doc["owner"] == "thermo-app", doc
    # lamp-app: the same id, the same endpoint, a delete and a heartbeat: none touches thermo-app's registration.
    status, doc = post(d, "/v1/register", reg, bearer("t-lamp"))
    assert status == 409, doc
    status, doc = post(d, "/v1/register", {**reg, "id": None}, bearer("t-lamp"))
    assert status == 201 and doc["id"] != "thermo-2" and doc["owner"] == "lamp-app"
    assert d.api.request("DELETE", "/v1/register/thermo-2", headers=bearer("t-lamp"))[0] == 404
    assert d.api.request("PUT", "/v1/register/thermo-2/ttl", headers=bearer("t-lamp"))[0] == 404
    owners = {r["id"]: r["owner"] for r in d.get("/v1/register")["registrations"]}
    assert owners["thermo-2"] == "thermo-app"
    # The owner and an admin may remove it.
    assert d.api.request("DELETE", "/v1/register/thermo-2", headers=bearer("t-ops"))[0] == 200


CLIENT = """
import socket, sys
method, path, body, sock_path = sys.argv[1], sys.argv[2], sys.argv[3].encode(), sys.argv[4]
s = socket.socket(socket.AF_UNIX)
s.connect(sock_path)
head = f"{method} {path} HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Type: application/json\\r\\n"
s.sendall(head.encode() + b"Content-Length: %d\\r\\nConnection: close\\r\\n\\r\\n" % len(body) + body)
print(s.recv(100).split()[1].decode())
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="needs root and python3")
def test_unix_socket_callers_are_named_by_their_uid(backends, edged, tmp_path):
    b1, b2 = backends("b1"), backends("b2")
    run_dir = Path(tempfile.mkdtemp(prefix="edged-uid-"))  # other users must reach the socket
    os.chmod(run_dir, 0o755)
    d = edged(
        {"thermo.toml": manifest("thermo", [(b1.port, 1)])}, "[access.apps.thermo-app]\nuids = [65534]\n", start=False
    )
    text = d.config.read_text()
    sock = run_dir / "edged.sock"
    d.config.write_text(text.replace('socket = "run/edged.sock"', f'socket = "{sock}"\nsocket_group = "nogroup"'))
    try:
        d.start()
        body = json.dumps({"service": "thermo", "endpoint": {"type": "local", "url": b2.url}, "id": "mine"})

        def as_user(uid: int, method: str, path: str, data: str = "") -> int:
            argv = ["/usr/bin/python3", "-c", CLIENT, method, path, data, str(sock)]
            out = subprocess.run(argv, user=uid, group=65534, capture_output=True, text=True, cwd="/")
            assert out.returncode == 0, out.stderr
            return int(out.stdout)

        assert as_user(65534, "POST", "/v1/register", body) == 201  # uid 65534 is thermo-app
        assert as_user(65533, "POST", "/v1/register", body) == 403  # another local user: read and call only
        assert as_user(65533, "DELETE", "/v1/register/mine") == 403
        regs = ApiClient(f"unix:{sock}").get_json("/v1/register")["registrations"]
        assert [(r["id"], r["owner"]) for r in regs] == [("mine", "thermo-app")]
    finally:
        d.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_registration_cannot_outrank_the_declared_endpoints(backends, edged):
    b1, b2, b3 = backends("b1"), backends("b2"), backends("b3")
    d = edged(
        {
            "thermo.toml": manifest("thermo", [(b1.port, 1)]),
            "lamp.toml": manifest("lamp", [(b3.port, 5)], "[registration]\nmin_priority = 0\n"),
        },
        ACCESS,
    )
    reg = {"service": "thermo", "endpoint": {"type": "local", "url": b2.url, "priority": 0}}
    status, doc = post(d, "/v1/register", reg, bearer("t-thermo"))
    assert status == 201, doc
    eps = {e["url"]: e["priority"] for e in d.get("/v1/services/thermo")["endpoints"]}
    assert eps[b2.url] > eps[b1.url]
    for _ in range(5):
        assert json.loads(d.call("thermo", "/x")[2])["name"] == "b1"
    # A manifest may let registrations rank first.
    reg = {"service": "lamp", "endpoint": {"type": "local", "url": b2.url, "priority": 0}}
    assert post(d, "/v1/register", reg, bearer("t-thermo"))[0] == 201
    assert json.loads(d.call("lamp", "/x")[2])["name"] == "b2"


def test_browser_pages_cannot_reach_the_api(backends, edged):
    b = backends("b1")
    d = edged({"thermo.toml": manifest("thermo", [(b.port, 1)])}, ACCESS)
    # DNS rebinding: the page's own host name, resolved to 127.0.0.1.
    status, _, data = d.api.request("GET", "/v1/services", headers=[("Host", "evil.example")])
    assert status == 403 and json.loads(data)["error"] == "forbidden_host"
    assert d.call("thermo", "/x", headers=[("Host", f"evil.example:{d.port}")])[0] == 403
    for host in ("localhost", f"127.0.0.1:{d.port}", f"[::1]:{d.port}", "thermo.mesh"):
        assert d.api.request("GET", "/v1/services", headers=[("Host", host)])[0] == 200, host
    # Cross-site writes, even with a token a page could not know but a kiosk cookie jar might hold.
    reg = {"service": "thermo", "endpoint": {"type": "local", "url": "http://127.0.0.1:9"}}
    for extra in ([("Origin", "http://evil.example")], [("Sec-Fetch-Site", "cross-site")]):
        status, doc = post(d, "/v1/register", reg, bearer("t-thermo") + extra)
        assert status == 403 and doc["error"] == "cross_origin", doc
    # A "simple" cross-site POST (text/plain) is not JSON to the API.
    status, _, data = d.api.request(
        "POST",
        "/v1/register",
        json.dumps(reg).encode(),
        [("Authorization", "Bearer t-thermo"), ("Content-Type", "text/plain")],
    )
    assert status == 415, data
    assert d.get("/v1/register")["registrations"] == []


def test_paths_are_normalized_inside_the_service(backends, edged):
    b = backends("b1")
    text = f"""
    service_name = "thermo"
    interface_definition = {{ version = "1", methods = ["GET /static/*", "GET /readings"] }}
    [[endpoints]]
    type = "local"
    url = "http://127.0.0.1:{b.port}/api"
    """
    d = edged({"thermo.toml": text})
    status, _, data = d.call("thermo", "/static/a.css")
    assert status == 200 and json.loads(data)["path"] == "/api/static/a.css"
    # The traversal: it used to pass the allowlist and reach the backend as /api/static/../../admin.
    status, _, data = d.call("thermo", "/static/../../admin")
    assert status == 404 and json.loads(data)["error"] == "unknown_method", data
    status, _, data = d.call("thermo", "/static/%2e%2e/readings")
    assert status == 200 and json.loads(data)["path"] == "/api/readings"
    for bad in ("/static/..%2f..%2fadmin", "/static/a%00b", "/static/a%5c..%5cadmin"):
        status, _, data = d.call("thermo", bad)
        assert status == 400 and json.loads(data)["error"] == "bad_path", (bad, data)
    # The same through Host routing, and an absolute-form target.
    status, _, data = d.api.request("GET", "/static/../../admin", headers=[("Host", "thermo.mesh")])
    assert status == 404, data
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        s.sendall(b"GET http://evil.example/svc/thermo/readings HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 400")


def test_sigkill_during_a_registration_burst_loses_nothing_acknowledged(backends, edged):
    """Random kill times: the state file always parses and holds every registration answered 2xx."""
    b = backends("b1")
    d = edged({"thermo.toml": manifest("thermo", [(b.port, 1)])}, "[limits]\nregistrations_per_owner = 4096\n")
    rng = random.Random()
    state = d.root / "state" / "registrations.json"
    for round_ in range(4):
        acked: list[str] = []
        stop = threading.Event()

        def burst(worker: int, round_=round_, stop=stop, acked=acked) -> None:
            client = ApiClient(f"unix:{d.socket}", timeout=5)
            for i in range(1000):
                if stop.is_set():
                    return
                reg = {
                    "service": "thermo",
                    "id": f"r{round_}-{worker}-{i}",
                    "endpoint": {"type": "local", "url": f"http://127.0.0.1:{10000 + i}"},
                }
                try:
                    status, _, _ = client.request("POST", "/v1/register", json.dumps(reg).encode())
                except ApiError:
                    return
                if status in (200, 201):
                    acked.append(reg["id"])

        threads = [threading.Thread(target=burst, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        # The kill lands at a random time after the first acknowledgement: on a loaded machine the first answer
        # can take longer than the random delay, and a round with nothing acknowledged checks nothing.
        wait_for(lambda acked=acked: acked, timeout=30, what="a first acknowledged registration")
        time.sleep(rng.uniform(0.0, 0.5))
        d.kill()
        stop.set()
        for t in threads:
            t.join()
        ids = {r["id"] for r in json.loads(state.read_text())["registrations"]}
        assert acked and not set(acked) - ids, (round_, len(acked), len(set(acked) - ids))
        d.start()
