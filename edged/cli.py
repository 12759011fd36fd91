"""The `edged` command: run the daemon, check config, and talk to a running daemon (status, call, resolve)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING

from . import __version__, buildinfo
from .config import ApiConfig, Config, find_config, secret_file_warnings
from .errors import EXIT_CONFIG, EXIT_START_FAILED, ConfigError, EdgedError
from .lazy import defer_for_daemon

if TYPE_CHECKING:
    import argparse

    from .client import ApiClient  # loaded by the commands that talk to a daemon, not by `edged run`


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    daemon = argv[:1] == ["run"]
    if daemon:
        defer_for_daemon()  # what the daemon's libraries import at their top and it seldom or never uses
    args = _plain_run(argv) if daemon else None
    if args is None:
        # `edged run` is the daemon: the cloud and identity commands' parsers (and their modules) would stay
        # loaded for nothing as long as it runs.
        parser = _parser(other_commands=not daemon)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        del parser  # garbage from here on (about 0.1 MiB in a daemon that runs for months)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return 1
    except EdgedError as exc:  # ApiError: the daemon could not be reached or answered with an error
        print(f"edged: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _plain_run(argv: list[str]) -> SimpleNamespace | None:
    """`edged run [--config PATH]` as a unit file starts it, read without argparse: argparse, gettext, locale
    and shutil would stay loaded in the daemon (about 0.5 MiB). None for anything else (--help, an unknown
    option...): argparse reads that, with its messages."""
    rest = argv[1:]
    if not rest:
        return SimpleNamespace(func=_run, config=None)
    if len(rest) == 2 and rest[0] in ("--config", "-c") and not rest[1].startswith("-"):
        return SimpleNamespace(func=_run, config=rest[1])
    if len(rest) == 1 and rest[0].startswith("--config=") and rest[0] != "--config=":
        return SimpleNamespace(func=_run, config=rest[0].partition("=")[2])
    return None


def _parser(other_commands: bool = True) -> argparse.ArgumentParser:
    """The whole command line; `other_commands=False`: without the cloud tier's (bridge, fleet)."""
    import argparse  # not for `edged run` as started by its unit (_plain_run)

    p = argparse.ArgumentParser(prog="edged", description="HubMesh: a local service mesh for edge boxes")
    p.add_argument("--version", action="version", version=f"edged {__version__} ({buildinfo.build()})")
    sub = p.add_subparsers(metavar="COMMAND")

    def command(name: str, func, help: str, into=sub) -> argparse.ArgumentParser:
        sp = into.add_parser(name, help=help, description=help)
        sp.add_argument("--config", "-c", help="config file (default: /etc/edged/edged.toml, else built-in)")
        sp.set_defaults(func=func)
        return sp

    command("run", _run, "run the daemon")
    command("check", _check, "validate config and manifests, print what would run")

    def client_command(name: str, func, help: str, into=sub) -> argparse.ArgumentParser:
        """A command that talks to a running daemon."""
        sp = command(name, func, help, into)
        sp.add_argument("--api", help="daemon address: http://HOST:PORT or unix:/path (default: from the config)")
        sp.add_argument("--token", default=os.environ.get("EDGED_TOKEN"), help="bearer token (or $EDGED_TOKEN)")
        sp.add_argument("--json", action="store_true", help="print the raw JSON answer")
        return sp

    for name, func, help in (
        ("status", _status, "this node, its services, endpoints and their health"),
        ("call", _call, "make a call through the mesh and print the answer"),
        ("resolve", _resolve, "ranked endpoints of a service, with the reason for each rank"),
    ):
        sp = client_command(name, func, help)
        if name == "status":
            sp.add_argument("--limit", type=int, help="peers and services listed (default 100; the fleet: fleet ls)")
            sp.add_argument("--peers-after", default="", help="list the peers after this node name (the next page)")
        if name in ("call", "resolve"):
            sp.add_argument("service")
        if name == "call":
            sp.add_argument("path", nargs="?", default="/")
            sp.add_argument(
                "-X", "--request", dest="method", default=None, help="HTTP method (default GET, POST with -d)"
            )
            sp.add_argument("-d", "--data", default=None, help="request body; @FILE reads a file, @- stdin")
            sp.add_argument("-H", "--header", action="append", default=[], help="extra header 'Name: value'")
            sp.add_argument("-i", "--include", action="store_true", help="print status and headers too")
    sp = client_command("reload", _reload, "make the running daemon re-read edged.toml and its manifests")
    sp.add_argument("--pid", type=int, help="the daemon's process id (systemd's $MAINPID; default: asked over the API)")
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reload (default 30)")
    sp = client_command("policy", _policy, "read or change a service's policy at runtime")
    sp.add_argument("action", choices=("get", "set", "dry-run", "reset"))
    sp.add_argument("service")
    sp.add_argument("keys", nargs="*", metavar="KEY=VALUE", help="policy keys, e.g. strategy=latency retries=1")
    sp.add_argument("-f", "--file", help="a JSON file with the policy keys")
    sp.add_argument("--method", help="dry-run: the sample request's method (default GET)")
    sp.add_argument("--path", help="dry-run: the sample request's path (default /)")
    sp.add_argument(
        "-H", "--header", action="append", default=[], help="dry-run: a sample request header 'Name: value'"
    )
    authz = sub.add_parser("authz", help="authorization rules and quotas: get, explain")
    authz_sub = authz.add_subparsers(metavar="ACTION", required=True)
    client_command("get", _authz_get, "the tenants' defaults, the rules and the quotas in force", authz_sub)
    sp = client_command("explain", _authz_explain, "the decision for one call, and the rule that made it", authz_sub)
    sp.add_argument("--as", dest="caller", required=True, help="a caller id: TENANT/APP or spiffe://FLEET/node/NODE")
    sp.add_argument("service", help="[TENANT/]SERVICE (default tenant: the caller's)")
    sp.add_argument("path", nargs="?", default="/", help="the path within the service (default /)")
    sp.add_argument("-X", "--request", dest="method", default="GET", help="the HTTP method (default GET)")
    if other_commands:
        from .cloud.cli import add_cloud_commands  # the cloud tier's commands: bridge, fleet

        add_cloud_commands(sub, command)
    return p


# -- run / check -------------------------------------------------------------------------------------
def _run(args) -> int:
    """Any error is one line on stderr (the journal) and an exit code: EXIT_CONFIG for a bad or unsafe config
    (the unit does not restart then), EXIT_START_FAILED for the rest. The traceback only at log level debug."""
    import logging

    from .daemon import run
    from .logs import setup_logging

    debug = False
    try:
        config = find_config(args.config)
        setup_logging(config.log.level, config.log.format)
        debug = config.log.level == "debug"
        for warning in secret_file_warnings(config):
            logging.getLogger("edged").warning("%s", warning)
        return run(config)
    except ConfigError as exc:
        print(f"edged: bad config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (EdgedError, OSError) as exc:
        print(f"edged: cannot start: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    except Exception as exc:  # a bug: still one line, the traceback when asked for
        if debug:
            logging.getLogger("edged").exception("edged failed")
        print(f'edged: failed: {type(exc).__name__}: {exc} ([log] level = "debug" shows where)', file=sys.stderr)
        return EXIT_START_FAILED


def _check(args) -> int:
    from .daemon import demo_echo_service
    from .manifest import load_manifest_dirs

    config = find_config(args.config)
    specs, errors = load_manifest_dirs(config.services.dirs)
    if config.demo.echo:
        specs.insert(0, demo_echo_service(config))
    print(f"config: {config.path or 'built-in default'}")
    print(f"node: {config.node.name}  fleet: {config.node.fleet}  zone: {config.node.zone or '-'}")
    socket = config.api.socket or "off"
    print(f"api: http://{config.api.listen_host}:{config.api.listen_port}  socket: {socket}")
    print(f"manifests: {', '.join(config.services.dirs)}")
    rows = [("SERVICE", "TENANT", "STRATEGY", "ENDPOINTS", "SOURCE")]
    for spec in specs:
        eps = ", ".join(f"{e.tier}:{e.url or e.mdns or 'mqtt'}" for e in spec.endpoints) or ",".join(
            spec.endpoint_types
        )
        rows.append((spec.name, spec.tenant, spec.policy.strategy, eps, spec.source))
    print(_table(rows))
    for warning in secret_file_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    return 1 if errors else 0


def _reload(args) -> int:
    """SIGHUP to the daemon, then wait until its reload count moves and print what the reload did.

    systemd's ExecReload runs this: it needs no /bin/kill, and `systemctl reload` fails when the new
    edged.toml is refused (the daemon keeps running on the old one).
    """
    import signal

    from .client import ApiClient

    try:
        client = _client(args)
    except ConfigError:  # the new file is broken: the daemon still listens where the running config says
        client = ApiClient(f"unix:{ApiConfig().socket}", token=args.token)
    before = client.get_json("/v1/status").get("config", {})
    if "reloads" not in before:
        print("edged: this daemon does not report reloads; use: kill -HUP PID", file=sys.stderr)
        return EXIT_START_FAILED
    pid = args.pid or before["pid"]
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"edged: cannot signal process {pid}: {exc.strerror}", file=sys.stderr)
        return EXIT_START_FAILED
    deadline = time.monotonic() + args.timeout
    while True:
        time.sleep(0.05)
        state = client.get_json("/v1/status")["config"]
        if state["reloads"] > before["reloads"]:
            break
        if time.monotonic() > deadline:
            print(f"edged: no reload within {args.timeout:g}s", file=sys.stderr)
            return EXIT_START_FAILED
    last = state["last_reload"]
    if last["error"]:
        print(f"edged: reload refused, running config kept: {last['error']}", file=sys.stderr)
        return EXIT_CONFIG
    applied = ", ".join(last["applied"]) or "none"
    print(f"reloaded in {last['ms']} ms: config keys applied: {applied}; manifest errors: {last['manifest_errors']}")
    if state["pending_restart"]:
        print(f"pending restart: {', '.join(state['pending_restart'])} (systemctl restart edged)")
    return 0


# -- talking to a running daemon -------------------------------------------------------------------
def _client(args) -> ApiClient:
    from .client import ApiClient

    if args.api:
        return ApiClient(args.api, token=args.token)
    config: Config = find_config(args.config)
    if config.api.socket and os.access(config.api.socket, os.R_OK | os.W_OK):
        return ApiClient(f"unix:{config.api.socket}", token=args.token)
    host = config.api.listen_host if config.api.listen_host not in ("0.0.0.0", "::") else "127.0.0.1"
    return ApiClient(f"http://{host}:{config.api.listen_port}", token=args.token)


def _query_string(params: dict) -> str:
    from urllib.parse import urlencode

    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return "?" + urlencode(kept) if kept else ""


def _status(args) -> int:
    query = {"limit": args.limit, "peers_after": args.peers_after}
    data = _client(args).get_json("/v1/status" + _query_string(query))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    node = data["node"]
    print(
        f"node {node['name']}  fleet {node['fleet']}  zone {node['zone'] or '-'}  "
        f"v{node['version']} ({node.get('build', '?')})  "
        f"up {node['uptime_s']}s  {'ready' if node['ready'] else 'NOT READY'}"
    )
    _print_config_state(data.get("config") or {})
    _print_identity(data.get("identity"))
    peers = data.get("peers", [])
    if peers:
        rows = [("PEER", "SOURCE", "STATE", "SEEN", "ADDRESS", "CPU", "BAT", "LINK", "SERVICES")]
        for peer in peers:
            vitals = peer.get("vitals") or peer
            address = f"{peer['address']}:{peer['port']}" if peer.get("address") else "-"
            rows.append(
                (
                    str(peer.get("node", "?")),
                    str(peer.get("source", "-")),
                    str(peer.get("state", "-")),
                    _ago(peer.get("seen")),
                    address,
                    *(_vital(vitals.get(k)) for k in ("cpu", "bat", "link")),
                    ", ".join(peer.get("services", [])) or "-",
                )
            )
        print(_table(rows))
        summary = data.get("peers_summary") or {}
        if summary.get("next"):
            states = ", ".join(f"{n} {state}" for state, n in sorted(summary.get("by_state", {}).items()))
            print(
                f"{summary['shown']} of {summary['total']} peers ({states}); "
                f"more: edged status --peers-after {summary['next']}, or edged fleet ls"
            )
    else:
        print("peers: none")
    print()
    rows = [("SERVICE", "ENDPOINT", "TIER", "PRIO", "HEALTH", "LATENCY", "OK/FAIL")]
    for svc in data["services"]:
        if not svc["endpoints"]:
            rows.append((svc["name"], "-", "-", "-", "no endpoints", "-", "-"))
        for ep in svc["endpoints"]:
            latency = "-" if ep["latency_ms"] is None else f"{ep['latency_ms']:.1f}ms"
            rows.append(
                (
                    svc["name"],
                    ep["url"],
                    ep["tier"],
                    str(ep["priority"]),
                    ("UP " if ep["up"] else "DOWN ") + ep["health"],
                    latency,
                    f"{ep['calls_ok']}/{ep['calls_failed']}",
                )
            )
        for p in svc.get("providers", []):  # remote nodes serving it over MQTT
            health = f"{p['state']}, seen {_ago(p['seen'])}"
            rows.append((svc["name"], f"served by {p['node']}", "cloud", "-", health, "-", "-"))
    print(_table(rows))
    summary = data.get("services_summary") or {}
    if summary.get("next"):
        print(f"{summary['shown']} of {summary['total']} services; all of them: GET /v1/services")
    return 0


def _ago(wall: float | None) -> str:
    """A wall-clock time as "12s ago" (or "-")."""
    if not isinstance(wall, (int, float)):
        return "-"
    return f"{max(0, round(time.time() - wall))}s ago"


def _resolve(args) -> int:
    data = _client(args).get_json(f"/v1/resolve/{args.service}")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{data['service']}: strategy {data['strategy']}" + (f" ({data['note']})" if data["note"] else ""))
    levels = data.get("levels", [])
    if len(levels) > 1:
        print(
            _table(
                [("LEVEL", "HEALTHY", "HEALTH", "SHARE")]
                + [
                    (lv["level"], f"{lv['healthy']}/{lv['total']}", f"{lv['health']:.0f}%", f"{lv['share']:.0f}%")
                    for lv in levels
                ]
            )
        )
    if data.get("split"):
        print(f"split of the default route ({data['routes']} match rules before it):")
        rows = [("SUBSET", "LABELS", "WEIGHT", "SHARE", "ENDPOINTS", "HEALTHY")]
        for item in data["split"]:
            labels = ",".join(f"{k}={v}" for k, v in item["labels"].items()) or "any"
            share, up = f"{item['share']:g}%", "yes" if item["healthy"] else "no"
            rows.append((item["subset"], labels, str(item["weight"]), share, str(item["endpoints"]), up))
        print(_table(rows))
    localities = data.get("localities", [])
    if localities:  # strategy geo: where each locality is and its share of its level's calls
        head = ("LEVEL", "LOCALITY", "BY", "DISTANCE", "RTT", "WEIGHT", "HEALTHY", "SHARE")
        print(_table([head, *_places(localities)]))
    rows = [("RANK", "ENDPOINT", "TIER", "LEVEL", "USABLE", "REASON")]
    for r in data["ranked"]:
        rows.append(
            (str(r["rank"]), r["url"], r["tier"], r.get("level", ""), "yes" if r["usable"] else "no", r["reason"])
        )
    for s in data["skipped"]:
        rows.append(("-", s["endpoint"], s["tier"], "", "no", s["reason"]))
    print(_table(rows))
    return 0 if data["ranked"] else 1


def _places(localities: list[dict]) -> list[tuple[str, ...]]:
    """`edged resolve`'s rows for the localities of a `geo` plan."""
    return [
        (
            loc["level"],
            loc["locality"] + (" (here)" if loc["here"] else ""),
            loc["ranked_by"],
            "-" if loc["distance_km"] is None else f"{loc['distance_km']:.0f} km",
            "-" if loc["rtt_ms"] is None else f"{loc['rtt_ms']:.1f} ms",
            "-" if loc["weight"] is None else str(loc["weight"]),
            f"{loc['healthy']}/{loc['total']}",
            f"{loc['share']:.0f}%",
        )
        for loc in localities
    ]


def _call(args) -> int:
    body = b""
    if args.data is not None:
        if args.data == "@-":
            body = sys.stdin.buffer.read()
        elif args.data.startswith("@"):
            with open(args.data[1:], "rb") as f:
                body = f.read()
        else:
            body = args.data.encode()
    method = args.method or ("POST" if args.data is not None else "GET")
    headers = []
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            print(f"edged: bad header {h!r}: use 'Name: value'", file=sys.stderr)
            return 2
        headers.append((name.strip(), value.strip()))
    path = args.path if args.path.startswith("/") else "/" + args.path
    status, resp_headers, data = _client(args).request(method, f"/svc/{args.service}{path}", body, headers)
    if args.include:
        print(f"HTTP {status}")
        for k, v in resp_headers:
            print(f"{k}: {v}")
        print()
    out = sys.stdout.buffer
    out.write(data)
    if data and not data.endswith(b"\n"):
        out.write(b"\n")
    out.flush()
    return 0 if status < 400 else 1


def _print_identity(identity: dict | None) -> None:
    """The identity line of `edged status`: this node's certificate, when it expires and renews, what is wrong."""
    if not identity:
        return
    state = identity.get("state")
    if state in ("insecure", "missing"):
        print(f"identity {state.upper()}: {identity.get('detail') or identity.get('dir') or ''}")
        return
    line = f"identity {identity['spiffe_id']}  until {identity['not_after']}  renews after {identity['renew_after']}"
    print(line + ("" if state == "ok" else f"  {state.upper()}"))
    if identity.get("problem"):
        print(f"  {identity['problem']}")


def _print_config_state(state: dict) -> None:
    """The config line of `edged status`: its file, the last reload, keys pending restart."""
    if not state:
        return
    line = f"config {state.get('file') or 'built-in'}  reloads {state.get('reloads', 0)}"
    last = state.get("last_reload")
    if last and last.get("error"):
        line += f"  last reload FAILED: {last['error']}"
    print(line)
    if state.get("pending_restart"):
        print(f"pending restart: {', '.join(state['pending_restart'])} (systemctl restart edged applies them)")
    for name, failed in (state.get("tasks_failed") or {}).items():
        print(f"task {name!r} FAILED {failed['restarts']}x and was restarted; last: {failed['last_error']}")


def _vital(value: object) -> str:
    return "-" if value in (None, "") else f"{value}%"


def _policy(args) -> int:
    client = _client(args)
    path = f"/v1/policies/{args.service}"
    if args.action == "get":
        status, data = client.call_json("GET", path)
    elif args.action == "reset":
        status, data = client.call_json("DELETE", path)
    else:
        table = _policy_table(args)
        sample = _sample_request(args) if args.action == "dry-run" else None
        if sample:
            table["request"] = sample
        if not table:
            print("edged: give policy keys (KEY=VALUE ...) or -f FILE", file=sys.stderr)
            return 2
        method, target = ("PUT", path) if args.action == "set" else ("POST", f"{path}:dry-run")
        status, data = client.call_json(method, target, json.dumps(table).encode())
    if args.json or status >= 400:
        print(json.dumps(data, indent=2), file=sys.stdout if status < 400 else sys.stderr)
        return 0 if status < 400 else 1
    if args.action == "dry-run":
        print(f"{data['service']}: with this policy, strategy {data['strategy']}")
        route = data.get("route") or {}
        now = {r["endpoint"]: str(r["rank"]) for r in data["current"]["ranked"]}
        if "ranked" not in (route.get("subsets") or [{}])[0]:
            print(_ranked_table(data["ranked"], now))
            return 0
        print(f"route: {route['rule'] or 'default (no rule matched)'}; policy: {route['policy']}")
        for item in route["subsets"]:
            if item["subset"] is not None:
                labels = ",".join(f"{k}={v}" for k, v in item["labels"].items()) or "any"
                health = "" if item["healthy"] else ", no healthy endpoint"
                share = f"share {item['share']}%, {item['endpoints']} endpoints{health}"
                print(f"subset {item['subset']} ({labels}): {share}")
            print(_ranked_table(item["ranked"], now))
        return 0
    override = f", override {data['override']}" if data["override"] else ""
    print(f"{data['service']}: policy from {data['source']}{override}")
    print(_table([("KEY", "VALUE"), *((k, json.dumps(v)) for k, v in data["policy"].items())]))
    return 0


def _authz_get(args) -> int:
    status, data = _client(args).call_json("GET", "/v1/authz")
    print(json.dumps(data, indent=2), file=sys.stdout if status < 400 else sys.stderr)
    return 0 if status < 400 else 1


def _authz_explain(args) -> int:
    body = {"as": args.caller, "service": args.service, "path": args.path, "method": args.method}
    status, data = _client(args).call_json("POST", "/v1/authz/explain", json.dumps(body).encode())
    if args.json or status >= 400:
        print(json.dumps(data, indent=2), file=sys.stdout if status < 400 else sys.stderr)
        return 0 if status < 400 else 1
    print(f"{data['decision']}: {data['reason']}")
    print(f"rule: {data['rule']}")
    print(f"call: {data['as']} -> {data['method']} {data['tenant']}/{data['service']}{data['path']}")
    if not data["known_service"]:
        print("note: no such service now (decided without its [policy] allow/deny)")
    for key, quota in data["quotas"].items():
        if quota:
            print(f"quota {key}: {json.dumps(quota)}")
    return 0


def _ranked_table(ranked: list[dict], now: dict[str, str]) -> str:
    rows = [("RANK", "NOW", "ENDPOINT", "TIER", "USABLE", "REASON")]
    for r in ranked:
        usable = "yes" if r["usable"] else "no"
        rows.append((str(r["rank"]), now.get(r["endpoint"], "-"), r["url"], r["tier"], usable, r["reason"]))
    return _table(rows)


def _sample_request(args) -> dict:
    """The dry run's sample request from --method, --path and -H (empty: none given)."""
    sample: dict = {}
    if args.method:
        sample["method"] = args.method.upper()
    if args.path:
        sample["path"] = args.path
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"edged: {header!r}: use -H 'Name: value'")
        sample.setdefault("headers", {})[name.strip().lower()] = value.strip()
    return sample


def _policy_table(args) -> dict:
    """Policy keys from -f FILE and KEY=VALUE words (values read as JSON when they parse: 2, true, [502])."""
    table: dict = {}
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            table.update(json.load(f))
    for word in args.keys:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise SystemExit(f"edged: {word!r}: use KEY=VALUE")
        try:
            table[key] = json.loads(value)
        except ValueError:
            table[key] = value  # durations and names: "300ms", "latency"
    return table


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows)


if __name__ == "__main__":
    sys.exit(main())
