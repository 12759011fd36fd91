"""Daemon config: defaults, the documented file, relative paths, tenants, and errors with file, line and key."""

from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import pytest

from edged.config import (
    SECTIONS,
    ApiConfig,
    Config,
    DemoConfig,
    NodeConfig,
    StateConfig,
    TenantConfig,
    embedded_config,
    find_config,
    load_config,
    parse_listen,
    user_paths,
)
from edged.document import toml_key_lines
from edged.errors import ConfigError

REPO = Path(__file__).parent.parent


def secret(path: Path, text: str) -> Path:
    """A file holding secrets, readable by its owner only (edged refuses world-readable ones)."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def write(folder: Path, text: str, name: str = "edged.toml") -> str:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def refused(folder: Path, text: str) -> ConfigError:
    path = write(folder, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == path
    return info.value


def test_empty_file_is_all_defaults(tmp_path):
    path = write(tmp_path, "")
    config = load_config(path)
    assert config == Config(path=path)
    assert config.node == NodeConfig(name=socket.gethostname(), fleet="home", zone="", location=None)
    assert (config.api.listen_host, config.api.listen_port) == ("127.0.0.1", 7700)
    assert config.api.socket == "/run/edged/edged.sock"
    assert (config.api.max_body, config.api.max_header) == (1024 * 1024, 64 * 1024)
    assert (config.ingress.listen_host, config.ingress.listen_port) == ("0.0.0.0", 7701)
    assert config.services.dirs == ("/etc/edged/services.d",)
    assert config.state.dir == "/var/lib/edged"
    assert config.mdns.enabled and config.mdns.interfaces == "all"
    assert not config.mqtt.enabled
    assert dict(config.tenants) == {"default": TenantConfig("default", open_on_loopback=True)}
    assert (config.log.level, config.log.format) == ("info", "json")
    assert config.demo.echo is False


def test_documented_config_equals_the_defaults():
    path = REPO / "config" / "edged.toml"
    config = load_config(str(path))
    assert config == Config(path=str(path))
    # every section of the contract is shown in the documented file
    sections = {key[0] for key in toml_key_lines(path.read_text())}
    assert sections == set(SECTIONS)


def test_every_key_set(tmp_path):
    secret(tmp_path / "garden.tokens", "# garden tokens\n\ng-one\n  g-two  \n")
    config = load_config(
        write(
            tmp_path,
            """
            [node]
            name = "pi-kitchen"
            fleet = "flat-3"
            zone = "kitchen"
            location = [52.52, 13]

            [api]
            listen = "[::1]:0"
            socket = ""
            socket_group = ""
            max_body = "2MiB"
            max_header = 8192
            drain_timeout = "0s"
            idle_timeout = "1m"

            [ingress]
            listen = "localhost:17701"

            [services]
            dirs = []
            reload_interval = "500ms"

            [state]
            dir = "/srv/edged"

            [mdns]
            enabled = false
            interfaces = ["127.0.0.1", "eth0"]

            [mqtt]
            enabled = true
            url = "mqtts://user:pw@broker.example:8883"
            topic_prefix = "acme/hubmesh"

            [tenants.default]
            open_on_loopback = false
            tokens = ["d-one"]

            [tenants.garden]
            tokens = ["g-one"]
            token_file = "garden.tokens"
            open_on_loopback = true

            [log]
            level = "debug"
            format = "text"

            [demo]
            echo = true
            """,
        )
    )
    assert config.node == NodeConfig(name="pi-kitchen", fleet="flat-3", zone="kitchen", location=(52.52, 13.0))
    assert config.api == ApiConfig(
        listen_host="::1",
        listen_port=0,
        socket=None,
        socket_group="",
        max_body=2 * 1024 * 1024,
        max_header=8192,
        drain_timeout=0.0,
        idle_timeout=60.0,
    )
    assert (config.ingress.listen_host, config.ingress.listen_port) == ("localhost", 17701)
    assert config.services.dirs == ()
    assert config.services.reload_interval == 0.5
    assert config.state == StateConfig(dir="/srv/edged")
    assert not config.mdns.enabled
    assert config.mdns.interfaces == ("127.0.0.1", "eth0")
    assert config.mqtt.enabled and config.mqtt.url.startswith("mqtts://")
    assert config.mqtt.topic_prefix == "acme/hubmesh"
    assert config.tenants["default"] == TenantConfig("default", frozenset({"d-one"}), open_on_loopback=False)
    assert config.tenants["garden"] == TenantConfig("garden", frozenset({"g-one", "g-two"}), open_on_loopback=True)
    assert (config.log.level, config.log.format) == ("debug", "text")
    assert config.demo == DemoConfig(echo=True)


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "tokens").mkdir()
    secret(folder / "tokens" / "home.txt", "h-one\n")
    path = write(
        folder,
        """
        [api]
        socket = "run/edged.sock"
        [services]
        dirs = ["services.d", "../more", "/abs/services.d"]
        [state]
        dir = "state"
        [tenants.home]
        token_file = "tokens/home.txt"
        """,
    )
    monkeypatch.chdir(tmp_path)  # the working folder must not matter
    config = load_config(os.path.relpath(path))
    assert config.path == path
    assert config.api.socket == str(folder / "run" / "edged.sock")
    assert config.services.dirs == (str(folder / "services.d"), str(tmp_path / "more"), "/abs/services.d")
    assert config.state.dir == str(folder / "state")
    assert config.tenants["home"].tokens == frozenset({"h-one"})
    assert config.tenants["home"].open_on_loopback is False
    assert config.tenants["default"].open_on_loopback is True  # "default" always exists


def test_unknown_key_has_line_and_suggestion(tmp_path):
    err = refused(tmp_path, '[api]\nlisten = "127.0.0.1:1"\n\nmax_bdy = "1MiB"\n')
    assert (err.line, err.key) == (4, "api.max_bdy")
    assert "did you mean 'max_body'" in err.message


def test_unknown_section(tmp_path):
    err = refused(tmp_path, '[node]\nfleet = "x"\n[cloud]\nurl = "x"\n')
    assert (err.line, err.key) == (3, "cloud")
    assert "unknown key 'cloud'" in err.message


def test_wrong_type_has_line(tmp_path):
    err = refused(tmp_path, "[mdns]\n# comment\nenabled = 1\n")
    assert (err.line, err.key) == (3, "mdns.enabled")
    assert "expected true or false, got an integer (1)" in err.message


@pytest.mark.parametrize(
    ("text", "key", "found"),
    [
        ("[api]\nmax_body = true", "api.max_body", "a boolean (true)"),
        ("[services]\nreload_interval = false", "services.reload_interval", "a boolean (false)"),
        ("[node]\nlocation = [true, 1.0]", "node.location[0]", "a boolean (true)"),
    ],
)
def test_bool_is_not_an_int(tmp_path, text, key, found):
    err = refused(tmp_path, text + "\n")
    assert (err.line, err.key) == (2, key)
    assert found in err.message


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[api]\nlisten = "7700"', "api.listen", "HOST:PORT"),
        ('[api]\nlisten = "127.0.0.1:70000"', "api.listen", "port 0..65535"),
        ('[api]\nlisten = "::1:7700"', "api.listen", "brackets"),
        ('[api]\nlisten = "[::g]:7700"', "api.listen", "not an IPv6 address"),
        ('[ingress]\nlisten = "300.1.1.1:7701"', "ingress.listen", "not an IPv4 address"),
        ('[api]\nmax_header = "lots"', "api.max_header", "expected a size"),
        ('[api]\nidle_timeout = "0s"', "api.idle_timeout", "> 0"),
        ('[api]\ndrain_timeout = "soon"', "api.drain_timeout", "expected a duration"),
        ("[api]\nsocket = '/" + "s" * 120 + "'", "api.socket", "107 bytes"),
        ('[node]\nname = "pi kitchen"', "node.name", "'pi kitchen'"),
        ("[node]\nlocation = [100, 0]", "node.location[0]", "from -90 to 90"),
        ("[node]\nlocation = [1]", "node.location", "[latitude, longitude]"),
        ('[services]\ndirs = "/etc/edged/services.d"', "services.dirs", "expected an array"),
        ("[services]\ndirs = [1]", "services.dirs[0]", "an integer (1)"),
        ('[mdns]\ninterfaces = "eth0"', "mdns.interfaces", '"all" or a list'),
        ("[mdns]\ninterfaces = []", "mdns.interfaces", "at least one"),
        ('[mqtt]\nurl = "http://broker:1883"', "mqtt.url", "mqtt://"),
        ('[mqtt]\nurl = "mqtt://broker:99999"', "mqtt.url", "port"),
        ('[mqtt]\ntopic_prefix = "hub/#"', "mqtt.topic_prefix", "no +, #"),
        ('[mqtt]\nurl = ["mqtt://a:1883", "http://b"]', "mqtt.url", "mqtt://"),
        ("[mqtt]\nurl = []", "mqtt.url", "1 to 8 broker URLs"),
        ('[mqtt]\nfollow = ["Thermo"]', "mqtt.follow[0]", "lower case only"),
        ('[mqtt]\nfollow = ["a.b.c"]', "mqtt.follow[0]", "tenant.service"),
        ('[log]\nlevel = "verbose"', "log.level", "'debug'"),
        ('[log]\nformat = "xml"', "log.format", "'json', 'text'"),
        ("[demo]\necho = 'yes'", "demo.echo", "expected true or false"),
        ("[tenants.Garden]", "tenants.Garden", "tenant name"),
        ('[tenants.garden]\ntokens = ["a b"]', "tenants.garden.tokens[0]", "no spaces"),
        ('[tenants.garden]\ntoken_file = "missing.txt"', "tenants.garden.token_file", "missing.txt"),
        ('[tenants.garden]\ntoken = "x"', "tenants.garden.token", "did you mean 'tokens'"),
        ("[tenants]\ngarden = 1", "tenants.garden", "expected a table"),
        ("node = 1", "node", "expected a table"),
    ],
)
def test_bad_values(tmp_path, text, key, words):
    err = refused(tmp_path, text + "\n")
    assert err.key == key
    assert words in err.message
    assert err.line == text.count("\n") + 1


def test_a_token_names_one_tenant(tmp_path):
    secret(tmp_path / "shared.txt", "t-1\nt-2\n")
    err = refused(
        tmp_path,
        """
        [tenants.default]
        tokens = ["t-2"]

        [tenants.garden]
        token_file = "shared.txt"
        """,
    )
    assert (err.line, err.key) == (5, "tenants.garden.token_file")
    assert "also a token of tenant 'default'" in err.message
    assert "t-2" not in err.message  # secrets stay out of logs


def test_bad_line_in_token_file_names_that_file(tmp_path):
    tokens = tmp_path / "t.txt"
    secret(tokens, "good\nbad token\n")
    path = write(tmp_path, '[tenants.x]\ntoken_file = "t.txt"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.line) == (str(tokens), 2)


def test_toml_syntax_error_has_line(tmp_path):
    err = refused(tmp_path, '[api]\nlisten = "127.0.0.1:1"\nsocket = \n')
    assert err.line == 3
    assert err.key is None
    assert "TOML syntax error" in err.message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "nope.toml"))


def test_parse_listen():
    assert parse_listen("127.0.0.1:7700") == ("127.0.0.1", 7700)
    assert parse_listen("[::1]:7700") == ("::1", 7700)
    assert parse_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    for bad in ("", ":7700", "127.0.0.1:", "127.0.0.1:x", "[::1]7700", "a b:1"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_embedded_config_runs_the_demo_with_usable_paths():
    config = embedded_config()
    assert config.path is None
    assert config.demo.echo is True
    assert config.tenants["default"].open_on_loopback is True
    assert config.api.socket is not None and config.api.socket.endswith("/edged.sock")
    assert os.path.isabs(config.state.dir) and config.state.dir.endswith("/edged")
    if os.access("/var/lib/edged" if os.path.isdir("/var/lib/edged") else "/var/lib", os.W_OK):
        assert config.state.dir == "/var/lib/edged"


def test_user_paths_fall_back_to_xdg_for_non_root():
    env = {"HOME": "/home/pi", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert user_paths(env, lambda path: False) == ("/home/pi/.local/state/edged", "/run/user/1000/edged/edged.sock")
    env = {"HOME": "/home/pi", "XDG_STATE_HOME": "/data/state", "XDG_RUNTIME_DIR": "relative/ignored"}
    assert user_paths(env, lambda path: False) == ("/data/state/edged", "/data/state/edged/edged.sock")
    assert user_paths(env, lambda path: True) == ("/var/lib/edged", "/run/edged/edged.sock")
    only_state = user_paths({"HOME": "/h"}, lambda path: path == "/var/lib/edged")
    assert only_state == ("/var/lib/edged", "/var/lib/edged/edged.sock")


def test_find_config(tmp_path):
    path = write(tmp_path, '[node]\nfleet = "lab"\n')
    assert find_config(path).node.fleet == "lab"
    with pytest.raises(ConfigError):
        find_config(str(tmp_path / "missing.toml"))
    fallback = find_config(None)
    if os.path.exists("/etc/edged/edged.toml"):
        assert fallback.path == "/etc/edged/edged.toml"
    else:
        assert fallback.path is None and fallback.demo.echo


def test_toml_key_lines_follow_tables_arrays_and_strings():
    lines = toml_key_lines(
        textwrap.dedent(
            '''
            a = """
            b = 1
            """
            [[x]]
            k = 1
            [[x]]
            "quoted.key" = 2
            [x.sub]
            list = [
              1,
              { c = 3 },
            ]
            '''
        )
    )
    assert lines[("a",)] == 2
    assert ("b",) not in lines  # inside a multi-line string
    assert lines[("x", 0, "k")] == 6
    assert lines[("x", 1, "quoted.key")] == 8
    assert lines[("x", 1, "sub", "list", 1)] == 12
    assert lines[("x", 1, "sub", "list", 1, "c")] == 12


def test_mqtt_url_may_list_brokers_in_order(tmp_path):
    text = '[mqtt]\nurl = ["mqtt://site:1883", "mqtts://central:8883"]\nfollow = ["thermo", "garden.pump", "*"]\n'
    mq = load_config(write(tmp_path, text)).mqtt
    assert mq.url == "mqtt://site:1883" and mq.urls == ("mqtt://site:1883", "mqtts://central:8883")
    assert mq.follow == ("thermo", "garden.pump", "*") and mq.switch_back == 30.0
    assert load_config(write(tmp_path, '[mqtt]\nurl = "mqtt://one"\n')).mqtt.urls == ("mqtt://one",)


def test_a_config_nested_too_deeply_is_a_refusal_not_a_crash(tmp_path):
    # Before: tomllib's RecursionError escaped load_config (`edged run` exited 1 with a traceback, not 78).
    path = tmp_path / "edged.toml"
    path.write_text("x = " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(str(path))


def test_bridge_tenants_default_to_the_default_tenant_only_and_are_checked(tmp_path):
    from edged.config import load_config

    path = tmp_path / "edged.toml"
    path.write_text('[node]\nname = "cloud-1"\n')
    assert dict(load_config(str(path)).bridge.tenants) == {"default": ("*",)}
    path.write_text('[node]\nname = "cloud-1"\n[bridge]\ntenants = { garden = ["spiffe://home/node/pi-*"] }\n')
    assert dict(load_config(str(path)).bridge.tenants) == {"garden": ("spiffe://home/node/pi-*",)}
    path.write_text('[node]\nname = "cloud-1"\n[bridge]\ntenants = { Garden = ["*"] }\n')
    with pytest.raises(ConfigError, match="tenant name"):
        load_config(str(path))


def test_mqtt_macs_is_on_by_default_and_can_be_turned_off_for_older_bridges(tmp_path):
    from edged.config import load_config

    path = tmp_path / "edged.toml"
    path.write_text('[node]\nname = "pi-1"\n')
    assert load_config(str(path)).mqtt.macs is True
    path.write_text('[node]\nname = "pi-1"\n[mqtt]\nmacs = false\n')
    assert load_config(str(path)).mqtt.macs is False
