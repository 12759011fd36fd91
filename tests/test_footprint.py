"""What a running daemon has imported: only what its configuration uses (issue 8, item 7).

The daemon runs as a subprocess with `PYTHONPROFILEIMPORTTIME=1`: the interpreter writes one line per module
it imports, whenever that happens (also lazily, later), to stderr, which is the daemon's log. Each module a
configuration does not use costs RSS for as long as the daemon runs (the figures: scripts/footprint.py).
"""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid

from conftest import REPO
from fixtures_identity import FleetCA
from fixtures_mqtt import broker, mqtt_section, topic_prefix, wait_metric  # noqa: F401
from harness import imported_modules

from edged.cli import _plain_run

# Never on the local tier's path, with what each would cost or why it is not needed.
NOT_ON_THE_LOCAL_TIER = (
    "cryptography",  # ~7 MiB: only to verify or sign fleet documents and certificates
    "jwt",  # PyJWT: only with [access.jwt]
    "edged.jwt_auth",
    "psutil",  # not a dependency: vitals come from /proc and /sys
    "hypothesis",  # tests only
    "zeroconf",  # ~3.5 MiB: only with [mdns] on
    "ifaddr",
    "aiomqtt",  # only with [mqtt] on
    "paho",
    "cbor2",  # the cloud tier's envelopes
    "edged.cloud.session",
    "edged.cloud.cli",  # the fleet and bridge commands
    "edged.identity.cli",  # the CA and enrolment commands
    "edged.client",  # the API client of the other commands
    "difflib",  # only to suggest a key in a config error
    "bz2",  # shutil's archive formats (edged.lazy)
    "lzma",
    "ssl",  # ~1.8 MiB: only once a TLS context is built (edged.lazy.defer_ssl; the C module _ssl is loaded)
    "_hashlib",  # ~2 MiB: OpenSSL's digests, only for cloud MACs and the like (edged.lazy.defer_hashing)
    "hashlib",
    "hmac",
    "encodings.idna",  # ~0.2 MiB with stringprep and unicodedata: only for non-ASCII host names
    "stringprep",
    "unicodedata",
    "argparse",  # `edged run --config PATH` is read without it (edged.cli._plain_run)
    "gettext",
    "tempfile",  # with shutil: only once a state file is written
    "shutil",
)
# With MQTT on, paho's module-level imports that edged never uses (edged.lazy).
# ctypes (with libffi): only once the allocator is trimmed after a registry burst (edged.memory); with mDNS on,
# zeroconf's ifaddr loads it anyway.
NOT_WITH_MQTT = ("urllib.request", "http.client", "email", "uuid", "cryptography", "zeroconf", "ctypes")
# Everything on (mDNS, MQTT, a fleet key, checked services) and idle: what only TLS, cloud MACs, a fleet
# document's verification or the other commands use.
NOT_AT_IDLE = (
    "ssl",
    "_hashlib",
    "hashlib",
    "hmac",
    "encodings.idna",
    "unicodedata",
    "argparse",
    "gettext",
    "cryptography",
    "urllib.request",
    "http.client",
    "email",
    "uuid",
    "jwt",
    "edged.cloud.cli",
    "edged.identity.cli",
    "edged.client",
    "difflib",
)

MANIFEST = """
service_name = "thermo"
[[endpoints]]
type = "local"
url = "{url}"
"""


def loaded(names: set[str], packages: tuple[str, ...]) -> list[str]:
    """Those of `packages` that were imported, themselves or any module under them."""
    return [p for p in packages if any(n == p or n.startswith(p + ".") for n in names)]


def test_the_local_tier_imports_only_what_it_uses(backends, edged, monkeypatch):
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    b = backends("b1")
    d = edged({"thermo.toml": MANIFEST.format(url=b.url)})
    status, _, _ = d.call("thermo", "/x")  # the call path's own lazy imports happen too
    assert status == 200
    assert d.api.request("GET", "/v1/services")[0] == 200
    names = set(imported_modules(d.log_text()))
    assert {"edged.daemon", "edged.router", "asyncio"} <= names  # the lines are there and read
    assert loaded(names, NOT_ON_THE_LOCAL_TIER) == []


def test_with_mqtt_on_paho_does_not_load_what_only_its_proxy_support_uses(
    backends, edged, broker, topic_prefix, monkeypatch
):
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    b = backends("b1")
    d = edged({"thermo.toml": MANIFEST.format(url=b.url)}, mqtt_section(broker, topic_prefix))
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)  # connected: paho's connect path has run
    names = set(imported_modules(d.log_text()))
    assert {"aiomqtt", "paho.mqtt.client", "edged.cloud.session"} <= names
    assert loaded(names, NOT_WITH_MQTT) == []


CHECKED = """
service_name = "svc{i}"
[[endpoints]]
type = "local"
url = "{url}"
[health_check]
http = "/"
interval = "300ms"
timeout = "250ms"
"""


def test_the_full_daemon_at_idle_loads_neither_tls_nor_openssl_hashing(
    tmp_path, backends, edged, broker, topic_prefix, monkeypatch
):
    """mDNS, MQTT, a fleet key and checked services, none of it with TLS: before, ssl and OpenSSL's hashlib
    were imported at start (asyncio, uvloop and hashlib's users import them at their top), about 2.4 MiB."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(
        [sys.executable, "-m", "edged", "fleet", "keygen", str(tmp_path / "ops")], env=env, check=True, timeout=60
    )
    b = backends("b1")
    manifests = {f"svc{i}.toml": CHECKED.format(i=i, url=b.url) for i in range(3)}
    extra = mqtt_section(broker, topic_prefix) + f'[fleet]\nkeys = ["{tmp_path / "ops.pub"}"]\n'
    d = edged(manifests, extra, start=False)
    fleet = f"fp{uuid.uuid4().hex[:8]}"  # its mDNS answers on loopback mean nothing to another test's nodes
    # (and a node name of its own: its mDNS instance name, which a parallel run's "full" would share)
    text = d.config.read_text().replace('name = "test-node"', f'name = "full-{fleet}"\nfleet = "{fleet}"')
    d.config.write_text(text.replace("[mdns]\nenabled = false", '[mdns]\ninterfaces = ["127.0.0.1"]'))
    d.start()
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    wait_metric(d, "edged_endpoint_up", lambda v: v == 3)
    time.sleep(1.0)  # the checks (every 300 ms) run a few rounds: what they import is imported by then
    status, _, _ = d.call("svc0", "/x")
    assert status == 200
    names = set(imported_modules(d.log_text()))
    assert {"zeroconf", "aiomqtt", "edged.cloud.session", "edged.edge.mdns", "_ssl"} <= names
    assert loaded(names, NOT_AT_IDLE) == []


def test_a_deferred_module_is_imported_for_real_on_first_use():
    """The stand-in costs nothing until read; any read (attribute, from-import) gives the real module."""
    code = textwrap.dedent(
        """
        import sys
        from edged.lazy import defer_import
        defer_import("urllib.request")
        import paho.mqtt.client  # imports urllib.request at its top
        assert "http.client" not in sys.modules, "the stand-in imported the real module"
        import urllib.request
        assert urllib.request.getproxies() is not None  # the first read imports it
        assert "http.client" in sys.modules
        from urllib.request import Request
        assert sys.modules["urllib.request"].Request is Request
        assert urllib.request.__file__.endswith("request.py")
        defer_import("json")  # already imported: left alone
        import json
        assert json.dumps([1]) == "[1]" and hasattr(sys.modules["json"], "__file__")
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_deferred_ssl_and_hashing_are_the_real_thing_on_first_use(tmp_path):
    """What asyncio and uvloop keep of the stand-ins from their import still works: a TLS connection over
    uvloop (its isinstance check of the context, its MemoryBIO, the SSL errors), and hashing and MACs give
    OpenSSL's results once they are first used."""
    files = FleetCA("home").enroll(tmp_path, "n1")
    code = textwrap.dedent(
        f"""
        import sys
        from edged.lazy import defer_hashing, defer_ssl, is_deferred
        defer_ssl()
        defer_hashing()
        import asyncio, secrets, uvloop
        from hmac import compare_digest
        import hashlib
        assert compare_digest(b"a", b"a") and not compare_digest(b"a", b"b")
        assert hashlib.sha256(b"abc").hexdigest().startswith("ba7816bf")  # CPython's own SHA-256 until now
        assert [m for m in ("ssl", "hashlib", "hmac") if not is_deferred(m)] == [], "loaded at import"
        assert "_hashlib" not in sys.modules

        import ssl
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # the first read: the real ssl
        server.load_cert_chain({str(files.cert)!r}, {str(files.key)!r})
        client = ssl.create_default_context(cafile={str(files.ca)!r})
        client.check_hostname = False
        assert not is_deferred("ssl") and type(server) is ssl.SSLContext

        async def main():
            async def echo(reader, writer):
                writer.write(await reader.readline())
                await writer.drain()
                writer.close()
            srv = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server)
            port = srv.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
            writer.write(b"hello\\n")
            line = await reader.readline()
            writer.close()
            try:  # a certificate the client does not trust: ssl's own error class, caught as such
                await asyncio.open_connection("127.0.0.1", port, ssl=ssl.create_default_context())
            except ssl.SSLError:
                pass
            else:
                raise AssertionError("a certificate from an unknown CA was taken")
            finally:
                srv.close()
            return line

        assert uvloop.run(main()) == b"hello\\n"
        import hmac
        tag = hmac.new(b"k", b"m", "sha256").hexdigest()  # the first read of hmac: hmac and hashlib, real
        assert tag.startswith("b600") and not is_deferred("hashlib") and "_hashlib" in sys.modules
        assert hashlib.sha256.__name__ == "openssl_sha256"  # OpenSSL's from now on
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_hashing_deferral_works_whichever_module_holds_cpythons_own_sha256():
    """Python 3.12 renamed `_sha256` to `_sha2`: with the one this Python has hidden, the daemon still starts
    (hashing is simply not deferred), and with both hidden too."""
    code = textwrap.dedent(
        """
        import importlib.util, sys
        present = [m for m in ("_sha2", "_sha256") if importlib.util.find_spec(m)]
        assert present, "this Python has neither _sha2 nor _sha256"
        for m in present:
            sys.modules[m] = None  # `import m` now raises ImportError
        from edged.lazy import defer_hashing, is_deferred
        defer_hashing()
        import hashlib, hmac
        assert not is_deferred("hashlib") and "_hashlib" in sys.modules
        assert hashlib.sha256(b"abc").hexdigest().startswith("ba7816bf")
        assert hmac.new(b"k", b"m", "sha256").hexdigest().startswith("b600")
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_deferred_idna_codec_encodes_as_the_real_one():
    """ASCII names take encodings.idna's fast path without importing it; the rest, errors included, is the
    real codec's."""
    code = textwrap.dedent(
        """
        import socket, sys
        from edged.lazy import defer_idna, is_deferred
        defer_idna()
        assert socket.getaddrinfo("127.0.0.1", 80)[0][4] == ("127.0.0.1", 80)
        names = ("", "localhost", "a.b.", "x" * 63)
        assert [n.encode("idna") for n in names] == [n.encode("ascii") for n in names]
        assert is_deferred("encodings.idna") and "unicodedata" not in sys.modules
        for bad in ("a..b", "x" * 64):  # the wording differs between Python versions: "label empty (or too long)"
            try:
                bad.encode("idna")
            except UnicodeError as exc:
                assert "label" in str(exc), exc
            else:
                raise AssertionError(bad)
        assert "bücher.de".encode("idna") == b"xn--bcher-kva.de" and b"xn--bcher-kva.de".decode("idna") == "bücher.de"
        import codecs
        assert codecs.getincrementalencoder("idna")().encode("bücher.de", final=True) == b"xn--bcher-kva.de"
        assert not is_deferred("encodings.idna")
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_edged_run_as_its_unit_starts_it_is_read_without_argparse():
    """The forms a unit file uses; anything else goes to argparse (its --help and its errors)."""
    for argv, config in (
        (["run"], None),
        (["run", "--config", "/etc/edged/edged.toml"], "/etc/edged/edged.toml"),
        (["run", "-c", "e.toml"], "e.toml"),
        (["run", "--config=e.toml"], "e.toml"),
    ):
        args = _plain_run(argv)
        assert args is not None and args.config == config and args.func.__name__ == "_run", argv
    for argv in (["run", "--help"], ["run", "--config"], ["run", "-c", "-x"], ["run", "e.toml"], ["run", "--config="]):
        assert _plain_run(argv) is None, argv
