"""Property-based tests (hypothesis) of every parser that takes input from someone else: manifests and the
config, CBOR envelopes, mDNS TXT records and the HTTP request path of the real daemon.

Each property: no input crashes (only the module's own refusal is raised), no input gets an unexpected 5xx,
memory stays bounded. About 10,000 generated cases per run in well under a minute on 2 cores; EDGED_FUZZ=N
multiplies the counts (EDGED_FUZZ=10 for a longer hunt). The run prints the number of cases and the time.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import string
import tempfile
import time
import tracemalloc
from pathlib import Path

import cbor2
import psutil
import pytest
from conftest import Edged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged.cloud.envelope import EnvelopeError, decode_answer, decode_request
from edged.config import _Loader
from edged.document import Doc, Table
from edged.edge.txt import TXT_LIMIT, decode_txt, node_txt, parse_node_txt, txt_size
from edged.errors import ConfigError
from edged.locality import ZONE
from edged.manifest import load_manifest_dirs, parse_manifest_data
from edged.vitals import Vitals

SCALE = int(os.environ.get("EDGED_FUZZ", "1") or 1)
CASES = {"manifest": 2000, "manifest_text": 1500, "config": 1500, "cbor": 2000, "txt": 1500, "http": 1500}
counted: dict[str, int] = dict.fromkeys(CASES, 0)
_span = [0.0, 0.0]  # monotonic time of the first and the latest case


def count(kind: str) -> None:
    now = time.monotonic()
    if not _span[0]:
        _span[0] = now
    _span[1] = now
    counted[kind] += 1


def fuzz(kind: str):
    return settings(
        max_examples=CASES[kind] * SCALE,
        deadline=None,
        database=None,  # no .hypothesis folder in the checkout
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def summary() -> str | None:
    """The line tests/conftest.py prints at the end of the run: how many cases, in how long."""
    total = sum(counted.values())
    return f"fuzz: {total} generated cases in {_span[1] - _span[0]:.1f}s {counted}" if total else None


# -- values a user or an attacker might put in a document ---------------------------------------------------

# Shallow on purpose: generating deep structures costs hypothesis far more than checking them (the nesting
# attacks have their own cases below, as text).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=16)
    | st.sampled_from(["", "2s", "500ms", "-1s", "1e9h", "http://127.0.0.1:8080", "unix:/x", "local", "priority"])
)
values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=6), scalars, max_size=3)
MANIFEST_KEYS = [
    "service_name", "tenant", "priority", "interface_definition", "endpoint_types", "endpoints", "advertise",
    "health_check", "policy", "registration", "x",
]  # fmt: skip
ENDPOINT = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["local", "edge", "cloud", "moon"]) | values,
        "url": st.sampled_from(["http://127.0.0.1:1", "unix:/run/x.sock", "https://[::1]:0/p", "ftp://x"]) | values,
        "priority": st.integers(-5, 2**40) | values,
        "weight": st.integers(-5, 2**40) | values,
        "mdns": st.sampled_from(["_x._tcp", "_bad", ""]) | values,
    },
)
manifests = st.fixed_dictionaries(
    {"service_name": st.sampled_from(["thermo", "a-b", "UPPER", "", "x" * 80]) | values},
    optional={
        key: (st.lists(ENDPOINT, max_size=3) if key == "endpoints" else values)
        for key in MANIFEST_KEYS
        if key != "service_name"
    }
    | {
        "policy": st.dictionaries(
            st.sampled_from(["strategy", "retries", "per_try_timeout", "timeout", "retry_budget", "zz"]), values
        ),
        "health_check": st.dictionaries(
            st.sampled_from(["http", "tcp", "command", "ttl", "interval", "timeout", "rise", "fall"]), values
        ),
    },
)


@fuzz("manifest")
@given(manifests)
def test_any_manifest_document_is_a_spec_or_a_refusal(doc: dict) -> None:
    count("manifest")
    try:
        spec = parse_manifest_data(doc, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml")
    else:
        assert spec.name == doc["service_name"]


GOOD_MANIFEST = 'service_name = "thermo"\n[[endpoints]]\ntype = "local"\nurl = "http://127.0.0.1:8080"\n'


_TEXT_DIR = tempfile.mkdtemp(prefix="edged-fuzz-")


@fuzz("manifest_text")
@given(
    st.sampled_from(["toml", "json", "yaml"]),
    st.text(max_size=300) | st.builds(lambda i, s: GOOD_MANIFEST[:i] + s, st.integers(0, 90), st.text(max_size=40)),
    st.sampled_from([0, 0, 0, 40, 3000]),
)
def test_any_manifest_file_is_a_spec_or_a_refusal(kind: str, text: str, nesting: int) -> None:
    # Through the loader the daemon uses: a file that trips a decoder must come back as that file's refusal.
    count("manifest_text")
    for name in os.listdir(_TEXT_DIR):
        os.unlink(os.path.join(_TEXT_DIR, name))
    path = os.path.join(_TEXT_DIR, f"fuzz.{kind}")
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text + "[" * nesting)  # now and then deeper than a decoder's stack
    specs, errors = load_manifest_dirs([_TEXT_DIR])
    assert len(specs) + len(errors) == 1
    assert all(err.file == path for err in errors)


CONFIG_SECTIONS = {
    "node": ["name", "fleet", "zone", "location"],
    "api": ["listen", "socket", "max_body", "max_header", "idle_timeout", "drain_timeout"],
    "services": ["dirs", "reload_interval"],
    "mdns": ["enabled", "interfaces"],
    "mqtt": ["enabled", "url", "topic_prefix"],
    "limits": ["connections", "answer_buffer", "json_depth", "body_timeout", "peers"],
    "log": ["level", "format"],
    "tenants": ["x"],
    "access": ["anonymous", "hosts"],
}
configs = st.dictionaries(
    st.sampled_from([*CONFIG_SECTIONS, "nope"]),
    st.dictionaries(st.sampled_from(sorted({k for ks in CONFIG_SECTIONS.values() for k in ks})), values, max_size=4)
    | values,
    max_size=4,
)


@fuzz("config")
@given(configs)
def test_any_config_document_is_a_config_or_a_refusal(doc: dict) -> None:
    count("config")
    try:
        _Loader(Table(Doc("edged.toml", None), doc), "/tmp").build("/tmp/edged.toml")
    except ConfigError as exc:
        assert str(exc).startswith("edged.toml")


# -- CBOR envelopes from the broker ------------------------------------------------------------------------

envelope_fields = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, 0, "1"]),
        "id": st.binary(max_size=40) | values,
        "reply": st.sampled_from(["hubmesh/home/reply/n1", "a/+/b", "", "x#"]) | values,
        "method": st.sampled_from(["GET", "POST", "G ET", ""]) | values,
        "path": st.sampled_from(["/a", "a", "/\x00", "/../x"]) | values,
        "headers": st.lists(st.lists(st.text(max_size=10), max_size=3), max_size=3) | values,
        "body": st.binary(max_size=64) | values,
        "deadline": st.integers(-5, 2**70) | values,
        "tenant": values,
        "service": values,
        "status": st.integers(0, 1000) | values,
        "node": values,
        "rid": values,
    },
)
cbor_inputs = (
    st.binary(max_size=200)
    | envelope_fields.map(cbor2.dumps)
    | st.builds(lambda b, i, x: b[:i] + x, envelope_fields.map(cbor2.dumps), st.integers(0, 60), st.binary(max_size=9))
    | st.integers(1, 100_000).map(lambda n: b"\x81" * n)  # arrays nested past the stack
)


@fuzz("cbor")
@given(cbor_inputs)
def test_any_envelope_bytes_decode_or_are_refused_in_bounded_memory(data: bytes) -> None:
    count("cbor")
    tracemalloc.start()
    try:
        for decode in (decode_request, decode_answer):
            with contextlib.suppress(EnvelopeError):
                decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{len(data)} bytes of CBOR took {peak} bytes to refuse"


# -- mDNS TXT records from the LAN -----------------------------------------------------------------------------

labels = st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=63)


@fuzz("txt")
@given(
    st.dictionaries(st.binary(max_size=12) | st.sampled_from([b"node", b"fleet", b"svcs", b"cpu", b"bat", b"zone",
                                                              b"loc"]),
                    st.none() | st.binary(max_size=60), max_size=12),
    labels, labels, labels, st.lists(st.text(max_size=70), max_size=40),
)  # fmt: skip
def test_any_txt_record_parses_or_is_ignored_and_ours_fit(raw: dict, node: str, fleet: str, zone: str, refs) -> None:
    count("txt")
    record = parse_node_txt(decode_txt(raw))
    assert record is None or (record.node and record.fleet)
    if record is not None:  # zone and location as config allows them, or none (they rank `geo` calls)
        assert record.zone == "" or ZONE.fullmatch(record.zone)
        assert record.location is None or (-90 <= record.location[0] <= 90 and -180 <= record.location[1] <= 180)
    ours = node_txt(node=node, fleet=fleet, zone=zone, vitals=Vitals(), services=refs, addresses=["10.0.0.1"])
    assert txt_size(ours) <= TXT_LIMIT
    again = parse_node_txt(ours)
    assert again is not None and (again.node, again.fleet) == (node, fleet)


# -- the HTTP request path of the real daemon ---------------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "G\x00T", "GET /"]
PATHS = [
    "/svc/echo/", "/svc/", "/svc/nope/", "/v1/register", "/v1/register/x/ttl", "/v1/policies/echo",
    "/v1/policies/echo:dry-run", "/v1/services/", "/v1/resolve/echo", "/v1/status", "/metrics", "/readyz", "/v1/",
    "//", "/%2e%2e/", "http://x/", "*",
]  # fmt: skip
HEADERS = ["host", "content-type", "authorization", "x-edged-timeout-ms", "x-request-id", "origin", "x-any"]
header_values = st.sampled_from(["localhost", "echo.mesh", "application/json", "Bearer x", "-1", "99999999999"])
header_values = header_values | st.text(string.ascii_letters + string.digits + " -_./:;=,", max_size=30)
header_values = header_values | st.text(string.printable, max_size=30)
json_bodies = values.map(lambda v: json.dumps(v).encode())
ROUTES = [
    ("POST", "/v1/register"), ("PUT", "/v1/policies/echo"), ("POST", "/v1/policies/echo:dry-run"),
    ("DELETE", "/v1/register/x"), ("PUT", "/v1/register/x/ttl"), ("DELETE", "/v1/policies/echo"),
    ("GET", "/svc/echo/"), ("POST", "/svc/echo/"), ("GET", "/v1/services/"), ("GET", "/v1/resolve/echo"),
    ("GET", "/v1/status"), ("GET", "/metrics"),
]  # fmt: skip
requests = st.builds(
    lambda route, tail, hs, body: (*route[:1], route[1] + tail, hs, body),
    st.one_of(
        st.sampled_from(ROUTES), st.sampled_from(ROUTES), st.tuples(st.sampled_from(METHODS), st.sampled_from(PATHS))
    ),
    st.just("")
    | st.text(string.ascii_letters + string.digits + "/-._~%?=&:@", max_size=30)
    | st.text(max_size=30).map(lambda t: t.replace("\r", "").replace("\n", "").replace(" ", "%20")),
    st.lists(st.tuples(st.sampled_from(HEADERS), header_values), max_size=5),
    st.one_of(
        st.binary(max_size=80), json_bodies, st.sampled_from([33, 1200, 5000]).map(lambda n: b"[" * n + b"]" * n)
    ),
)


def _request_bytes(method: str, target: str, headers: list, body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "connection: close", f"content-length: {len(body)}"]
    if not any(name == "host" for name, _ in headers):
        lines.append("host: localhost")
    if not any(name == "content-type" for name, _ in headers):
        lines.append("content-type: application/json")  # as API clients send: the body reaches the handlers
    lines += [f"{name}: {value.replace(chr(13), '').replace(chr(10), '')}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def _connect(where: int | str) -> socket.socket:
    if isinstance(where, int):
        return socket.create_connection(("127.0.0.1", where), timeout=10)
    sock = socket.socket(socket.AF_UNIX)  # the daemon's own user: an admin, so writes get past access checks
    sock.settimeout(10)
    sock.connect(where)
    return sock


def _exchange(where: int | str, data: bytes) -> int:
    """The status the daemon answers (0: it closed without one, as for garbage)."""
    with _connect(where) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the daemon answered and closed before taking all of it
            pass
        answer = b""
        while b"\r\n" not in answer:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    head = answer.split(b"\r\n", 1)[0].split()
    return int(head[1]) if len(head) >= 2 and head[0].startswith(b"HTTP/") and head[1].isdigit() else 0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    d = Edged(tmp_path_factory.mktemp("fuzz"), {}, "[demo]\necho = true\n")
    d.start()
    yield d
    d.kill()


# Statuses a request may get from the daemon besides 2xx-4xx: a call that cannot be routed (503, 504) or
# stored (507), and the echo service's own answers passed through. 500 is never one.
ALLOWED_5XX = {502, 503, 504, 507}


def test_any_http_request_gets_an_answer_never_a_500_and_memory_stays_bounded(daemon) -> None:
    proc = psutil.Process(daemon.proc.pid)
    port = daemon.port
    _exchange(port, b"GET /svc/echo/warm HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
    rss_before = proc.memory_info().rss
    statuses: dict[int, int] = {}

    @fuzz("http")
    # Requests go over the Unix socket as the daemon's own user (an admin: writes reach their handlers), and
    # over TCP as an anonymous caller; raw bytes over TCP.
    @given(st.one_of(requests, requests, st.binary(min_size=1, max_size=200).map(lambda b: ("raw", b))), st.booleans())
    def one(case, over_tcp: bool) -> None:
        count("http")
        raw = case[0] == "raw"
        data = case[1] if raw else _request_bytes(*case)
        status = _exchange(port if raw or (over_tcp and case[1][:4] != "/v1/") else str(daemon.socket), data)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500 or status in ALLOWED_5XX, (status, data[:300])

    one()
    assert _exchange(port, b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n") == 200
    assert daemon.proc.poll() is None
    growth = proc.memory_info().rss - rss_before
    assert growth < 16 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over {sum(statuses.values())} requests"
    assert "Traceback" not in Path(daemon.log).read_text(), "a request made the daemon log a traceback"
