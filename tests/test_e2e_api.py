"""End to end: the call path, the local API, registration, reloads, bad input and lifecycle."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading

from conftest import REPO, wait_for
from harness import manifest
from helpers import loads_package

from edged.client import ApiClient


def one_endpoint(port: int, name: str = "thermo", extra: str = "") -> str:
    return f"""
    service_name = "{name}"
    [interface_definition]
    version = "1.0.0"
    methods = ["GET /readings", "POST /setpoint", "GET /status/{{code}}", "GET /sleep/*"]
    [[endpoints]]
    type = "local"
    url = "http://127.0.0.1:{port}"
    {extra}
    """


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def test_calls_reach_the_backend_by_path_host_and_unix_socket(backends, edged):
    b = backends("b1")
    d = edged({"thermo.toml": one_endpoint(b.port)})
    status, headers, body = d.call("thermo", "/readings?unit=c", headers=[("X-Request-Id", "req-42")])
    doc = json.loads(body)
    assert status == 200 and doc["name"] == "b1" and doc["path"] == "/readings?unit=c"
    assert doc["headers"]["x-request-id"] == "req-42"
    assert 0 < int(doc["headers"]["x-edged-timeout-ms"]) <= 15000
    assert dict(headers)["x-edged-endpoint"] == f"default/thermo/local/{b.url}"
    # The local tier alone pays for none of the other tiers' libraries (zeroconf: about 3.5 MiB of RSS), and
    # vitals are read without psutil (about 1 MiB).
    assert d.proc is not None
    assert not [p for p in ("zeroconf", "cryptography", "cbor2", "psutil") if loads_package(d.proc.pid, p)]
    # Host: thermo.mesh routes the whole target to the service.
    status, _, body = d.api.request("GET", "/readings", headers=[("Host", "thermo.mesh")])
    assert status == 200 and json.loads(body)["path"] == "/readings"
    # The Unix socket serves the same API.
    status, _, body = ApiClient(f"unix:{d.socket}").request("POST", "/svc/thermo/setpoint", b'{"c": 21}')
    assert status == 200 and json.loads(body)["body"] == '{"c": 21}'
    ready = next(json.loads(line) for line in d.log_text().splitlines() if '"edged ready"' in line)
    assert ready["services"] == 1 and ready["startup_ms"] > 0 and len(ready["listen"]) == 2


def test_errors_are_json_with_the_contract_codes(backends, edged):
    b = backends("b1")
    d = edged(
        {
            "thermo.toml": one_endpoint(b.port),
            "empty.toml": 'service_name = "empty"\nendpoint_types = ["local"]\n',
        }
    )
    cases = [
        ("/svc/nope/x", 404, "unknown_service"),
        ("/svc/thermo/not-declared", 404, "unknown_method"),
        ("/svc/empty/x", 503, "no_endpoint"),
        ("/v1/nothing", 404, "not_found"),
    ]
    for path, code, error in cases:
        status, _, body = d.api.request("GET", path)
        assert (status, json.loads(body)["error"]) == (code, error), path
    b.kill()
    status, _, body = d.call("thermo", "/readings")
    doc = json.loads(body)
    assert status == 503 and doc["error"] == "no_endpoint"
    assert doc["detail"]["tries"][0]["error"] == "connect_failed"
    status, _, body = d.api.request("GET", "/v1/services", headers=[("Authorization", "Bearer wrong")])
    assert status == 401 and json.loads(body)["error"] == "unauthorized"
    metrics = d.api.request("GET", "/metrics")[2].decode()  # each refusal is counted by its status
    for code, count in (("404", 3), ("503", 2), ("401", 1)):
        assert f'edged_http_errors_total{{code="{code}"}} {count}' in metrics, code


def test_backend_5xx_fails_over_and_post_is_not_replayed(backends, edged):
    b1, b2 = backends("p1"), backends("p2")
    d = edged({"thermo.toml": manifest("thermo", [(b1.port, 1), (b2.port, 2)])})
    # GET /status/503: p1 answers 503, the router tries p2, which answers 503 too: the caller gets a 503 answer.
    status, headers, _ = d.call("thermo", "/status/503")
    assert status == 503 and dict(headers)["x-edged-tries"] == "2"
    # A POST that reached p1 and got a 503 is not sent again.
    status, headers, _ = d.call("thermo", "/status/503", method="POST", body=b"x")
    assert status == 503 and dict(headers)["x-edged-tries"] == "1"
    # A POST whose connection was refused never arrived: it moves on.
    b1.kill()
    status, headers, body = d.call("thermo", "/echo", method="POST", body=b"once")
    assert status == 200 and json.loads(body)["name"] == "p2" and dict(headers)["x-edged-tries"] == "2"


def test_resolve_explains_the_ranking_and_status_lists_endpoints(backends, edged):
    b1, b2 = backends("p1"), backends("p2")
    d = edged({"thermo.toml": manifest("thermo", [(b1.port, 2), (b2.port, 1)])})
    plan = d.get("/v1/resolve/thermo")
    assert [r["url"] for r in plan["ranked"]] == [b2.url, b1.url]
    assert plan["ranked"][0]["reason"].startswith("priority 1")
    out = subprocess.run(
        [sys.executable, "-m", "edged", "resolve", "thermo", "--api", f"http://127.0.0.1:{d.port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.index(b2.url) < out.index(b1.url)
    out = subprocess.run(
        [sys.executable, "-m", "edged", "status", "--api", f"unix:{d.socket}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "test-node" in out and b1.url in out and b2.url in out
    call = subprocess.run(
        [sys.executable, "-m", "edged", "call", "thermo", "/x", "-d", "hello", "--api", f"http://127.0.0.1:{d.port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(call)["body"] == "hello" and json.loads(call)["method"] == "POST"


def test_registration_ttl_and_restart(backends, edged):
    b = backends("b1")
    d = edged({"thermo.toml": 'service_name = "thermo"\nendpoint_types = ["local"]\n'})
    body = json.dumps({"service": "thermo", "endpoint": {"type": "local", "url": b.url}, "ttl": "1s"}).encode()
    status, _, data = d.admin.request("POST", "/v1/register", body)
    assert status == 201, data
    reg_id = json.loads(data)["id"]
    assert d.call("thermo", "/a")[0] == 200
    # Re-registering the same endpoint (an app restarting) keeps one registration.
    status, _, data = d.admin.request("POST", "/v1/register", body)
    assert status == 200 and json.loads(data)["id"] == reg_id
    # No heartbeat: the lease lapses and the endpoint leaves routing; a heartbeat brings it back.
    wait_for(lambda: d.call("thermo", "/a")[0] == 503, 5, what="lease lapsed")
    assert d.admin.request("PUT", f"/v1/register/{reg_id}/ttl")[0] == 200
    assert d.call("thermo", "/a")[0] == 200
    # A whole service registered by manifest document.
    manifest = {"service_name": "lamp", "endpoints": [{"type": "local", "url": b.url}]}
    doc = json.dumps({"manifest": manifest, "id": "lamp-1"}).encode()
    status, _, data = d.admin.request("POST", "/v1/register", doc)
    assert status == 201, data
    # Restart: both registrations survive.
    assert d.stop() == 0
    d.start()
    regs = {r["id"] for r in d.get("/v1/register")["registrations"]}
    assert regs == {reg_id, "lamp-1"}
    assert d.call("lamp", "/b")[0] == 200
    assert d.admin.request("PUT", f"/v1/register/{reg_id}/ttl")[0] == 200
    assert d.call("thermo", "/a")[0] == 200
    assert d.admin.request("DELETE", "/v1/register/lamp-1")[0] == 200
    assert d.call("lamp", "/b")[0] == 404


def test_bad_registrations_are_refused_clearly(edged):
    d = edged({"thermo.toml": 'service_name = "thermo"\nendpoint_types = ["local"]\n'})
    cases = [
        (b"{not json", 400, "invalid_registration"),
        (
            json.dumps({"service": "nope", "endpoint": {"type": "local", "url": "http://127.0.0.1:1"}}),
            404,
            "unknown_service",
        ),
        (
            json.dumps({"service": "thermo", "endpoint": {"type": "local", "url": "ftp://x"}}),
            400,
            "invalid_registration",
        ),
        (
            json.dumps({"service": "thermo", "endpoint": {"type": "edge", "url": "http://10.0.0.1:1"}}),
            400,
            "invalid_registration",
        ),
        (json.dumps({"manifest": {"service_name": "thermo", "endpoint_types": ["local"]}}), 409, "conflict"),
        (json.dumps({"manifest": {"service_name": "x", "priority": "high"}}), 400, "invalid_registration"),
    ]
    for body, code, error in cases:
        status, _, data = d.admin.request("POST", "/v1/register", body if isinstance(body, bytes) else body.encode())
        assert (status, json.loads(data)["error"]) == (code, error), (body, data)
    assert d.get("/v1/register")["registrations"] == []


def test_bad_manifests_keep_the_last_good_set_on_reload(backends, edged):
    b = backends("b1")
    d = edged({"thermo.toml": one_endpoint(b.port)})
    assert d.call("thermo", "/readings")[0] == 200
    d.write_manifest("thermo.toml", one_endpoint(b.port) + "\npriority = 'high'\n")
    d.write_manifest("broken.toml", "service_name = \n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "broken.toml" in d.log_text(), 5, what="reload logged")
    assert d.call("thermo", "/readings")[0] == 200  # the last good version of thermo.toml still serves
    log = d.log_text()
    assert "thermo.toml:" in log and "priority" in log
    # Fixing the file is picked up without a signal (the dirs are watched).
    d.write_manifest("thermo.toml", one_endpoint(b.port, extra="priority = 3"))
    wait_for(lambda: d.get("/v1/services/thermo")["endpoints"][0]["priority"] == 3, 5, what="fixed manifest")


def test_edged_check_names_file_line_and_key(tmp_path, edged):
    d = edged({"bad.toml": 'service_name = "thermo"\n[policy]\nretries = "two"\n'}, start=False)
    out = subprocess.run(
        [sys.executable, "-m", "edged", "check", "--config", str(d.config)], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "bad.toml:3" in out.stderr and "policy.retries" in out.stderr
    d.write_manifest("bad.toml", 'service_name = "thermo"\n')
    out = subprocess.run(
        [sys.executable, "-m", "edged", "check", "--config", str(d.config)], capture_output=True, text=True
    )
    assert out.returncode == 0 and "thermo" in out.stdout


def test_hostile_http_input_gets_clear_errors_and_the_daemon_keeps_serving(backends, edged):
    b = backends("b1")
    d = edged({"thermo.toml": one_endpoint(b.port)})
    reg = json.dumps({"manifest": {"service_name": "lamp", "endpoints": [{"type": "local", "url": b.url}]}}).encode()
    assert d.admin.request("POST", "/v1/register", reg)[0] == 201
    huge = b"GET /svc/thermo/readings HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
    assert raw(d.port, huge).startswith(b"HTTP/1.1 431")
    assert raw(d.port, b"\x16\x03\x01\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    big_body = b"POST /svc/thermo/setpoint HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n"
    assert raw(d.port, big_body).startswith(b"HTTP/1.1 413")
    assert d.call("thermo", "/readings")[0] == 200
    assert d.call("lamp", "/x")[0] == 200


def test_sigterm_drains_in_flight_calls_then_exits_0(backends, edged):
    b = backends("b1")
    d = edged({"thermo.toml": one_endpoint(b.port)})
    result = {}

    def slow_call():
        result["status"] = d.call("thermo", "/sleep/800")[0]

    t = threading.Thread(target=slow_call)
    t.start()
    wait_for(lambda: b.sleeps() == 1, 10, what="the call at the backend")  # in flight, then SIGTERM
    d.proc.send_signal(signal.SIGTERM)
    t.join(10)
    assert result.get("status") == 200
    assert d.proc.wait(10) == 0


def test_metrics_use_the_contract_names(backends, edged):
    b = backends("b1")
    d = edged({"thermo.toml": one_endpoint(b.port)})
    assert d.call("thermo", "/readings")[0] == 200
    status, _, body = d.api.request("GET", "/metrics")
    text = body.decode()
    assert status == 200
    assert 'edged_calls_total{service="thermo",tier="local",outcome="success"} 1' in text
    assert "edged_call_seconds_bucket" in text
    assert f'edged_endpoint_up{{service="thermo",endpoint="default/thermo/local/{b.url}",tier="local"}} 1' in text
    assert 'edged_policy_evaluations_total{policy="priority"}' in text


def test_demo_echo_service_answers_through_the_mesh(tmp_path):
    """The built-in sample service of the README quick start, called through the whole data plane."""
    from conftest import free_port

    port = free_port()
    cfg = tmp_path / "edged.toml"
    cfg.write_text(
        f'[api]\nlisten = "127.0.0.1:{port}"\nsocket = ""\n[demo]\necho = true\n'
        "[mdns]\nenabled = false\n[ingress]\nenabled = false\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "edged", "run", "--config", str(cfg)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        api = ApiClient(f"http://127.0.0.1:{port}")
        wait_for(lambda: _status(api, "/readyz") == 200, 10, what="ready")
        status, _, body = api.request("GET", "/svc/echo/hello")
        assert status == 200 and json.loads(body)["path"] == "/hello"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def _status(api: ApiClient, path: str) -> int:
    try:
        return api.request("GET", path)[0]
    except Exception:
        return 0
