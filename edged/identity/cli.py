"""`edged fleet ca init|sign|token|serve` (the fleet CA, on an operator machine) and `edged fleet enroll` (a box).

`cryptography` is imported inside the commands: other `edged` commands stay quick.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

from ..cloud.cli import _fail  # the fleet commands' one way of saying an error
from ..config import find_config
from ..errors import EdgedError
from ..units import parse_duration


def add_identity_commands(actions) -> None:
    """Add `ca` and `enroll` to the `edged fleet` subparsers."""
    ca = actions.add_parser("ca", help="the fleet CA: make it, sign CSRs, make join tokens, serve enrollments")
    ca.set_defaults(func=lambda _args: (ca.print_help(), 2)[1])
    sub = ca.add_subparsers(metavar="ACTION")
    init = sub.add_parser("init", help="make a fleet CA: DIR/ca.key (0600, keep it offline) and DIR/ca.pem")
    init.add_argument("--fleet", help="the fleet it issues for (default: [node] fleet of the config)")
    init.add_argument("--dir", default="fleet-ca", help="folder for the CA (default: ./fleet-ca)")
    init.add_argument("--days", type=int, default=3650, help="CA lifetime in days (default 3650)")
    init.add_argument("--config", "-c", help="config file (for [node] fleet)")
    init.set_defaults(func=_ca_init)
    inter = sub.add_parser(
        "intermediate", help="make an intermediate CA, signed by the root, that signs node certificates (root offline)"
    )
    inter.add_argument("--root", default="fleet-ca", help="the root CA folder (default: ./fleet-ca)")
    inter.add_argument("--dir", required=True, help="folder for the intermediate CA (use it as --dir of sign/serve)")
    inter.add_argument("--days", type=int, default=365, help="its lifetime in days (default 365; never past the root)")
    inter.set_defaults(func=_ca_intermediate)
    sign = sub.add_parser("sign", help="sign a box's CSR offline into its certificate")
    sign.add_argument("csr", help="the CSR a box wrote with `edged fleet enroll` (node.csr)")
    sign.add_argument("--dir", default="fleet-ca", help="the CA folder (default: ./fleet-ca)")
    sign.add_argument("--lifetime", default="24h", help="certificate lifetime (default 24h)")
    sign.add_argument("--out", "-o", help="output file (default: NODE.crt)")
    sign.set_defaults(func=_ca_sign)
    token = sub.add_parser("token", help="make a one-time join token for `edged fleet enroll --token`")
    token.add_argument("--dir", default="fleet-ca", help="the CA folder (default: ./fleet-ca)")
    token.add_argument("--node", help="only this node may use it (default: any one node)")
    token.add_argument("--ttl", default="1h", help="how long it may be used (default 1h)")
    token.set_defaults(func=_ca_token)
    serve = sub.add_parser("serve", help="answer enrollments and renewals over MQTT ([mqtt] of the config)")
    serve.add_argument("--dir", default="fleet-ca", help="the CA folder (default: ./fleet-ca)")
    serve.add_argument("--lifetime", default="24h", help="certificate lifetime (default 24h)")
    serve.add_argument("--config", "-c", help="config file with [mqtt] (default: /etc/edged/edged.toml)")
    serve.set_defaults(func=_ca_serve)
    enroll = actions.add_parser(
        "enroll", help="give this box its fleet certificate (key made here; online with --token, else a CSR)"
    )
    enroll.add_argument("--config", "-c", help="config file (default: /etc/edged/edged.toml)")
    enroll.add_argument("--token", help="a one-time join token from `edged fleet ca token`: enroll over MQTT")
    enroll.add_argument("--cert", help="install a certificate signed offline (`edged fleet ca sign`)")
    enroll.add_argument("--ca", dest="ca_file", help="the fleet's ca.pem: installed with --cert, checked with --token")
    enroll.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the signer (default 30)")
    enroll.set_defaults(func=_enroll)


def _ca_init(args) -> int:
    from .signer import init_ca

    fleet = args.fleet or find_config(args.config).node.fleet
    try:
        ca = init_ca(args.dir, fleet, args.days)
    except (EdgedError, OSError) as exc:
        return _fail(exc)
    print(f"fleet CA for {ca.fleet!r} in {args.dir}/")
    print("  ca.key  the CA's private key (0600): keep this folder off the network, back it up offline")
    print("  ca.pem  the trust bundle every box of the fleet gets (edged fleet enroll installs it)")
    return 0


def _ca_intermediate(args) -> int:
    from .signer import init_intermediate
    from .trust import not_after

    try:
        ca = init_intermediate(args.dir, args.root, args.days)
    except (EdgedError, OSError) as exc:
        return _fail(exc)
    until = not_after(ca.cert)
    print(f"intermediate CA for {ca.fleet!r} in {args.dir}/, signed by {args.root}/, until {until:%Y-%m-%d}")
    print("  ca.key    its private key (0600)")
    print("  chain.pem its certificate: every node certificate it signs carries it (path length 0: no CA under it)")
    print("  ca.pem    the root's trust bundle, which boxes get; the root folder can go back offline")
    return 0


def _ca_sign(args) -> int:
    from .issue import cert_pem, csr_name, load_csr, sign_csr
    from .signer import load_ca

    try:
        ca = load_ca(args.dir)
        with open(args.csr, "rb") as f:
            csr = load_csr(f.read(64 * 1024))
        name = csr_name(csr)
        cert = sign_csr(csr, ca.key, ca.cert, lifetime=parse_duration(args.lifetime))
    except (EdgedError, OSError, ValueError) as exc:
        return _fail(exc)
    out = args.out or f"{name.node}.crt"
    with open(out, "wb") as f:
        f.write(cert_pem(cert) + ca.chain_pem)  # the leaf, then any intermediate
    print(f"signed spiffe://{name.fleet}/node/{name.node} until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC -> {out}")
    print(f"on the box: edged fleet enroll --cert {out} --ca {os.path.join(args.dir, 'ca.pem')}")
    return 0


def _ca_token(args) -> int:
    from .signer import load_ca

    try:
        ca = load_ca(args.dir)
        token = ca.tokens.add(args.node, parse_duration(args.ttl))
    except (EdgedError, OSError, ValueError) as exc:
        return _fail(exc)
    print(token)
    who = f"node {args.node!r}" if args.node else "one node"
    print(f"(one use, by {who}, within {args.ttl}: edged fleet enroll --token {token})", file=sys.stderr)
    return 0


def _ca_serve(args) -> int:
    from ..cloud.session import MqttSession
    from ..logs import setup_logging
    from .signer import load_ca, serve

    config = find_config(args.config)
    setup_logging(config.log.level, config.log.format)
    try:
        ca = load_ca(args.dir)
        lifetime = parse_duration(args.lifetime)
    except (EdgedError, OSError, ValueError) as exc:
        return _fail(exc)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        session = MqttSession(config.mqtt, client_id=f"edged-fleet-ca-{ca.fleet}-{os.getpid()}")
        await serve(ca, session, prefix=config.mqtt.topic_prefix, lifetime=lifetime, stop=stop)

    print(f"fleet CA {ca.fleet!r} answering on {config.mqtt.topic_prefix}/{ca.fleet}/ca/req", file=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def _enroll(args) -> int:
    from .files import IdentityFiles
    from .online import enroll, install, node_key, write_csr

    config = find_config(args.config)
    files = IdentityFiles(config.identity_dir)
    fleet, node = config.node.fleet, config.node.name
    try:
        also = None
        if args.ca_file:
            with open(args.ca_file, "rb") as f:
                also = f.read(64 * 1024)
        if args.cert:
            node_key(files)
            with open(args.cert, encoding="utf-8") as f:
                chain = f.read(64 * 1024)
            if also is None:
                raise EdgedError("--cert needs --ca (the fleet's ca.pem) to install with it")
            name = install(files, chain, also.decode(), fleet, node)
        elif args.token:
            mqtt = config.mqtt
            name = asyncio.run(
                enroll(files, mqtt, mqtt.topic_prefix, fleet, node, args.token, timeout=args.timeout, also_trust=also)
            )
        else:
            path = write_csr(files, fleet, node)
            print(f"key: {files.key} (made on this box, 0600; it never leaves it)")
            print(f"CSR: {path}")
            print("have the fleet CA sign it (edged fleet ca sign node.csr), then:")
            print("  edged fleet enroll --cert NODE.crt --ca ca.pem")
            print("or enroll online with a join token: edged fleet enroll --token ID.SECRET")
            return 0
    except (EdgedError, OSError, ValueError) as exc:
        return _fail(exc)
    print(f"enrolled as spiffe://{name.fleet}/node/{name.node}: {files.cert} and {files.ca}")
    print("a running edged uses it within a minute (one still waiting for its first certificate: within seconds)")
    return 0
