"""Who is calling (edged/access.py) and what a browser page may send (edged/browser.py)."""

from __future__ import annotations

import pytest

from edged.access import ADMIN, CALL, READ, WRITE, Access, AccessConfig, AppConfig
from edged.browser import HostGuard, require_json
from edged.config import TenantConfig
from edged.errors import CallError
from edged.http.message import Request

TENANTS = {
    "default": TenantConfig("default", open_on_loopback=True),
    "garden": TenantConfig("garden", frozenset({"g-token"})),
}
APPS = {
    "thermo": AppConfig("thermo", uids=frozenset({1001}), tokens=frozenset({"t-thermo"})),
    "lamps": AppConfig("lamps", tenant="garden", gids=frozenset({2002})),
    "ops": AppConfig("ops", tokens=frozenset({"t-ops"}), admin=True),
}


def req(peer: str = "127.0.0.1", cred=None, **headers: str) -> Request:
    hdrs = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return Request("POST", "/v1/register", "/v1/register", "", "1.1", hdrs, b"{}", peer, True, cred)


def access(anonymous: str = "call") -> Access:
    return Access(AccessConfig(anonymous=anonymous, apps=APPS), TENANTS, daemon_uid=999)


def test_each_way_of_naming_a_caller() -> None:
    a = access()
    cases = {
        "token of an app": (req(authorization="Bearer t-thermo"), "thermo", "default", {READ, CALL, WRITE}),
        "admin app": (req(authorization="Bearer t-ops"), "ops", "default", {READ, CALL, WRITE, ADMIN}),
        "tenant token": (req(authorization="Bearer g-token"), "tenant:garden", "garden", {READ, CALL, WRITE}),
        "socket uid": (req("unix", (1, 1001, 50)), "thermo", "default", {READ, CALL, WRITE}),
        "socket gid": (req("unix", (1, 3003, 2002)), "lamps", "garden", {READ, CALL, WRITE}),
        "root": (req("unix", (1, 0, 0)), "admin", "default", {READ, CALL, WRITE, ADMIN}),
        "the daemon's user": (req("unix", (1, 999, 999)), "admin", "default", {READ, CALL, WRITE, ADMIN}),
        "another socket user": (req("unix", (1, 4004, 50)), "anonymous", "default", {READ, CALL}),
        "loopback TCP": (req("127.0.0.1"), "anonymous", "default", {READ, CALL}),
        "IPv6 loopback": (req("::1"), "anonymous", "default", {READ, CALL}),
    }
    for what, (request, name, tenant, rights) in cases.items():
        ident = a.identify(request)
        assert (ident.name, ident.tenant, set(ident.rights)) == (name, tenant, rights), what
    assert a.identify(req(authorization="Bearer t-thermo")).by_token


def test_refusals() -> None:
    a = access()
    for request in (req("192.168.1.7"), req(authorization="Bearer nope"), req(authorization="Basic abc")):
        with pytest.raises(CallError) as err:
            a.identify(request)
        assert err.value.status == 401
    anon = access("none").identify(req("unix", (1, 4004, 50)))
    with pytest.raises(CallError) as err:
        anon.require(CALL)
    assert err.value.status == 401  # could bring a token
    reader = access("read").identify(req())
    reader.require(READ)
    with pytest.raises(CallError) as err:
        reader.require(CALL)
    assert err.value.status == 403
    closed = Access(AccessConfig(), {"default": TenantConfig("default", open_on_loopback=False)})
    with pytest.raises(CallError):
        closed.identify(req())


def test_who_may_change_a_registration() -> None:
    a = access()
    thermo = a.identify(req(authorization="Bearer t-thermo"))
    assert thermo.may_change("thermo") and not thermo.may_change("lamps") and not thermo.may_change(None)
    assert a.identify(req(authorization="Bearer t-ops")).may_change("lamps")
    assert not a.identify(req()).may_change("anonymous")  # no write right, whatever the owner


def test_hosts_and_origins() -> None:
    guard = HostGuard(["pi-kitchen", "pi-kitchen.local"])
    for host in (
        b"localhost",
        b"localhost:7700",
        b"127.0.0.1:7700",
        b"127.9.9.9",
        b"[::1]:7700",
        b"thermo.mesh",
        b"Pi-Kitchen:7700",
        b"app.localhost",
    ):
        guard.check_host(host)
    for host in (b"evil.example", b"evil.example:7700", b"192.168.1.7", b"localhost.evil.example", b"[::2]"):
        with pytest.raises(CallError) as err:
            guard.check_host(host)
        assert err.value.code == "forbidden_host"
    guard.check_same_origin(req(origin="http://localhost:7700", sec_fetch_site="same-origin"))
    guard.check_same_origin(req())
    for headers in ({"origin": "http://evil.example"}, {"origin": "null"}, {"sec_fetch_site": "cross-site"}):
        with pytest.raises(CallError) as err:
            guard.check_same_origin(req(**headers))
        assert err.value.code == "cross_origin"
    require_json(req(content_type="application/json; charset=utf-8"))
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        with pytest.raises(CallError) as err:
            require_json(req(content_type=ctype))
        assert err.value.status == 415
