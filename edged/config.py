"""Daemon config (`edged.toml`) as frozen values, read with the checked-document toolkit (`edged.document`).

Every key is optional. A bad value is refused with a `ConfigError` that names the file, the line and the
dotted key (`api.listen`), so a user can fix it without reading the code.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from edged.document import Doc, Table, describe, parse_toml, read_text, refusal, toml_locator
from edged.errors import ConfigError
from edged.model import DEFAULT_TENANT

SYSTEM_CONFIG = "/etc/edged/edged.toml"
KIB = 1024
MIB = 1024 * 1024

# The tables of edged.toml, in the order config/edged.toml documents them.
SECTIONS = (
    "node",
    "api",
    "ingress",
    "identity",
    "services",
    "state",
    "mdns",
    "mqtt",
    "vitals",
    "fleet",
    "bridge",
    "tenants",
    "access",
    "authz",
    "quotas",
    "limits",
    "log",
    "demo",
)

# --------------------------------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """`[node]`: who this box is and where it stands."""

    name: str = field(default_factory=socket.gethostname)
    fleet: str = "home"
    zone: str = ""
    location: tuple[float, float] | None = None  # latitude, longitude


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """`[api]`: the local API and call path (TCP on loopback and a Unix socket)."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 7700
    socket: str | None = "/run/edged/edged.sock"  # None: no Unix socket
    socket_group: str = "edged"
    max_body: int = 1 * MIB
    max_header: int = 64 * KIB
    drain_timeout: float = 10.0
    idle_timeout: float = 75.0


@dataclass(frozen=True, slots=True)
class IngressConfig:
    """`[ingress]`: where peers send edge calls."""

    enabled: bool = True
    listen_host: str = "0.0.0.0"
    listen_port: int = 7701
    insecure: bool = False  # plain HTTP, callers named by headers: labs and tests only (logged loudly)


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """`[identity]`: this node's fleet certificate (edged.identity) and how it is kept fresh."""

    dir: str = ""  # "" = {state.dir}/identity
    clock_skew: float = 20.0  # clock difference tolerated when checking certificates
    renew: bool = True  # renew online (edged fleet ca serve over [mqtt]) two thirds into the certificate's life


@dataclass(frozen=True, slots=True)
class ServicesConfig:
    """`[services]`: manifest folders and how often they are checked for changes."""

    dirs: tuple[str, ...] = ("/etc/edged/services.d",)
    reload_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class StateConfig:
    """`[state]`: what must survive a reboot with no network."""

    dir: str = "/var/lib/edged"


@dataclass(frozen=True, slots=True)
class MdnsConfig:
    """`[mdns]`: LAN discovery. `interfaces` is "all" or addresses / interface names."""

    enabled: bool = True
    interfaces: str | tuple[str, ...] = "all"
    resolve_interval: float = 1.0  # re-resolve known peers this often: zeroconf alone misses dead peers
    txt_min_interval: float = 10.0  # vitals in TXT change at most this often (no multicast storm)


@dataclass(frozen=True, slots=True)
class VitalsConfig:
    """`[vitals]`: how often this node reads its CPU, battery and link quality, and from where."""

    interval: float = 5.0
    proc_root: str = "/proc"  # CPU load and Wi-Fi signal; a container may mount the host's /proc elsewhere
    sys_root: str = "/sys"  # batteries and mains supplies (class/power_supply)


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """`[mqtt]`: the cloud tier's broker."""

    enabled: bool = False
    url: str = "mqtt://127.0.0.1:1883"  # the first broker of `url` (a list in the file: see `urls`)
    fallback_urls: tuple[str, ...] = ()  # the other brokers, tried in order when the ones before are down
    switch_back: float = 30.0  # while on a fallback broker, try the first one again this often
    follow: tuple[str, ...] = ()  # remote services to learn beyond those routed to the cloud ("*": all)
    topic_prefix: str = "hubmesh"
    protocol: str = "5"  # "5" or "3.1.1"
    client_id: str = ""  # default: edged-{node}
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: float = 15.0  # the broker sees a silent box dead after 1.5x this
    max_payload: int = 256 * KIB
    telemetry_interval: float = 60.0
    reconnect_max: float = 30.0
    announce_interval: float = 300.0  # re-post the retained online status at least this often
    offline_ttl: float = 3600.0  # forget the entries of a node that has not been live for this long
    signed: str = "auto"  # seal requests, answers and entries with the node identity: auto | required | off
    macs: bool = True  # signed requests and answers MAC'd per pair of nodes; false: ECDSA (bridges before 2026-12)

    @property
    def urls(self) -> tuple[str, ...]:
        """Every broker, in the order they are tried."""
        return (self.url, *self.fallback_urls)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """`[fleet]`: Ed25519 public keys (files) whose signatures fleet config documents must carry, and the
    oldest document (by `issued_at`) a node with no fleet config in its state still takes."""

    keys: tuple[str, ...] = ()
    max_age: float = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """`[bridge]`: the cloud side (`edged bridge`): shared-subscription group of the bridges, and `tenants`: for
    each tenant, the calling nodes (globs over `spiffe://FLEET/node/NODE`) that may act for it over this bridge.
    Unset, any node of the fleet may call in the default tenant and no node in another."""

    group: str = "edged-bridge"
    tenants: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({DEFAULT_TENANT: ("*",)})
    )


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """`[tenants.NAME]`: the bearer tokens that name this tenant, and whether loopback callers need none."""

    name: str
    tokens: frozenset[str] = frozenset()
    open_on_loopback: bool = False


@dataclass(frozen=True, slots=True)
class LogConfig:
    """`[log]`: level and format ("json" or "text")."""

    level: str = "info"
    format: str = "json"


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """`[demo]`: `echo = true` adds the built-in `echo` sample service."""

    echo: bool = False


def _default_tenants() -> Mapping[str, TenantConfig]:
    return MappingProxyType({DEFAULT_TENANT: TenantConfig(DEFAULT_TENANT, open_on_loopback=True)})


def _section(name: str) -> Any:
    """The defaults of a section whose values live in their own module (which imports this one)."""
    if name == "access":
        from edged.access import AccessConfig

        return AccessConfig()
    if name == "authz":
        from edged.authz import AuthzConfig

        return AuthzConfig()
    from edged.limits import Limits

    return Limits()


@dataclass(frozen=True, slots=True)
class Config:
    """The whole daemon config. `path` is the file it came from, None for the embedded default."""

    node: NodeConfig = field(default_factory=NodeConfig)
    api: ApiConfig = ApiConfig()
    ingress: IngressConfig = IngressConfig()
    identity: IdentityConfig = IdentityConfig()
    services: ServicesConfig = ServicesConfig()
    state: StateConfig = StateConfig()
    mdns: MdnsConfig = MdnsConfig()
    mqtt: MqttConfig = MqttConfig()
    vitals: VitalsConfig = VitalsConfig()
    fleet: FleetConfig = FleetConfig()
    bridge: BridgeConfig = BridgeConfig()
    tenants: Mapping[str, TenantConfig] = field(default_factory=_default_tenants)
    access: Any = field(default_factory=lambda: _section("access"))  # edged.access.AccessConfig
    authz: Any = field(default_factory=lambda: _section("authz"))  # edged.authz.AuthzConfig
    quotas: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # key -> model.QuotaSpec
    limits: Any = field(default_factory=lambda: _section("limits"))  # edged.limits.Limits
    log: LogConfig = LogConfig()
    demo: DemoConfig = DemoConfig()
    path: str | None = None
    secret_files: tuple[str, ...] = ()  # files holding tokens, passwords or keys (edged.toml with inline tokens)

    @property
    def identity_dir(self) -> str:
        """Where this node's key, certificate and trust bundle live (`[identity] dir`, else {state.dir}/identity)."""
        return self.identity.dir or os.path.join(self.state.dir, "identity")


# ------------------------------------------------------------------------------------------------ loading

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
LABEL_WHAT = "a lower-case name of a-z, 0-9 and '-' (at most 63 characters, no '-' at either end)"
_NODE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,62})")
_NODE_WHAT = "a name of letters, digits, '.', '_' and '-' (at most 63 characters)"
_TOPIC_PREFIX = re.compile(r"[^/+#\s]+(/[^/+#\s]+)*")
_TOKEN = re.compile(r"\S+")
# `[mqtt] follow`: a service (default tenant), tenant.service (DNS labels, as `service_key` writes them), or "*"
_FOLLOW = re.compile(r"\*|([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_BROKERS = 8  # `[mqtt] url` as a list
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "text")
_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes including the terminating NUL


def parse_listen(text: str) -> tuple[str, int]:
    """`"127.0.0.1:7700"`, `"[::1]:7700"` or `"localhost:7700"` -> (host, port); ValueError otherwise."""
    what = "expected HOST:PORT like '127.0.0.1:7700' or '[::1]:7700'"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what}; {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{what} (put IPv6 addresses in brackets), got {text!r}")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{what}; {host!r} is not an IPv4 address") from None
        elif not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{what}, got {text!r}")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError(f"{what} (port 0..65535), got {text!r}")
    return host, int(port)


def _check_mqtt_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"expected an mqtt:// or mqtts:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"expected an mqtt:// URL with a host, got {url!r}")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError:
        raise ValueError(f"expected an mqtt:// URL with a port 0..65535, got {url!r}") from None


class _Loader:
    """Builds a Config from one decoded TOML document."""

    def __init__(self, top: Table, base_dir: str):
        self.top = top
        self.base_dir = base_dir

    def resolve(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, path))

    def listen(self, t: Table, default: tuple[str, int]) -> tuple[str, int]:
        text = t.string("listen", None)
        if text is None:
            return default
        try:
            return parse_listen(text)
        except ValueError as exc:
            t.fail("listen", str(exc))

    def build(self, path: str | None) -> Config:
        top = self.top
        top.only(SECTIONS)
        self.secrets: list[str] = []
        config = Config(
            node=self.node(top.table("node")),
            api=self.api(top.table("api")),
            ingress=self.ingress(top.table("ingress")),
            identity=self.identity(top.table("identity")),
            services=self.services(top.table("services")),
            state=self.state(top.table("state")),
            mdns=self.mdns(top.table("mdns")),
            mqtt=self.mqtt(top.table("mqtt")),
            vitals=self.vitals(top.table("vitals")),
            fleet=self.fleet(top.table("fleet")),
            bridge=self.bridge(top.table("bridge")),
            tenants=self.tenants(top.table("tenants")),
            access=self.access(top.table("access")),
            authz=self.authz(top.table("authz")),
            quotas=self.quotas(top.table("quotas")),
            limits=self.limits(top.table("limits")),
            log=self.log(top.table("log")),
            demo=self.demo(top.table("demo")),
            path=path,
        )
        if path is not None and any(t.tokens for t in self.inline_tokens):
            self.secrets.insert(0, path)
        return replace(config, secret_files=tuple(self.secrets))

    def secret_file(self, t: Table, key: str, path: str) -> None:
        """Note a file that holds a secret; refuse it when every user may read it (ssh refuses such keys)."""
        self.secrets.append(path)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            return  # missing: the part that reads it says so
        if mode & stat.S_IROTH:
            t.fail(key, f"{path} holds a secret and every user may read it (mode {mode:04o}): chmod o-rwx {path}")

    def node(self, t: Table) -> NodeConfig:
        t.only(("name", "fleet", "zone", "location"))
        location = None
        if t.has("location"):
            loc = t.array("location")
            if len(loc) != 2:
                t.fail("location", f"expected [latitude, longitude], got an array of {len(loc)}")
            location = (loc.number(0, lo=-90, hi=90), loc.number(1, lo=-180, hi=180))
        return NodeConfig(
            name=t.string("name", socket.gethostname(), pattern=_NODE_NAME, what=_NODE_WHAT),
            fleet=t.string("fleet", "home", pattern=_NODE_NAME, what=_NODE_WHAT),
            zone=t.string("zone", "", pattern=_NODE_NAME, what=_NODE_WHAT, allow_empty=True),
            location=location,
        )

    def api(self, t: Table) -> ApiConfig:
        t.only(("listen", "socket", "socket_group", "max_body", "max_header", "drain_timeout", "idle_timeout"))
        d = ApiConfig()
        host, port = self.listen(t, (d.listen_host, d.listen_port))
        sock = t.string("socket", d.socket, what="a Unix socket path ('' for none)", allow_empty=True)
        if sock:
            sock = self.resolve(sock)
            if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
                t.fail("socket", f"a Unix socket path has at most {_MAX_SOCKET_PATH} bytes, got {sock!r}")
        return ApiConfig(
            listen_host=host,
            listen_port=port,
            socket=sock or None,
            socket_group=t.string("socket_group", d.socket_group, allow_empty=True),
            max_body=t.size("max_body", d.max_body),
            max_header=t.size("max_header", d.max_header),
            drain_timeout=t.duration("drain_timeout", d.drain_timeout, positive=False),
            idle_timeout=t.duration("idle_timeout", d.idle_timeout),
        )

    def ingress(self, t: Table) -> IngressConfig:
        t.only(("enabled", "listen", "insecure"))
        d = IngressConfig()
        host, port = self.listen(t, (d.listen_host, d.listen_port))
        return IngressConfig(
            enabled=t.boolean("enabled", d.enabled),
            listen_host=host,
            listen_port=port,
            insecure=t.boolean("insecure", d.insecure),
        )

    def identity(self, t: Table) -> IdentityConfig:
        t.only(("dir", "clock_skew", "renew"))
        d = IdentityConfig()
        folder = t.string("dir", None, what="a folder path")
        return IdentityConfig(
            dir=d.dir if folder is None else self.resolve(folder),
            clock_skew=t.duration("clock_skew", d.clock_skew, positive=False),
            renew=t.boolean("renew", d.renew),
        )

    def services(self, t: Table) -> ServicesConfig:
        t.only(("dirs", "reload_interval"))
        d = ServicesConfig()
        dirs = t.strings("dirs", None, what="a folder path")
        return ServicesConfig(
            dirs=d.dirs if dirs is None else tuple(self.resolve(p) for p in dirs),
            reload_interval=t.duration("reload_interval", d.reload_interval),
        )

    def state(self, t: Table) -> StateConfig:
        t.only(("dir",))
        value = t.string("dir", None, what="a folder path")
        return StateConfig() if value is None else StateConfig(dir=self.resolve(value))

    def mdns(self, t: Table) -> MdnsConfig:
        t.only(("enabled", "interfaces", "resolve_interval", "txt_min_interval"))
        d = MdnsConfig()
        interfaces: str | tuple[str, ...] = "all"
        what = '"all" or a list of addresses / interface names'
        if t.has("interfaces"):
            value = t.get("interfaces")
            if isinstance(value, (list, tuple)):
                interfaces = t.strings("interfaces", what="an address or interface name")
                if not interfaces:
                    t.fail("interfaces", "expected at least one address or interface name (use enabled = false)")
            elif value != "all":
                t.fail("interfaces", f"expected {what}, got {describe(value)}")
        return MdnsConfig(
            enabled=t.boolean("enabled", True),
            interfaces=interfaces,
            resolve_interval=t.duration("resolve_interval", d.resolve_interval),
            txt_min_interval=t.duration("txt_min_interval", d.txt_min_interval, positive=False),
        )

    def vitals(self, t: Table) -> VitalsConfig:
        t.only(("interval", "proc_root", "sys_root"))
        d = VitalsConfig()
        proc_root = t.string("proc_root", None, what="a folder path")
        sys_root = t.string("sys_root", None, what="a folder path")
        return VitalsConfig(
            interval=t.duration("interval", d.interval),
            proc_root=d.proc_root if proc_root is None else self.resolve(proc_root),
            sys_root=d.sys_root if sys_root is None else self.resolve(sys_root),
        )

    def fleet(self, t: Table) -> FleetConfig:
        t.only(("keys", "max_age"))
        keys = t.strings("keys", (), what="a public key file path")
        max_age = t.duration("max_age", FleetConfig().max_age)
        return FleetConfig(keys=tuple(self.resolve(k) for k in keys), max_age=max_age)

    def bridge(self, t: Table) -> BridgeConfig:
        t.only(("group", "tenants"))
        group = t.string("group", BridgeConfig().group, pattern=_NODE_NAME, what=_NODE_WHAT)
        if "tenants" not in t.data:
            return BridgeConfig(group=group)
        tt = t.table("tenants")
        tenants = {}
        for name in tt.names():
            if not _LABEL.fullmatch(name):
                tt.fail(name, f"expected a tenant name: {LABEL_WHAT}, got {name!r}")
            tenants[name] = tuple(tt.strings(name, what="a glob over spiffe://FLEET/node/NODE"))
        return BridgeConfig(group=group, tenants=MappingProxyType(tenants))

    def mqtt(self, t: Table) -> MqttConfig:
        t.only(
            (
                "enabled",
                "url",
                "topic_prefix",
                "protocol",
                "client_id",
                "username",
                "password_file",
                "ca_file",
                "cert_file",
                "key_file",
                "keepalive",
                "max_payload",
                "telemetry_interval",
                "reconnect_max",
                "announce_interval",
                "offline_ttl",
                "signed",
                "macs",
                "switch_back",
                "follow",
            )
        )
        d = MqttConfig()
        what = "an mqtt:// or mqtts:// URL"
        if isinstance(t.get("url", None), list):
            urls = t.strings("url", what=what)
            if not urls or len(urls) > MAX_BROKERS:
                t.fail("url", f"expected 1 to {MAX_BROKERS} broker URLs, got {len(urls)}")
        else:
            urls = (t.string("url", d.url, what=what),)
        for url in urls:
            try:
                _check_mqtt_url(url)
            except ValueError as exc:
                t.fail("url", str(exc))
        follow = t.strings("follow", (), pattern=_FOLLOW, what="a service name, tenant.service, or *")
        prefix = t.string("topic_prefix", d.topic_prefix, pattern=_TOPIC_PREFIX, what="an MQTT topic prefix (no +, #)")
        files = {}
        for key in ("password_file", "ca_file", "cert_file", "key_file"):
            value = t.string(key, None, what="a file path")
            files[key] = None if value is None else self.resolve(value)
            if files[key] is not None and key in ("password_file", "key_file"):
                self.secret_file(t, key, files[key])
        return MqttConfig(
            enabled=t.boolean("enabled", d.enabled),
            url=urls[0],
            fallback_urls=tuple(urls[1:]),
            switch_back=t.duration("switch_back", d.switch_back),
            follow=tuple(dict.fromkeys(follow)),
            topic_prefix=prefix,
            protocol=t.choice("protocol", d.protocol, ("5", "3.1.1")),
            client_id=t.string("client_id", d.client_id, allow_empty=True),
            username=t.string("username", None),
            keepalive=t.duration("keepalive", d.keepalive),
            max_payload=t.size("max_payload", d.max_payload),
            telemetry_interval=t.duration("telemetry_interval", d.telemetry_interval),
            reconnect_max=t.duration("reconnect_max", d.reconnect_max),
            announce_interval=t.duration("announce_interval", d.announce_interval),
            offline_ttl=t.duration("offline_ttl", d.offline_ttl),
            signed=t.choice("signed", d.signed, ("auto", "required", "off")),
            macs=t.boolean("macs", d.macs),
            **files,
        )

    def tenants(self, t: Table) -> Mapping[str, TenantConfig]:
        result: dict[str, TenantConfig] = {}
        owner: dict[str, str] = {}  # token -> tenant: one token must name one tenant
        self.inline_tokens: list[TenantConfig] = []
        for name in t.names():
            if not _LABEL.fullmatch(name):
                t.fail(name, f"expected a tenant name: {LABEL_WHAT}, got {name!r}")
            tt = t.table(name)
            tt.only(("tokens", "token_file", "open_on_loopback"))
            tokens = [(tok, "tokens") for tok in tt.strings("tokens", (), pattern=_TOKEN, what="a token (no spaces)")]
            if tokens:
                self.inline_tokens.append(TenantConfig(name, frozenset(tok for tok, _ in tokens)))
            token_file = tt.string("token_file", None, what="a file path")
            if token_file is not None:
                tokens += [(tok, "token_file") for tok in self.read_tokens(tt, self.resolve(token_file))]
            for token, key in tokens:
                if owner.setdefault(token, name) != name:
                    tt.fail(key, f"a token of tenant {name!r} is also a token of tenant {owner[token]!r}")
            result[name] = TenantConfig(
                name=name,
                tokens=frozenset(tok for tok, _ in tokens),
                open_on_loopback=tt.boolean("open_on_loopback", name == DEFAULT_TENANT),
            )
        result.setdefault(DEFAULT_TENANT, TenantConfig(DEFAULT_TENANT, open_on_loopback=True))
        return MappingProxyType(result)

    def access(self, t: Table) -> Any:
        from edged.access import load_access  # it imports this module

        return load_access(t, self.read_tokens, self.resolve)

    def authz(self, t: Table) -> Any:
        from edged.authz import load_authz

        return load_authz(t)

    def quotas(self, t: Table) -> Any:
        from edged.quota import load_quotas

        return load_quotas(t)

    def limits(self, t: Table) -> Any:
        from edged.limits import load_limits

        return load_limits(t)

    def read_tokens(self, t: Table, path: str) -> list[str]:
        """One token a line; blank lines and `#` comments skipped. Refused when every user may read it."""
        self.secret_file(t, "token_file", path)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            t.fail("token_file", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
        tokens = []
        for n, raw in enumerate(lines, 1):
            token = raw.strip()
            if not token or token.startswith("#"):
                continue
            if not _TOKEN.fullmatch(token):
                raise ConfigError(path, "expected one token a line (no spaces)", line=n)
            tokens.append(token)
        return tokens

    def log(self, t: Table) -> LogConfig:
        t.only(("level", "format"))
        return LogConfig(level=t.choice("level", "info", LOG_LEVELS), format=t.choice("format", "json", LOG_FORMATS))

    def demo(self, t: Table) -> DemoConfig:
        t.only(("echo",))
        return DemoConfig(echo=t.boolean("echo", False))


def secret_file_warnings(config: Config) -> list[str]:
    """Files holding secrets that users other than the daemon and the file's owner may read, one line each.

    World-readable token, password and key files are refused when the config loads; this also covers
    edged.toml with inline tokens and group-readable files whose group has other members (the API socket's
    group `edged` has its users as members: they should call the API, not read its tokens).
    """
    warnings = []
    for path in config.secret_files:
        try:
            st = os.stat(path)
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IROTH:
            warnings.append(f"{path} holds secrets and every user may read it (mode {mode:04o}): chmod o-rwx {path}")
        elif mode & stat.S_IRGRP:
            readers = _group_readers(st.st_gid) - {_user_name(st.st_uid), _user_name(os.geteuid())}
            if readers:
                group = _group_name(st.st_gid)
                warnings.append(
                    f"{path} holds secrets and group {group} may read it (mode {mode:04o}; members: "
                    f"{', '.join(sorted(readers))}): give it to the daemon's user alone (chown edged {path}; "
                    f"chmod 0600 {path}) or move tokens and passwords to such a file"
                )
    return warnings


def _group_readers(gid: int) -> set[str]:
    """Users in group `gid`: its listed members and those whose primary group it is, but for the group's
    namesake (a user-private group: the daemon's own `edged` user)."""
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return set()
    users = set(group.gr_mem) | {u.pw_name for u in pwd.getpwall() if u.pw_gid == gid}
    return users - {group.gr_name}


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def load_config(path: str) -> Config:
    """Read and check a daemon config file; ConfigError names the file, line and key of the first problem."""
    text = read_text(path)
    try:
        data = parse_toml(text, path)
        absolute = os.path.abspath(path)
        top = Table(Doc(path, toml_locator(text)), data)
        return _Loader(top, os.path.dirname(absolute)).build(absolute)
    except Exception as exc:  # a nesting too deep for tomllib, or a check that trips: still a refusal
        raise refusal(path, exc) from None


def _usable_dir(path: str) -> bool:
    """Whether this process can use `path` as its folder: writable if it exists, else a writable parent."""
    if os.path.isdir(path):
        return os.access(path, os.W_OK | os.X_OK)
    if os.path.lexists(path):
        return False
    parent = os.path.dirname(path.rstrip("/"))
    return os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)


def user_paths(env: Mapping[str, str], usable: Callable[[str], bool] = _usable_dir) -> tuple[str, str]:
    """(state dir, API socket path) for this process: the system ones when usable, else per-user ones (XDG)."""
    state_default, run_default = StateConfig().dir, os.path.dirname(ApiConfig().socket or "/run/edged/edged.sock")
    if usable(state_default):
        state = state_default
    else:
        xdg = env.get("XDG_STATE_HOME", "")
        home = env.get("HOME") or os.path.expanduser("~")
        state = os.path.join(xdg if os.path.isabs(xdg) else os.path.join(home, ".local", "state"), "edged")
    if usable(run_default):
        sock = os.path.join(run_default, "edged.sock")
    else:
        runtime = env.get("XDG_RUNTIME_DIR", "")
        sock = (
            os.path.join(runtime, "edged", "edged.sock")
            if os.path.isabs(runtime)
            else os.path.join(state, "edged.sock")
        )
    return state, sock


def embedded_config() -> Config:
    """The config used when there is no file: defaults, the demo echo service, and paths this user can write."""
    state, sock = user_paths(os.environ)
    return Config(api=ApiConfig(socket=sock), state=StateConfig(dir=state), demo=DemoConfig(echo=True), path=None)


def find_config(explicit: str | None) -> Config:
    """The explicit file, else /etc/edged/edged.toml when present, else the embedded default."""
    if explicit:
        return load_config(explicit)
    if os.path.exists(SYSTEM_CONFIG):
        return load_config(SYSTEM_CONFIG)
    return embedded_config()
