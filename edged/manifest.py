"""Service manifests (`services.d/*.toml|json|yaml|yml`): decoding and validation into `ServiceSpec` values.

One manifest declares one service. A bad manifest is refused with a `ConfigError` naming its file, line and
dotted key (`endpoints[1].url`, 0-based indices), saying what was expected and what was found.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import yaml

from edged import locality
from edged.authz import ID_GLOB, ID_GLOB_WHAT
from edged.config import LABEL_WHAT
from edged.document import (
    REQUIRED,
    Doc,
    KeyPath,
    Locate,
    Table,
    describe,
    dotted,
    format_seconds,
    parse_toml,
    prefix_locator,
    read_text,
    refusal,
    toml_locator,
)
from edged.errors import ConfigError
from edged.methods import MAX_METHODS
from edged.model import (
    DEFAULT_TENANT,
    LEVELS,
    STRATEGIES,
    TIERS,
    EndpointSpec,
    HealthCheckSpec,
    InterfaceSpec,
    MethodRule,
    PolicySpec,
    ServiceSpec,
    parse_target,
)
from edged.quota import load_quota, quota_dict
from edged.routes import POLICY_KEYS as ROUTING_KEYS
from edged.routes import parse_labels, parse_routing, routing_dict

MANIFEST_EXTENSIONS = (".toml", ".json", ".yaml", ".yml")

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# DNS-SD service type: RFC 6335 names have at most 15 characters
_SERVICE_TYPE = re.compile(r"(_[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?\._(?:tcp|udp))(\.local\.?)?")
_SERVICE_TYPE_WHAT = "a DNS-SD type like '_thermo._tcp' (name of at most 15 characters; _tcp or _udp)"
_TOP_KEYS = (
    "service_name",
    "tenant",
    "priority",
    "interface_definition",
    "endpoint_types",
    "advertise",
    "endpoints",
    "health_check",
    "policy",
    "registration",
)
_CHECK_KINDS = ("http", "tcp", "command", "ttl")


# ------------------------------------------------------------------------------------------------ public


def parse_manifest(path: str) -> ServiceSpec:
    """Read, decode (by extension) and validate one manifest file."""
    return _parse_file(path)[0]


def parse_manifest_data(
    data: object,
    source: str,
    *,
    base_dir: str | None = None,
    locate: Locate | None = None,
) -> ServiceSpec:
    """Validate an already-decoded manifest (a file's content or a registration body).

    `source` names it in errors and becomes `ServiceSpec.source`; `base_dir` is the folder a `.proto` path is
    relative to (without it a proto interface is refused); `locate(key_path) -> line` attaches line numbers.
    """
    doc = Doc(source, locate)
    if not isinstance(data, Mapping):
        raise doc.error((), f"a manifest must be a table of keys, got {describe(data)}")
    top = Table(doc, data)
    top.only(_TOP_KEYS)
    name = top.string("service_name", REQUIRED, pattern=_LABEL, what=LABEL_WHAT)
    tenant = top.string("tenant", DEFAULT_TENANT, pattern=_LABEL, what=LABEL_WHAT)
    priority = top.integer("priority", 10, lo=0)
    advertise = _service_type(top, "advertise")
    interface = _interface(top, base_dir) if top.has("interface_definition") else None
    endpoints = _endpoints(top)
    return ServiceSpec(
        name=name,
        tenant=tenant,
        priority=priority,
        interface=interface,
        endpoint_types=_endpoint_types(top, endpoints),
        endpoints=endpoints,
        health_check=_health_check(top.table("health_check")) if top.has("health_check") else None,
        policy=_policy(top.table("policy")),
        advertise=advertise,
        source=source,
        registration_min_priority=_registration(top.table("registration")),
    )


def _registration(t: Table) -> int | None:
    """`[registration]`: how registered endpoints may rank in this service (default: after every declared one)."""
    t.only(("min_priority",))
    return t.integer("min_priority", None, lo=0)


def load_manifest_dirs(dirs: Sequence[str]) -> tuple[list[ServiceSpec], list[ConfigError]]:
    """Every manifest of `dirs` (sorted, non-recursive): the good specs, and an error for each bad file.

    A missing folder is not an error. A second manifest for the same (tenant, service_name) is refused.
    """
    specs: list[ServiceSpec] = []
    errors: list[ConfigError] = []
    owner: dict[tuple[str, str], str] = {}
    for path in _manifest_files(dirs, errors):
        try:
            spec, locate = _parse_file(path)
        except Exception as exc:  # whatever a file does to a decoder, it is that file's refusal
            errors.append(refusal(path, exc))
            continue
        first = owner.setdefault(spec.key, path)
        if first != path:
            message = f"service {spec.name!r} of tenant {spec.tenant!r} is already defined in {first}"
            errors.append(ConfigError(path, message, line=locate(("service_name",)), key="service_name"))
            continue
        specs.append(spec)
    return specs, errors


def dirs_signature(dirs: Sequence[str]) -> tuple:
    """Cheap change detection: (path, mtime_ns, size) of each manifest and `.proto` file in `dirs`."""
    out = []
    for directory in _unique_dirs(dirs):
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        except OSError as exc:
            out.append((directory, "unreadable", exc.errno or 0))
            continue
        for name in names:
            if _is_candidate(name, (*MANIFEST_EXTENSIONS, ".proto")):
                path = os.path.join(directory, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                out.append((path, st.st_mtime_ns, st.st_size))
    return tuple(out)


# ------------------------------------------------------------------------------------------------ files


def _unique_dirs(dirs: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for directory in dirs:
        real = os.path.realpath(directory)
        if real not in seen:
            seen.add(real)
            out.append(directory)
    return out


def _is_candidate(name: str, extensions: Sequence[str]) -> bool:
    # hidden files, editor locks and autosaves (.#x, #x#) are never manifests; backups (x~, x.bak) fail the extension
    if name.startswith((".", "#")):
        return False
    return name.lower().endswith(tuple(extensions))


def _manifest_files(dirs: Sequence[str], errors: list[ConfigError]) -> list[str]:
    files = []
    for directory in _unique_dirs(dirs):
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            errors.append(ConfigError(directory, "services dir is not a folder"))
            continue
        except OSError as exc:
            errors.append(ConfigError(directory, f"cannot list services dir: {exc.strerror or exc}"))
            continue
        for name in names:
            path = os.path.join(directory, name)
            if _is_candidate(name, MANIFEST_EXTENSIONS) and os.path.isfile(path):
                files.append(path)
    return files


def _parse_file(path: str) -> tuple[ServiceSpec, Locate]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in MANIFEST_EXTENSIONS:
        raise ConfigError(path, f"unsupported manifest type {ext!r}; expected .toml, .json, .yaml or .yml")
    text = read_text(path)
    if ext == ".toml":
        data: object = parse_toml(text, path)
        locate = toml_locator(text)
    elif ext == ".json":
        data, locate = _decode_json(text, path)
    else:
        data, locate = _decode_yaml(text, path)
    base_dir = os.path.dirname(os.path.abspath(path))
    return parse_manifest_data(data, path, base_dir=base_dir, locate=locate), locate


def _decode_json(text: str, path: str) -> tuple[object, Locate]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(path, f"JSON syntax error: {exc.msg} (column {exc.colno})", line=exc.lineno) from None
    except RecursionError:
        raise ConfigError(path, "JSON nested too deeply") from None
    lines, duplicates = _json_key_lines(text)
    _refuse_duplicates(path, duplicates)
    return data, prefix_locator(lines)


def _refuse_duplicates(path: str, duplicates: list[tuple[KeyPath, int]]) -> None:
    # json.loads and yaml keep the last of two equal keys without a word; TOML refuses them, and so do we
    if duplicates:
        key, line = duplicates[0]
        raise ConfigError(path, f"duplicate key {key[-1]!r}", line=line, key=dotted(key))


def _decode_yaml(text: str, path: str) -> tuple[object, Locate]:
    import yaml  # only boxes with YAML manifests pay for it

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        column = f" (column {mark.column + 1})" if mark else ""
        line = mark.line + 1 if mark else None
        raise ConfigError(path, f"YAML syntax error: {problem}{context}{column}", line=line) from None
    except RecursionError:
        raise ConfigError(path, "YAML nested too deeply") from None
    except (yaml.YAMLError, ValueError) as exc:  # e.g. a timestamp with month 13
        raise ConfigError(path, f"YAML error: {exc}") from None
    finally:
        loader.dispose()
    lines: dict[KeyPath, int] = {}
    duplicates: list[tuple[KeyPath, int]] = []
    if node is not None:
        _yaml_lines(node, (), lines, duplicates, set())
    _refuse_duplicates(path, duplicates)
    return data, prefix_locator(lines)


def _yaml_lines(
    node: yaml.Node,
    path: KeyPath,
    lines: dict[KeyPath, int],
    duplicates: list[tuple[KeyPath, int]],
    active: set[int],
) -> None:
    """Record the line of each mapping key and sequence item under `node`, and keys given twice."""
    import yaml

    if id(node) in active:  # an alias that contains itself
        return
    lines.setdefault(path, node.start_mark.line + 1)
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        here: set[str] = set()
        for key, value in node.value:
            sub = (*path, str(key.value))
            if sub[-1] in here:
                duplicates.append((sub, key.start_mark.line + 1))
            here.add(sub[-1])
            lines.setdefault(sub, key.start_mark.line + 1)
            _yaml_lines(value, sub, lines, duplicates, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _yaml_lines(item, (*path, index), lines, duplicates, active)
    active.discard(id(node))


_JSON_WS = re.compile(r"[ \t\r\n]*")
_JSON_SCALAR = re.compile(r"[^,\]}\s]*")


def _json_key_lines(text: str) -> tuple[dict[KeyPath, int], list[tuple[KeyPath, int]]]:
    """Line (1-based) of each member and element of a JSON text that `json.loads` accepted, by key path;
    and the keys given twice in one object."""
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    lines: dict[KeyPath, int] = {}
    duplicates: list[tuple[KeyPath, int]] = []

    def line(pos: int) -> int:
        return bisect.bisect_right(starts, pos)

    def ws(pos: int) -> int:
        return _JSON_WS.match(text, pos).end()  # type: ignore[union-attr]

    def value(pos: int, path: KeyPath) -> int:
        pos = ws(pos)
        c = text[pos : pos + 1]
        if c == "{":
            pos = ws(pos + 1)
            here: set[str] = set()
            while text[pos : pos + 1] == '"':
                key, end = json.decoder.scanstring(text, pos + 1)
                if key in here:
                    duplicates.append(((*path, key), line(pos)))
                here.add(key)
                lines.setdefault((*path, key), line(pos))
                pos = ws(end)
                pos = value(pos + 1, (*path, key))  # past ':'
                pos = ws(pos)
                if text[pos : pos + 1] == ",":
                    pos = ws(pos + 1)
            return pos + 1  # past '}'
        if c == "[":
            pos = ws(pos + 1)
            index = 0
            while text[pos : pos + 1] not in ("]", ""):
                lines[(*path, index)] = line(pos)
                pos = ws(value(pos, (*path, index)))
                if text[pos : pos + 1] == ",":
                    pos = ws(pos + 1)
                index += 1
            return pos + 1
        if c == '"':
            return json.decoder.scanstring(text, pos + 1)[1]
        return _JSON_SCALAR.match(text, pos).end()  # type: ignore[union-attr]

    # best effort: lines are a courtesy, never a crash
    with contextlib.suppress(ValueError, IndexError, RecursionError):
        value(0, ())
    return lines, duplicates


# ------------------------------------------------------------------------------------------------ fields


def _service_type(t: Table, key: str) -> str | None:
    """A DNS-SD type (`_thermo._tcp`; a `.local.` suffix is accepted and dropped)."""
    value = t.string(key, None, what=_SERVICE_TYPE_WHAT)
    if value is None:
        return None
    m = _SERVICE_TYPE.fullmatch(value)
    if not m:
        t.fail(key, f"expected {_SERVICE_TYPE_WHAT}, got {value!r}")
    return m.group(1)


def _interface(top: Table, base_dir: str | None) -> InterfaceSpec:
    t = top.table("interface_definition")
    t.only(("version", "methods", "proto", "service"))
    version = t.string("version", None)
    if t.has("proto"):
        if t.has("methods"):
            t.fail("methods", "give either methods or proto, not both")
        return _proto_interface(t, version, base_dir)
    if t.has("service"):
        t.fail("service", 'service names a service of a .proto file: add proto = "file.proto", or list methods')
    if not t.has("methods") and version is None:
        t.fail(None, 'expected methods = ["GET /path", ...] or proto = "file.proto"')
    methods = t.array("methods", [])
    if len(methods) > MAX_METHODS:
        t.fail("methods", f"at most {MAX_METHODS} methods, got {len(methods)}")
    rules = []
    for i in range(len(methods)):
        text = methods.string(i, what="a method like 'GET /readings'")
        try:
            rules.append(MethodRule.parse(text))
        except ValueError as exc:
            methods.fail(i, str(exc))
    return InterfaceSpec(version=version, methods=tuple(rules), source="inline")


class _ProtoSyntaxError(Exception):
    def __init__(self, line: int, column: int, msg: str):
        super().__init__(msg)
        self.line, self.column, self.msg = line, column, msg


def _quiet(recognizer: Any) -> None:
    """ANTLR only prints syntax errors by default; the first one must stop the parse instead."""
    from antlr4.error.ErrorListener import ErrorListener

    class RaiseOnSyntaxError(ErrorListener):
        def syntaxError(self, recognizer, offendingSymbol, line, column, msg, e):  # ANTLR's names
            raise _ProtoSyntaxError(line, column, msg)

    recognizer.removeErrorListeners()
    recognizer.addErrorListener(RaiseOnSyntaxError())


def _proto_interface(t: Table, version: str | None, base_dir: str | None) -> InterfaceSpec:
    """Methods from a .proto service, as gRPC paths: `POST /package.Service/Method`."""
    # Imported here: the parser (ANTLR) costs 4 MiB of RSS that a box without .proto manifests never needs.
    from proto_schema_parser import ast as proto_ast
    from proto_schema_parser.parser import Parser as ProtoParser

    proto = t.string("proto", what="a .proto file path")
    if base_dir is None:  # a registration body must not make the daemon read (and quote) files
        t.fail("proto", "a .proto interface needs a manifest file; list methods instead")
    path = os.path.normpath(os.path.join(base_dir, proto))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        t.fail("proto", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
    try:
        parsed = ProtoParser(setup_lexer=_quiet, setup_parser=_quiet).parse(text)
    except _ProtoSyntaxError as exc:
        where = f"interface_definition.proto of {t.doc.file}"
        raise ConfigError(
            path, f"proto syntax error: {exc.msg} (column {exc.column + 1}; {where})", line=exc.line
        ) from None
    except Exception as exc:  # the AST builder may trip on input the grammar let through
        raise ConfigError(path, f"cannot read the proto file: {exc}") from None
    package = next((e.name for e in parsed.file_elements if isinstance(e, proto_ast.Package)), None)
    services = {e.name: e for e in parsed.file_elements if isinstance(e, proto_ast.Service)}
    has = ", ".join(services) or "none"
    name = t.string("service", None, what="a service name of the .proto file")
    if name is None:
        if len(services) != 1:
            t.fail("proto", f'{proto} has {len(services)} services ({has}): name one with service = "..."')
        name = next(iter(services))
    if name not in services:
        t.fail("service", f"no service {name!r} in {proto}; it has: {has}")
    prefix = f"{package}.{name}" if package else name
    methods = [e.name for e in services[name].elements if isinstance(e, proto_ast.Method)]
    if not methods:
        t.fail("service", f"service {name!r} in {proto} declares no rpc methods")
    rules = tuple(MethodRule.parse(f"POST /{prefix}/{m}") for m in methods)
    return InterfaceSpec(version=version, methods=rules, source=path)


def _endpoints(top: Table) -> tuple[EndpointSpec, ...]:
    if not top.has("endpoints"):
        return ()
    arr = top.array("endpoints")
    out: list[EndpointSpec] = []
    seen: dict[tuple[str, str], int] = {}
    for i in range(len(arr)):
        t = arr.table(i)
        t.only(("type", "url", "mdns", "priority", "weight", "labels"))
        tier = t.choice("type", REQUIRED, TIERS)
        url = t.string("url", None, what="a URL (http://, https:// or unix:/path)")
        mdns = _service_type(t, "mdns")
        if tier == "local":
            if mdns is not None:
                t.fail("mdns", "a local endpoint has a url, not mdns")
            if url is None:
                t.fail("url", 'missing: a local endpoint needs url = "http://127.0.0.1:PORT" or "unix:/path.sock"')
        elif tier == "edge":
            if url is not None and mdns is not None:
                t.fail("mdns", "an edge endpoint has either url or mdns, not both")
            if url is None and mdns is None:
                t.fail(None, 'an edge endpoint needs url = "http://HOST:PORT" or mdns = "_name._tcp"')
        else:
            for key in ("url", "mdns"):
                if t.has(key):
                    t.fail(key, f"a cloud endpoint is reached over MQTT: it takes no {key}")
        if url is not None:
            try:
                parse_target(url)
            except ValueError as exc:
                t.fail("url", str(exc))
        identity = (tier, url or mdns or "")
        if identity in seen:
            t.fail(None, f"same endpoint as endpoints[{seen[identity]}]")
        seen[identity] = i
        out.append(
            EndpointSpec(
                tier=tier,
                url=url,
                mdns=mdns,
                priority=t.integer("priority", None, lo=0),
                weight=t.integer("weight", 100, lo=1, hi=10000),
                labels=parse_labels(t, "labels"),
            )
        )
    return tuple(out)


def _endpoint_types(top: Table, endpoints: tuple[EndpointSpec, ...]) -> tuple[str, ...]:
    if not top.has("endpoint_types"):
        derived = tuple(dict.fromkeys(e.tier for e in endpoints))
        return derived or TIERS
    arr = top.array("endpoint_types")
    if len(arr) == 0:
        top.fail("endpoint_types", "expected at least one of 'local', 'edge', 'cloud', got an empty array")
    types: list[str] = []
    for i in range(len(arr)):
        tier = arr.choice(i, REQUIRED, TIERS)
        if tier in types:
            arr.fail(i, f"{tier!r} is listed twice")
        types.append(tier)
    for i, endpoint in enumerate(endpoints):
        if endpoint.tier not in types:
            raise top.doc.error(("endpoints", i, "type"), f"type {endpoint.tier!r} is not in endpoint_types {types}")
    return tuple(types)


def _health_check(t: Table) -> HealthCheckSpec:
    t.only((*_CHECK_KINDS, "interval", "timeout", "rise", "fall"))
    kinds = [k for k in _CHECK_KINDS if t.has(k)]
    if not kinds:
        t.fail(None, 'expected one of http = "/healthz", tcp = true, command = "..." or ttl = "15s"')
    if len(kinds) > 1:
        t.fail(kinds[1], f"give one kind of check, not both {kinds[0]} and {kinds[1]}")
    kind = kinds[0]
    http_path = command = ttl = None
    if kind == "http":
        http_path = t.string("http", pattern=re.compile(r"/\S*"), what="a path like '/healthz'")
    elif kind == "tcp":
        if t.boolean("tcp") is not True:
            t.fail("tcp", "tcp = false checks nothing: leave health_check out, or pick another check")
    elif kind == "command":
        command = t.string("command", what="a command line")
    else:
        ttl = t.duration("ttl")
    interval = t.duration("interval", 2.0)
    timeout = t.duration("timeout", 0.5)
    if timeout >= interval:
        key = "timeout" if t.has("timeout") else "interval"
        t.fail(key, f"timeout ({format_seconds(timeout)}) must be shorter than interval ({format_seconds(interval)})")
    return HealthCheckSpec(
        kind=kind,
        http_path=http_path,
        command=command,
        ttl=ttl,
        interval=interval,
        timeout=timeout,
        rise=t.integer("rise", 2, lo=1),
        fall=t.integer("fall", 2, lo=1),
    )


def _policy(t: Table) -> PolicySpec:
    t.only(
        (
            "strategy",
            "retries",
            "per_try_timeout",
            "timeout",
            "retry_budget",
            "retry_on_status",
            "retry_non_idempotent",
            "battery_min",
            "on_power",
            "allow",
            "deny",
            "quota",
            "default_rtt",
            "levels",
            "overprovisioning",
            "panic_threshold",
            "max_inflight",
            "max_pending",
            "endpoint_max_inflight",
            "failure_accrual",
            "failure_backoff",
            "cloud_max_share",
            *ROUTING_KEYS,
            *GEO_KEYS,
        )
    )
    d = PolicySpec()
    per_try = t.duration("per_try_timeout", d.per_try_timeout)
    timeout = t.duration("timeout", d.timeout)
    if timeout < per_try:
        key = "timeout" if t.has("timeout") else "per_try_timeout"
        t.fail(key, f"timeout ({format_seconds(timeout)}) must be >= per_try_timeout ({format_seconds(per_try)})")
    statuses = d.retry_on_status
    if t.has("retry_on_status"):
        arr = t.array("retry_on_status")
        statuses = frozenset(arr.integer(i, lo=500, hi=599) for i in range(len(arr)))
    policy = PolicySpec(
        strategy=t.choice("strategy", d.strategy, STRATEGIES),
        retries=t.integer("retries", d.retries, lo=0, hi=10),
        per_try_timeout=per_try,
        timeout=timeout,
        retry_budget=t.number("retry_budget", d.retry_budget, lo=0.0, hi=1.0),
        retry_on_status=statuses,
        retry_non_idempotent=t.boolean("retry_non_idempotent", d.retry_non_idempotent),
        battery_min=t.integer("battery_min", d.battery_min, lo=0, hi=100),
        on_power=t.boolean("on_power", d.on_power),
        allow=t.strings("allow", (), pattern=ID_GLOB, what=ID_GLOB_WHAT),
        deny=t.strings("deny", (), pattern=ID_GLOB, what=ID_GLOB_WHAT),
        quota=load_quota(t.table("quota")) if t.has("quota") else None,
        default_rtt=t.duration("default_rtt", d.default_rtt),
        levels=t.choice("levels", d.levels, LEVELS),
        overprovisioning=t.number("overprovisioning", d.overprovisioning, lo=1.0, hi=10.0),
        panic_threshold=t.integer("panic_threshold", d.panic_threshold, lo=0, hi=100),
        max_inflight=t.integer("max_inflight", d.max_inflight, lo=0, hi=1_000_000),
        max_pending=t.integer("max_pending", d.max_pending, lo=0, hi=100_000),
        endpoint_max_inflight=t.integer("endpoint_max_inflight", d.endpoint_max_inflight, lo=0, hi=1_000_000),
        failure_accrual=t.integer("failure_accrual", d.failure_accrual, lo=1, hi=1000),
        failure_backoff=t.duration("failure_backoff", d.failure_backoff),
        cloud_max_share=t.integer("cloud_max_share", d.cloud_max_share, lo=0, hi=100),
        **_geo_keys(t, d),
    )
    # subsets, splits and match rules (edged/routes.py); a rule's own policy is its keys laid over this one
    routing = parse_routing(t, lambda rule: _policy(Table(t.doc, {**policy_dict(policy), **rule.data}, rule.path)))
    return policy if routing is None else replace(policy, routing=routing)


# -- policy keys of strategy `geo` (edged/locality.py) ---------------------------------------------------------

GEO_KEYS = ("zone_weights", "geo_order")
MAX_ZONE_WEIGHTS = 64  # zones a policy may weigh: a fleet has a handful of sites


def _geo_keys(t: Table, d: PolicySpec) -> dict[str, Any]:
    """`zone_weights = {zone = 0..1000}` and `geo_order = "rtt" | "distance"`."""
    weights = d.zone_weights
    if t.has("zone_weights"):
        table = t.table("zone_weights")
        names = table.names()
        if len(names) > MAX_ZONE_WEIGHTS:
            t.fail("zone_weights", f"at most {MAX_ZONE_WEIGHTS} zones, got {len(names)}")
        for name in names:
            if not locality.ZONE.fullmatch(name):
                table.fail(name, f"expected a zone name as [node] zone allows it, got {name!r}")
        weights = tuple(sorted((n, table.integer(n, lo=0, hi=locality.MAX_WEIGHT)) for n in names))
    return {"zone_weights": weights, "geo_order": t.choice("geo_order", d.geo_order, locality.GEO_ORDERS)}


def _geo_dict(policy: PolicySpec) -> dict[str, Any]:
    """The geo keys as `policy_dict` writes them: only when set (most policies do not use `geo`)."""
    out: dict[str, Any] = {}
    if policy.zone_weights:
        out["zone_weights"] = dict(policy.zone_weights)
    if policy.geo_order != PolicySpec().geo_order:
        out["geo_order"] = policy.geo_order
    return out


def parse_policy(data: object, source: str, locate: Locate | None = None) -> PolicySpec:
    """Validate a policy document alone (the `[policy]` table of a manifest; fleet config; the policy API)."""
    doc = Doc(source, locate)
    if not isinstance(data, Mapping):
        raise doc.error((), f"a policy must be a table of keys, got {describe(data)}")
    return _policy(Table(doc, data))


def policy_dict(policy: PolicySpec) -> dict[str, Any]:
    """A PolicySpec as the table `parse_policy` reads (durations in seconds)."""
    out: dict[str, Any] = {
        "strategy": policy.strategy,
        "retries": policy.retries,
        "per_try_timeout": policy.per_try_timeout,
        "timeout": policy.timeout,
        "retry_budget": policy.retry_budget,
        "retry_on_status": sorted(policy.retry_on_status),
        "retry_non_idempotent": policy.retry_non_idempotent,
        "on_power": policy.on_power,
        "default_rtt": policy.default_rtt,
        "levels": policy.levels,
        "overprovisioning": policy.overprovisioning,
        "panic_threshold": policy.panic_threshold,
        "max_inflight": policy.max_inflight,
        "max_pending": policy.max_pending,
        "endpoint_max_inflight": policy.endpoint_max_inflight,
        "failure_accrual": policy.failure_accrual,
        "failure_backoff": policy.failure_backoff,
        "cloud_max_share": policy.cloud_max_share,
    }
    if policy.battery_min is not None:
        out["battery_min"] = policy.battery_min
    if policy.allow:
        out["allow"] = list(policy.allow)
    if policy.deny:
        out["deny"] = list(policy.deny)
    if policy.quota is not None:
        out["quota"] = quota_dict(policy.quota)
    out.update(routing_dict(policy.routing))
    out.update(_geo_dict(policy))
    return out
