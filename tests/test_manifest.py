"""Manifests: the three formats agree, proto interfaces, and every refusal names its file, line and key."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from edged.errors import ConfigError
from edged.manifest import dirs_signature, load_manifest_dirs, parse_manifest, parse_manifest_data
from edged.model import EndpointSpec, HealthCheckSpec, PolicySpec

DATA = Path(__file__).parent / "data" / "manifests"
REPO = Path(__file__).parent.parent


def write(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def refused(folder: Path, name: str, text: str) -> ConfigError:
    path = write(folder, name, text)
    with pytest.raises(ConfigError) as info:
        parse_manifest(path)
    assert info.value.file == path
    return info.value


# ------------------------------------------------------------------------------------------------ good


def test_toml_json_yaml_give_equal_specs():
    specs = [parse_manifest(str(DATA / f"thermo.{ext}")) for ext in ("toml", "json", "yaml")]
    assert [s.source for s in specs] == [str(DATA / f"thermo.{ext}") for ext in ("toml", "json", "yaml")]
    bare = [dataclasses.replace(s, source="") for s in specs]
    assert bare[0] == bare[1] == bare[2]

    spec = specs[0]
    assert spec.key == ("default", "thermo")
    assert spec.priority == 5
    assert spec.advertise == "_thermo._tcp"
    assert spec.endpoint_types == ("local", "edge", "cloud")
    assert spec.endpoints == (
        EndpointSpec(tier="local", url="http://127.0.0.1:8080", priority=1),
        EndpointSpec(tier="edge", mdns="_thermo._tcp", priority=2),
        EndpointSpec(tier="edge", url="http://10.0.0.7:8080/api", weight=50),
        EndpointSpec(tier="cloud", priority=3),
    )
    assert spec.health_check == HealthCheckSpec(kind="http", http_path="/healthz", interval=2.0, timeout=0.5, rise=3)
    assert spec.policy == PolicySpec(
        strategy="latency",
        retries=3,
        per_try_timeout=0.3,
        timeout=2.0,
        retry_budget=0.25,
        retry_on_status=frozenset({502, 503}),
        retry_non_idempotent=True,
    )
    assert spec.interface is not None
    assert spec.interface.version == "1.2.0"
    assert spec.interface.source == "inline"
    assert [m.pattern for m in spec.interface.methods] == ["/readings", "/readings/{id}", "/setpoint"]
    assert spec.interface.allows("GET", "/readings/42")
    assert not spec.interface.allows("DELETE", "/readings")


def test_minimal_manifest_takes_defaults(tmp_path):
    spec = parse_manifest(write(tmp_path, "a.yml", "service_name: a\n"))
    assert spec.tenant == "default"
    assert spec.priority == 10
    assert spec.endpoint_types == ("local", "edge", "cloud")  # no endpoints: every tier
    assert spec.endpoints == ()
    assert spec.interface is None
    assert spec.health_check is None
    assert spec.policy == PolicySpec()


def test_endpoint_types_default_to_the_endpoints_tiers_in_order(tmp_path):
    spec = parse_manifest(
        write(
            tmp_path,
            "a.toml",
            """
            service_name = "a"
            [[endpoints]]
            type = "edge"
            url = "http://10.0.0.2:80"
            [[endpoints]]
            type = "local"
            url = "unix:/run/a.sock"
            [[endpoints]]
            type = "edge"
            mdns = "_a._tcp.local."
            """,
        )
    )
    assert spec.endpoint_types == ("edge", "local")
    assert spec.endpoints[2].mdns == "_a._tcp"  # the .local. suffix is dropped


def test_sample_echo_manifest_is_valid():
    spec = parse_manifest(str(REPO / "config" / "services.d" / "echo.toml"))
    assert spec.name == "echo"
    assert spec.endpoints == (EndpointSpec(tier="local", url="http://127.0.0.1:7700/v1/echo"),)
    assert spec.health_check is not None and spec.health_check.http_path == "/healthz"
    assert spec.interface is None


def test_registration_body_validates_without_a_file():
    body = json.loads('{"service_name": "cam", "endpoints": [{"type": "local", "url": "http://127.0.0.1:9000"}]}')
    spec = parse_manifest_data(body, "register:r1")
    assert spec.source == "register:r1"
    assert spec.endpoint_types == ("local",)
    with pytest.raises(ConfigError) as info:
        parse_manifest_data({"service_name": "cam", "interface_definition": {"proto": "x.proto"}}, "register:r2")
    assert info.value.key == "interface_definition.proto"
    assert info.value.line is None
    with pytest.raises(ConfigError) as info:
        parse_manifest_data(["not", "a", "table"], "register:r3")
    assert "got an array" in info.value.message


# ----------------------------------------------------------------------------------------------- proto


def test_proto_interface_gives_grpc_paths():
    spec = parse_manifest(str(DATA / "thermo-proto.toml"))
    assert spec.interface is not None
    assert spec.interface.version == "2.0.0"
    assert spec.interface.source == str(DATA / "thermo.proto")
    assert [(m.verb, m.pattern) for m in spec.interface.methods] == [
        ("POST", "/demo.v1.Thermo/Read"),
        ("POST", "/demo.v1.Thermo/SetPoint"),
    ]
    assert spec.interface.allows("POST", "/demo.v1.Thermo/Read")
    assert not spec.interface.allows("POST", "/demo.v1.Admin/Reboot")


def test_proto_without_package_and_single_service(tmp_path):
    (tmp_path / "p.proto").write_text('syntax = "proto3";\nservice Lamp { rpc On (E) returns (E); }\nmessage E {}\n')
    spec = parse_manifest(
        write(tmp_path, "m.json", '{"service_name": "lamp", "interface_definition": {"proto": "p.proto"}}')
    )
    assert spec.interface is not None
    assert [m.pattern for m in spec.interface.methods] == ["/Lamp/On"]


def test_proto_unknown_service_lists_the_ones_it_has(tmp_path):
    (tmp_path / "thermo.proto").write_text((DATA / "thermo.proto").read_text())
    err = refused(
        tmp_path,
        "m.toml",
        """
        service_name = "t"

        interface_definition = { proto = "thermo.proto", service = "Thermostat" }
        """,
    )
    assert (err.line, err.key) == (3, "interface_definition.service")
    assert "Thermo, Admin" in err.message


def test_proto_with_two_services_needs_a_name(tmp_path):
    (tmp_path / "thermo.proto").write_text((DATA / "thermo.proto").read_text())
    err = refused(tmp_path, "m.yaml", "service_name: t\ninterface_definition:\n  proto: thermo.proto\n")
    assert (err.line, err.key) == (3, "interface_definition.proto")
    assert "2 services" in err.message


def test_proto_syntax_error_names_the_proto_file(tmp_path):
    proto = tmp_path / "broken.proto"
    proto.write_text('syntax = "proto3";\n\nservice Broken {\n  rpc Go (A) returns B;\n}\n')
    path = write(tmp_path, "m.toml", 'service_name = "b"\ninterface_definition = { proto = "broken.proto" }\n')
    with pytest.raises(ConfigError) as info:
        parse_manifest(path)
    assert info.value.file == str(proto)
    assert info.value.line == 4
    assert "m.toml" in info.value.message


def test_missing_proto_file(tmp_path):
    err = refused(tmp_path, "m.toml", 'service_name = "b"\ninterface_definition = { proto = "nope.proto" }\n')
    assert (err.line, err.key) == (2, "interface_definition.proto")
    assert "nope.proto" in err.message


# ------------------------------------------------------------------------------------------------- bad


def test_wrong_type_names_line_key_expected_and_found(tmp_path):
    err = refused(tmp_path, "m.toml", 'service_name = "a"\n\npriority = "5"\n')
    assert (err.line, err.key) == (3, "priority")
    assert "expected an integer >= 0" in err.message
    assert "a string ('5')" in err.message


def test_bool_is_not_an_int(tmp_path):
    err = refused(tmp_path, "m.json", '{\n  "service_name": "a",\n  "health_check": {"tcp": true, "rise": true}\n}\n')
    assert (err.line, err.key) == (3, "health_check.rise")
    assert "a boolean (true)" in err.message


def test_unknown_key_top_level(tmp_path):
    err = refused(tmp_path, "m.toml", 'service_name = "a"\nprority = 3\n')
    assert (err.line, err.key) == (2, "prority")
    assert "did you mean 'priority'" in err.message


def test_unknown_key_nested(tmp_path):
    err = refused(
        tmp_path,
        "m.toml",
        """
        service_name = "a"

        [policy]
        retries = 1
        retires = 3
        """,
    )
    assert (err.line, err.key) == (5, "policy.retires")
    assert "unknown key" in err.message


def test_unknown_key_in_second_endpoint_yaml(tmp_path):
    err = refused(
        tmp_path,
        "m.yaml",
        """
        service_name: a
        endpoints:
          - type: local
            url: http://127.0.0.1:1
          - type: edge
            url: http://10.0.0.1:1
            wieght: 3
        """,
    )
    assert (err.line, err.key) == (7, "endpoints[1].wieght")
    assert "did you mean 'weight'" in err.message


def test_missing_service_name(tmp_path):
    err = refused(tmp_path, "m.toml", "priority = 1\n")
    assert err.key == "service_name"
    assert "missing" in err.message


def test_service_name_must_be_lower_case_label(tmp_path):
    err = refused(tmp_path, "m.toml", 'service_name = "Thermo"\n')
    assert (err.line, err.key) == (1, "service_name")
    assert "lower case" in err.message
    err = refused(tmp_path, "m.toml", 'service_name = "-x"\n')
    assert "'-x'" in err.message


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("m.toml", 'service_name = "a"\n[policy]\nretries = \n', 3),
        ("m.toml", 'service_name = "a\n', 1),
        # Python 3.13's json names the trailing comma (line 3); older ones the brace after it (line 4).
        ("m.json", '{\n  "service_name": "a",\n  "priority": 1,\n}\n', (3, 4) if sys.version_info >= (3, 13) else 4),
        ("m.yaml", "service_name: a\nendpoints:\n  - type: local\n   url: x\n", 4),
        ("m.yaml", "service_name: [a\n", 2),
    ],
)
def test_syntax_errors_have_lines(tmp_path, name, text, line):
    err = refused(tmp_path, name, text)
    assert err.line in (line if isinstance(line, tuple) else (line,))
    assert err.key is None
    assert "syntax error" in err.message


def test_empty_yaml_is_refused(tmp_path):
    err = refused(tmp_path, "m.yaml", "# nothing\n")
    assert "null" in err.message


def test_bad_url(tmp_path):
    err = refused(
        tmp_path,
        "m.toml",
        """
        service_name = "a"
        [[endpoints]]
        type = "local"
        url = "http://127.0.0.1:8080"
        [[endpoints]]
        type = "local"
        url = "ftp://127.0.0.1:21"
        """,
    )
    assert (err.line, err.key) == (7, "endpoints[1].url")
    assert "ftp://127.0.0.1:21" in err.message


def test_local_endpoint_needs_url(tmp_path):
    err = refused(tmp_path, "m.toml", 'service_name = "a"\n\n[[endpoints]]\ntype = "local"\n')
    assert (err.line, err.key) == (3, "endpoints[0].url")


def test_endpoint_type_not_in_endpoint_types(tmp_path):
    err = refused(
        tmp_path,
        "m.json",
        """
        {
          "service_name": "a",
          "endpoint_types": ["local", "cloud"],
          "endpoints": [
            {"type": "local", "url": "http://127.0.0.1:1"},
            {"type": "edge",
             "mdns": "_a._tcp"}
          ]
        }
        """,
    )
    assert (err.line, err.key) == (6, "endpoints[1].type")
    assert "'edge' is not in endpoint_types" in err.message


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ('endpoint_types = ["local", "fog"]', "endpoint_types[1]", "'fog'"),
        ('endpoint_types = ["local", "local"]', "endpoint_types[1]", "twice"),
        ("endpoint_types = []", "endpoint_types", "at least one"),
        ('advertise = "thermo"', "advertise", "DNS-SD"),
        ('advertise = "_averyveryverylongname._tcp"', "advertise", "15"),
        ('[[endpoints]]\ntype = "edge"\nurl = "http://a:1"\nmdns = "_a._tcp"', "endpoints[0].mdns", "not both"),
        ('[[endpoints]]\ntype = "edge"', "endpoints[0]", "needs url"),
        ('[[endpoints]]\ntype = "cloud"\nurl = "http://a:1"', "endpoints[0].url", "MQTT"),
        ('[[endpoints]]\ntype = "cloud"\nweight = 0', "endpoints[0].weight", "from 1 to 10000"),
        ('[[endpoints]]\ntype = "cloud"\n[[endpoints]]\ntype = "cloud"', "endpoints[1]", "same endpoint"),
        ("[health_check]\ninterval = '1s'", "health_check", "one of http"),
        ('[health_check]\nhttp = "/h"\ntcp = true', "health_check.tcp", "not both"),
        ('[health_check]\nhttp = "healthz"', "health_check.http", "'/healthz'"),
        ("[health_check]\ntcp = false", "health_check.tcp", "checks nothing"),
        ('[health_check]\nttl = "0s"', "health_check.ttl", "> 0"),
        ('[policy]\nstrategy = "fastest"', "policy.strategy", "'predictive'"),
        ("[policy]\nretries = 11", "policy.retries", "from 0 to 10"),
        ("[policy]\nretry_budget = 1.5", "policy.retry_budget", "from 0 to 1"),
        ("[policy]\nretry_on_status = [502, 404]", "policy.retry_on_status[1]", "from 500 to 599"),
        ('[policy]\nper_try_timeout = "20s"', "policy.per_try_timeout", "must be >="),
        ('[policy]\ntimeout = "1s"\nper_try_timeout = "2s"', "policy.timeout", "must be >="),
        ('interface_definition = { methods = ["FETCH /x"] }', "interface_definition.methods[0]", "FETCH"),
        ('interface_definition = { methods = ["GET /x"], proto = "a.proto" }', "interface_definition.methods", "not"),
        ('interface_definition = { service = "X" }', "interface_definition.service", ".proto"),
        ("interface_definition = {}", "interface_definition", "methods"),
        ('tenant = "Kitchen"', "tenant", "lower case"),
    ],
)
def test_field_rules(tmp_path, body, key, words):
    err = refused(tmp_path, "m.toml", 'service_name = "a"\n' + body + "\n")
    assert err.key == key
    assert words in err.message
    assert err.line is not None and err.line >= 2


def test_bad_duration(tmp_path):
    err = refused(tmp_path, "m.toml", 'service_name = "a"\n[health_check]\ntcp = true\ninterval = "2 sec"\n')
    assert (err.line, err.key) == (4, "health_check.interval")
    assert "expected a duration" in err.message
    assert "'2 sec'" in err.message


def test_timeout_must_be_shorter_than_interval(tmp_path):
    err = refused(
        tmp_path,
        "m.yaml",
        """
        service_name: a
        health_check:
          tcp: true
          interval: 1s
          timeout: 1s
        """,
    )
    assert (err.line, err.key) == (5, "health_check.timeout")
    assert "timeout (1s) must be shorter than interval (1s)" in err.message


def test_unsupported_extension_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="unsupported"):
        parse_manifest(write(tmp_path, "m.ini", "x"))
    with pytest.raises(ConfigError, match="cannot read") as info:
        parse_manifest(str(tmp_path / "gone.toml"))
    assert info.value.file == str(tmp_path / "gone.toml")


# -------------------------------------------------------------------------------------------- folders


def test_load_dirs_keeps_good_files_and_reports_the_bad_one(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write(a, "10-thermo.toml", (DATA / "thermo.toml").read_text())
    write(a, "20-cam.json", '{"service_name": "cam"}')
    bad = write(a, "30-bad.yaml", "service_name: bad\npriority: high\n")
    write(a, ".hidden.toml", "garbage")
    write(a, "#autosave.toml#", "garbage")
    write(a, "40-old.toml~", "garbage")
    write(a, "50-old.toml.bak", "garbage")
    write(a, "README.txt", "garbage")
    (a / "sub.toml").mkdir()  # a folder, not a manifest
    write(b, "lamp.yml", "service_name: lamp\ntenant: garden\n")

    specs, errors = load_manifest_dirs([str(a), str(tmp_path / "missing"), str(b)])
    assert [s.name for s in specs] == ["thermo", "cam", "lamp"]
    assert [s.tenant for s in specs] == ["default", "default", "garden"]
    assert len(errors) == 1
    assert (errors[0].file, errors[0].line, errors[0].key) == (bad, 2, "priority")


def test_duplicate_service_is_refused_for_the_later_file(tmp_path):
    first = write(tmp_path, "a.toml", 'service_name = "x"\n')
    second = write(tmp_path, "b.json", '{\n  "priority": 1,\n  "service_name": "x"\n}\n')
    write(tmp_path, "c.yaml", "service_name: x\ntenant: other\n")  # another tenant: no clash
    specs, errors = load_manifest_dirs([str(tmp_path), str(tmp_path)])  # a folder listed twice is read once
    assert [(s.source, s.tenant) for s in specs] == [(first, "default"), (str(tmp_path / "c.yaml"), "other")]
    assert len(errors) == 1
    assert (errors[0].file, errors[0].line, errors[0].key) == (second, 3, "service_name")
    assert first in errors[0].message


def test_dirs_signature_changes_with_files(tmp_path):
    empty = dirs_signature([str(tmp_path), str(tmp_path / "missing")])
    assert empty == ()
    path = write(tmp_path, "a.toml", 'service_name = "a"\n')
    one = dirs_signature([str(tmp_path)])
    assert [entry[0] for entry in one] == [path]
    assert dirs_signature([str(tmp_path)]) == one
    write(tmp_path, "a.toml", 'service_name = "ab"\n')  # size changes
    two = dirs_signature([str(tmp_path)])
    assert two != one
    os.utime(path, ns=(1, 1))  # same size, other mtime
    assert dirs_signature([str(tmp_path)]) != two
    (tmp_path / "a.proto").write_text("syntax = 'proto3';")
    assert len(dirs_signature([str(tmp_path)])) == 2


@pytest.mark.parametrize(
    ("name", "text", "line", "key"),
    [
        (
            "m.json",
            '{\n  "service_name": "a",\n  "policy": {"retries": 1,\n    "retries": 2}\n}\n',
            4,
            "policy.retries",
        ),
        ("m.yaml", "service_name: a\npriority: 1\npriority: 2\n", 3, "priority"),
    ],
)
def test_duplicate_keys_are_refused(tmp_path, name, text, line, key):
    err = refused(tmp_path, name, text)
    assert (err.line, err.key) == (line, key)
    assert "duplicate key" in err.message


# ---------------------------------------------------------------- any bad file is a refused file (issue 13)

DEEP = 30_000  # deeper than any Python's recursion limit (3.13's json parses 3,000 levels)


@pytest.mark.parametrize(
    "name, text",
    [
        ("deep.toml", 'service_name = "a"\nx = ' + "[" * DEEP + "]" * DEEP + "\n"),
        ("deep.json", '{"service_name": "a", "x": ' + "[" * DEEP + "]" * DEEP + "}"),
        ("deep.yaml", "service_name: a\nx: " + "[" * DEEP + "]" * DEEP + "\n"),
        ("latin1.toml", 'service_name = "caf\xe9"\n'),
    ],
)
def test_a_file_that_trips_its_decoder_is_refused_not_raised(tmp_path: Path, name: str, text: str) -> None:
    # Before: RecursionError escaped load_manifest_dirs (the watch task died; `edged run` exited 1).
    (tmp_path / name).write_bytes(text.encode("latin-1"))
    write(tmp_path, "good.toml", 'service_name = "good"\n')
    specs, errors = load_manifest_dirs([str(tmp_path)])
    assert [s.name for s in specs] == ["good"]
    assert len(errors) == 1 and errors[0].file == str(tmp_path / name)
    assert "nested too deeply" in str(errors[0]) or "UTF-8" in str(errors[0])


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    import tracemalloc

    import edged.document

    path = tmp_path / "big.toml"
    path.write_text('service_name = "big"\n')
    os.truncate(path, 100 * 2**20)  # 100 MB (sparse): reading it would take 100 MB at once
    tracemalloc.start()
    try:
        specs, errors = load_manifest_dirs([str(tmp_path)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert specs == [] and "104857600 bytes, over the limit of 1 MiB" in str(errors[0])
    assert peak < 2**20  # refused by its size before a byte was read
    assert edged.document.MAX_FILE_BYTES == 2**20


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_refused_with_its_reason(tmp_path: Path) -> None:
    path = write(tmp_path, "secret.toml", 'service_name = "s"\n')
    path.chmod(0)
    _, errors = load_manifest_dirs([str(tmp_path)])
    assert "cannot read: Permission denied" in str(errors[0])


def test_a_failed_listing_keeps_the_last_good_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a listing that failed (EMFILE under descriptor exhaustion) dropped every service of the folder.
    from edged.discovery.manifests import ManifestSource
    from edged.registry import Registry

    folder = tmp_path / "services.d"
    folder.mkdir()
    write(folder, "a.toml", 'service_name = "a"\n')
    write(folder, "b.toml", 'service_name = "b"\n')
    registry = Registry()
    source = ManifestSource(registry, [str(folder)])
    assert source.reload() == []
    assert sorted(n for _, n in registry.snapshot().services) == ["a", "b"]
    real_listdir = os.listdir

    def emfile(path):
        if str(path) == str(folder):
            raise OSError(24, "Too many open files")
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", emfile)
    errors = source.reload()
    assert "cannot list services dir: Too many open files" in str(errors[0])
    assert sorted(n for _, n in registry.snapshot().services) == ["a", "b"]
    monkeypatch.setattr(os, "listdir", real_listdir)
    (folder / "b.toml").unlink()
    assert source.reload() == []
    assert sorted(n for _, n in registry.snapshot().services) == ["a"]  # a good listing is the truth again
