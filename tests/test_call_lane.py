"""The lighter call path's shortcuts keep their slow path's answers: the relayed head built in one pass (whole
and streamed answers, through a real daemon), the gate's skip of authorization when nothing could refuse, the
pool's per-target key cache; a cancelled try's place in the in-flight counts."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from conftest import Edged
from hypothesis import given, settings
from hypothesis import strategies as st
from test_http_server import ResponseReader

from edged.access import Identity
from edged.admission import Gate
from edged.authz import Authorizer, AuthzConfig, Rule
from edged.call import new_call
from edged.config import load_config
from edged.daemon import Daemon
from edged.errors import CallError
from edged.health import HealthMonitor
from edged.http.client import UpstreamPool
from edged.http.message import Request, header_lines, strip_hop_by_hop
from edged.model import PolicySpec, Service, ServiceSpec, Target
from edged.quota import Quotas
from edged.relay import call_for
from edged.telemetry import MeshMetrics

HEADS = [
    [],
    [(b"server", b"nginx"), (b"content-length", b"2"), (b"connection", b"keep-alive")],
    [(b"x-a", b"1"), (b"transfer-encoding", b"chunked"), (b"keep-alive", b"timeout=5"), (b"x-b", b"2")],
    # Connection names more headers to drop, before and after it.
    [(b"x-secret", b"s"), (b"connection", b"x-secret, X-Other"), (b"x-other", b"o"), (b"x-kept", b"k")],
    [(b"connection", b"close"), (b"x-kept", b"k"), (b"upgrade", b"h2c")],
]


@pytest.mark.parametrize("headers", HEADS)
def test_header_lines_forward_what_strip_hop_by_hop_keeps(headers: list[tuple[bytes, bytes]]) -> None:
    expected = b"".join(b"%s: %s\r\n" % h for h in strip_hop_by_hop(headers))
    assert b"".join(header_lines(headers)) == expected


def test_strip_hop_by_hop_also_drops_the_callers_own_names() -> None:
    headers = [(b"host", b"h"), (b"x-a", b"1"), (b"connection", b"x-a"), (b"x-b", b"2"), (b"authorization", b"t")]
    assert strip_hop_by_hop(headers, frozenset({b"host", b"authorization"})) == [(b"x-b", b"2")]
    assert strip_hop_by_hop(headers) == [(b"host", b"h"), (b"x-b", b"2"), (b"authorization", b"t")]


_NAMES = [
    b"host",
    b"x-request-id",
    b"x-edged-timeout-ms",
    b"connection",
    b"authorization",
    b"content-length",
    b"transfer-encoding",
    b"keep-alive",
    b"upgrade",
    b"x-a",
    b"x-b",
    b"user-agent",
]
_VALUES = [b"", b"7", b"250", b"close", b"keep-alive", b"Keep-Alive", b"x-a", b"X-B, user-agent", b"r-1"]
_HEADERS = st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=8)


@settings(max_examples=300, deadline=None, database=None)
@given(headers=_HEADERS, drop=st.sampled_from([frozenset(), frozenset({b"authorization"}), frozenset({b"x-a"})]))
def test_call_for_makes_the_call_new_call_makes(headers: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> None:
    # call_for keeps new_call's header rules in a pass of its own that also reads the mesh's two headers.
    svc = _svc(PolicySpec(timeout=5.0))
    req = Request("POST", "/x?q", "/x", "q", "1.1", headers, b"body", "127.0.0.1", True)
    add = [(b"x-forwarded-host", b"h")]
    asked = next((v for k, v in headers if k == b"x-edged-timeout-ms"), None)
    if asked is not None and not asked.isdigit():
        with pytest.raises(CallError, match="x-edged-timeout-ms"):
            call_for(req, svc, "/x?q", drop=drop, add=add)
        return
    before = time.monotonic()
    got = call_for(req, svc, "/x?q", drop=drop, add=add, app="app", tiers=frozenset({"local"}))
    after = time.monotonic()
    want = new_call(
        "default",
        "thermo",
        "POST",
        "/x?q",
        headers,
        b"body",
        deadline=0.0,
        request_id="",
        drop=drop,
        add=add,
        app="app",
        tiers=frozenset({"local"}),
    )
    assert got.headers == want.headers
    assert (got.tenant, got.service, got.method, got.path, got.body, got.app, got.tiers) == (
        want.tenant,
        want.service,
        want.method,
        want.path,
        want.body,
        want.app,
        want.tiers,
    )
    given_id = next((v for k, v in headers if k == b"x-request-id"), None)
    if given_id:
        assert got.request_id == given_id.decode()
    else:
        assert got.request_id and got.request_id != call_for(req, svc, "/x").request_id  # a new one each call
    timeout = 5.0 if asked is None else min(5.0, int(asked) / 1000)
    assert before + timeout <= got.deadline <= after + timeout


def _gate(config: AuthzConfig) -> Gate:
    return Gate(Authorizer(config), Quotas({}), MeshMetrics())


def _svc(policy: PolicySpec) -> Service:
    return Service(
        spec=ServiceSpec(name="thermo", endpoint_types=("local",), endpoints=(), policy=policy), endpoints=()
    )


CALLER = Identity("guest", "default", frozenset({"call"}))


def test_the_gate_skips_authorization_only_when_nothing_could_refuse() -> None:
    open_gate = _gate(AuthzConfig())
    assert open_gate.authz.open
    open_gate.admit(CALLER, _svc(PolicySpec()), "GET", "/x").release()
    # A service's own deny list still refuses on an open authorizer.
    with pytest.raises(CallError) as refused:
        open_gate.admit(CALLER, _svc(PolicySpec(deny=("default/guest",))), "GET", "/x")
    assert refused.value.status == 403
    with pytest.raises(CallError):
        open_gate.admit(CALLER, _svc(PolicySpec(allow=("default/other",))), "GET", "/x")
    # Any rule, a deny default or a deny tenant: decided as before.
    assert not _gate(AuthzConfig(default="deny")).authz.open
    assert not _gate(AuthzConfig(tenants={"default": "deny"})).authz.open
    with pytest.raises(CallError):
        _gate(AuthzConfig(tenants={"default": "deny"})).admit(CALLER, _svc(PolicySpec()), "GET", "/x")
    ruled = _gate(AuthzConfig())
    ruled.authz.set_rules([Rule("no-guests", "deny", sources=("default/guest",))], "api")
    assert not ruled.authz.open
    with pytest.raises(CallError):
        ruled.admit(CALLER, _svc(PolicySpec()), "GET", "/x")
    ruled.authz.set_rules([], "api")
    assert ruled.authz.open


def test_the_pools_key_cache_follows_the_target_object() -> None:
    pool = UpstreamPool()
    a = Target(kind="tcp", host="127.0.0.1", port=8080)
    b = Target(kind="tcp", host="127.0.0.1", port=8081)
    assert pool._key_of(a) == a.key
    assert pool._key_of(b) == b.key
    assert pool._keys[id(a)] == (a, a.key)


RAW_MANIFEST = """
service_name = "raw"
[[endpoints]]
type = "local"
url = "http://127.0.0.1:{port}"
"""

# What the raw backend answers: a whole answer and a chunked one, each with hop-by-hop headers and a Connection
# header that names one more header to drop.
_WHOLE = (
    b"HTTP/1.1 200 OK\r\nX-Secret: s\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n"
    b"X-Kept: k\r\nContent-Length: 5\r\n\r\nhello"
)
_CHUNKED = (  # the rest of its body comes later: the caller gets it streamed
    b"HTTP/1.1 200 OK\r\nConnection: X-Other\r\nX-Other: o\r\nX-Kept: k\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n",
    b"2\r\nde\r\n0\r\n\r\n",
)


def test_relayed_heads_drop_hop_by_hop_and_named_headers_whole_and_streamed(tmp_path) -> None:
    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, asyncio.CancelledError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                if b"/chunked" in head.split(b"\r\n", 1)[0]:
                    writer.write(_CHUNKED[0])
                    await writer.drain()
                    await asyncio.sleep(0.1)
                    writer.write(_CHUNKED[1])
                else:
                    writer.write(_WHOLE)
                await writer.drain()

    async def scenario(layout_dir):
        server = await asyncio.start_server(backend, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        layout = Edged(layout_dir, {"raw.toml": RAW_MANIFEST.format(port=port)})
        daemon = Daemon(load_config(str(layout.config)))
        await daemon.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", layout.port)
            writer.write(b"GET /svc/raw/whole HTTP/1.1\r\nHost: localhost\r\n\r\n")
            writer.write(b"GET /svc/raw/chunked HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answers = await ResponseReader(reader).read(2)
            writer.close()
            return answers
        finally:
            await daemon.stop()
            server.close()

    whole, chunked = asyncio.run(scenario(tmp_path / "edged"))
    assert (whole.status, whole.body, chunked.status, chunked.body) == (200, b"hello", 200, b"abcde")
    for answer in (whole, chunked):
        assert answer.headers[b"x-kept"] == b"k"
        assert answer.headers[b"x-edged-tries"] == b"1" and b"x-edged-endpoint" in answer.headers
        assert not {b"x-secret", b"x-other", b"keep-alive", b"connection"} & set(answer.headers)
    assert whole.headers[b"content-length"] == b"5"
    assert chunked.headers[b"transfer-encoding"] == b"chunked"  # streamed: the server frames it again


def test_a_try_left_without_an_outcome_takes_its_send_time_out_of_the_age_sum() -> None:
    now = [10.0]
    monitor = HealthMonitor(clock=lambda: now[0], lag=lambda: 0.0)
    with monitor.call_started("a"):  # a try that stays in flight
        now[0] = 11.0
        with monitor.call_started("a"):  # a try cancelled (its client left): no outcome
            pass
        state = monitor.state("a")
        # What edged.predictive reads: the mean age of the tries in flight is the first one's alone.
        assert (state.inflight, state.sent_sum) == (1, 10.0)
    assert monitor.state("a").inflight == 0


def test_the_age_sum_follows_the_tries_that_end_with_an_outcome() -> None:
    from helpers import endpoint, service

    now = [10.0]
    monitor = HealthMonitor(clock=lambda: now[0], lag=lambda: 0.0)
    ep = endpoint("a", 1)
    svc = service(ep)
    first = monitor.call_started(ep.id)
    now[0] = 11.0
    second = monitor.call_started(ep.id)
    now[0] = 12.0
    first.finish(ep, svc, True, 2.0)
    state = monitor.state(ep.id)
    assert (state.inflight, state.sent_sum) == (1, 11.0)  # the mean age is the second try's alone
    second.finish(ep, svc, True, 1.0)
    assert state.inflight == 0
    now[0] = 20.0
    with monitor.call_started(ep.id):  # alone again: the sum starts over
        assert (state.inflight, state.sent_sum) == (1, 20.0)
    assert state.inflight == 0
