"""What a running daemon has imported: only what its configuration uses (issue 8, item 7).

The daemon runs as a subprocess with `PYTHONPROFILEIMPORTTIME=1`: the interpreter writes one line per module
it imports, whenever that happens (also lazily, later), to stderr, which is the daemon's log. Each module a
configuration does not use costs RSS for as long as the daemon runs (the figures: scripts/footprint.py).
"""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO
from fixtures_mqtt import broker, mqtt_section, topic_prefix, wait_metric  # noqa: F401
from harness import imported_modules

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
)
# With MQTT on, paho's module-level imports that edged never uses (edged.lazy).
NOT_WITH_MQTT = ("urllib.request", "http.client", "email", "uuid", "cryptography", "zeroconf")

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
