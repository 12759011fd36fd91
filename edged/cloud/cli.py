"""Commands of the cloud tier: `edged bridge` and `edged fleet keygen | sign | push | ls`.

Heavy imports (aiomqtt, cryptography) happen inside the commands, so that other `edged` commands stay quick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable

from ..config import find_config
from ..errors import EdgedError


def add_cloud_commands(sub, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `bridge` and `fleet` to the `edged` parser (`sub`: its subparsers; `command`: its helper)."""
    command("bridge", _bridge, "cloud side: answer MQTT calls for the services of its manifests")
    fp = sub.add_parser(
        "fleet",
        help="signed fleet config: make keys, sign and push documents",
        description="Signed fleet config (policies and settings for every node, over MQTT).",
    )
    fp.set_defaults(func=lambda _args: (fp.print_help(), 2)[1])
    actions = fp.add_subparsers(metavar="ACTION")
    kg = actions.add_parser("keygen", help="make an Ed25519 key pair: NAME.key (private, 0600) and NAME.pub")
    kg.add_argument("name", nargs="?", default="fleet", help="path prefix of the two files (default: fleet)")
    kg.set_defaults(func=_keygen)
    sg = actions.add_parser(
        "sign", help="sign a document (TOML or JSON) into its wire form, stamped with fleet, version, issued_at"
    )
    sg.add_argument("file", help="the document: version, policies, settings (TOML, or .json)")
    sg.add_argument("--key", "-k", required=True, help="private key file (from keygen)")
    sg.add_argument("--node", help="address the document to one node (pushed to config/NODE)")
    _fleet_args(sg)
    sg.add_argument("--out", "-o", help="output file; '-' for stdout (default: FILE.signed.json)")
    sg.set_defaults(func=_sign)
    wd = actions.add_parser("withdraw", help="sign a tombstone that withdraws a node's document")
    wd.add_argument("node", help="the node whose config/NODE document ends")
    wd.add_argument("--key", "-k", required=True, help="private key file (from keygen)")
    wd.add_argument("--version", type=int, help="must be above the node's document's (default: now, in seconds)")
    _fleet_args(wd)
    wd.add_argument("--out", "-o", help="output file; '-' for stdout (default: withdraw-NODE.signed.json)")
    wd.set_defaults(func=_withdraw)
    ps = actions.add_parser("push", help="publish a signed document, retained, to the fleet's config topic")
    ps.add_argument("file", help="a signed document (from sign), or a source document with --key")
    ps.add_argument("--key", "-k", help="sign the source document with this key first")
    ps.add_argument("--node", help="with --key: address the document to one node")
    ps.add_argument("--fleet", help="with --key: the fleet it is for (default: [node] fleet of --config)")
    ps.add_argument("--config", "-c", help="config file with [mqtt] and [node] fleet (default: /etc/edged/edged.toml)")
    ps.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)")
    ps.set_defaults(func=_push)
    ls = actions.add_parser("ls", help="the whole fleet's registry, read from the broker: nodes and services")
    ls.add_argument("--service", "-s", help="only the nodes serving this service (NAME or TENANT.NAME)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--config", "-c", help="config file with [mqtt] and [node] fleet (default: /etc/edged/edged.toml)")
    ls.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)")
    ls.add_argument("--quiet", type=float, default=0.5, help="end after this long without news (default 0.5)")
    ls.set_defaults(func=_ls)
    from ..identity.cli import add_identity_commands  # `edged fleet ca ...` and `edged fleet enroll`

    add_identity_commands(actions)


def _fleet_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet", help="the fleet it is for (default: the document's, else [node] fleet of --config)")
    parser.add_argument("--config", "-c", help="read the fleet from this config's [node] fleet")


def _fleet_of(args, data: dict | None = None) -> str | None:
    """The fleet a document is signed for: --fleet, the document's own, else --config's [node] fleet (`push`
    pushes to that fleet's topic, so it reads its config's even when --config is not given)."""
    if args.fleet or (data and data.get("fleet")):
        return args.fleet
    if args.config or args.func is _push:
        return find_config(args.config).node.fleet
    return None


def _fail(exc: Exception) -> int:
    print(f"edged: {exc}", file=sys.stderr)
    return 1


# -- bridge -------------------------------------------------------------------------------------------------


def _bridge(args) -> int:
    from ..logs import setup_logging
    from .bridge import run

    config = find_config(args.config)
    setup_logging(config.log.level, config.log.format)
    try:
        return run(config)
    except (OSError, EdgedError) as exc:
        return _fail(exc)


# -- fleet --------------------------------------------------------------------------------------------------


def _keygen(args) -> int:
    from .fleet import generate_key, write_private

    private_pem, public_pem, kid = generate_key()
    key_path, pub_path = f"{args.name}.key", f"{args.name}.pub"
    try:
        write_private(key_path, private_pem)
    except FileExistsError:
        return _fail(EdgedError(f"{key_path} exists: not overwritten"))
    except OSError as exc:
        return _fail(exc)
    with open(pub_path, "wb") as f:
        f.write(public_pem)
    print(f"key id {kid}")
    print(f"private key: {key_path} (keep it off the boxes)")
    print(f"public key:  {pub_path} (list it in [fleet] keys on every node)")
    return 0


def _signed_from_source(path: str, key_path: str, args) -> bytes:
    from .fleet import addressed, document_text, load_private_key, read_source_document, sign_document

    data = read_source_document(path)
    data = addressed(data, fleet=_fleet_of(args, data), node=args.node)
    return sign_document(document_text(data), load_private_key(key_path))


def _sign(args) -> int:
    try:
        signed = _signed_from_source(args.file, args.key, args)
    except EdgedError as exc:
        return _fail(exc)
    doc = json.loads(json.loads(signed)["document"])
    out = args.out or os.path.splitext(args.file)[0] + ".signed.json"
    if out == "-":
        sys.stdout.write(signed.decode())
    else:
        with open(out, "wb") as f:
            f.write(signed)
        where = f"config/{doc['node']}" if doc.get("node") else "config"
        print(f"signed version {doc['version']} for fleet {doc['fleet']} ({where}) -> {out}")
    return 0


def _withdraw(args) -> int:
    from .fleet import addressed, document_text, load_private_key, sign_document, tombstone

    try:
        data = addressed(tombstone(args.node, args.version), fleet=_fleet_of(args), node=None)
        signed = sign_document(document_text(data), load_private_key(args.key))
    except EdgedError as exc:
        return _fail(exc)
    out = args.out or f"withdraw-{args.node}.signed.json"
    if out == "-":
        sys.stdout.write(signed.decode())
    else:
        with open(out, "wb") as f:
            f.write(signed)
        print(f"signed tombstone version {data['version']} for fleet {data['fleet']} (config/{args.node}) -> {out}")
    return 0


def _push(args) -> int:
    from .fleet import FleetConfigError, load_trusted_keys, verify

    try:
        if args.key:
            signed = _signed_from_source(args.file, args.key, args)
        else:
            with open(args.file, "rb") as f:
                signed = f.read()
        wire = json.loads(signed)
        doc = json.loads(wire["document"])
    except EdgedError as exc:
        return _fail(exc)
    except OSError as exc:
        return _fail(EdgedError(f"{args.file}: {exc.strerror or exc}"))
    except (ValueError, KeyError, TypeError):
        return _fail(EdgedError(f"{args.file}: not a signed document (sign it first, or give --key)"))
    config = find_config(args.config)
    keys = load_trusted_keys(config.fleet.keys)
    if keys:
        try:
            verify(signed, keys)
        except FleetConfigError as exc:
            print(f"edged: warning: nodes with this config's [fleet] keys will refuse it: {exc}", file=sys.stderr)
    node = doc.get("node")
    try:
        topic = asyncio.run(_publish(config, node, signed, args.timeout))
    except EdgedError as exc:
        return _fail(exc)
    print(f"pushed version {doc.get('version')} to {topic} (retained)")
    return 0


def _ls(args) -> int:
    from .fleetview import format_fleet, read_fleet

    config = find_config(args.config)
    try:
        nodes = asyncio.run(read_fleet(config, service=args.service, quiet=args.quiet, timeout=args.timeout))
    except EdgedError as exc:
        return _fail(exc)
    print(json.dumps(nodes, indent=2) if args.json else format_fleet(nodes))
    return 0


async def _publish(config, node: str | None, signed: bytes, timeout: float) -> str:
    from .session import MqttSession, PublishError
    from .topics import Topics

    topic = Topics(config.mqtt.topic_prefix, config.node.fleet).config(node)
    logging.getLogger("edged.cloud.session").setLevel(logging.ERROR)  # the outcome is printed below
    session = MqttSession(config.mqtt, client_id=f"edged-fleet-push-{os.getpid()}")
    session.start()
    try:
        if not await session.wait_connected(timeout):
            raise EdgedError(f"cannot reach the broker at {config.mqtt.url}: {session.last_error or 'timed out'}")
        try:
            await session.publish(topic, signed, qos=1, retain=True, timeout=timeout)
        except PublishError as exc:
            raise EdgedError(f"publish to {topic} failed: {exc}") from None
    finally:
        await session.close()
    return topic
