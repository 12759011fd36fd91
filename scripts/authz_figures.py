#!/usr/bin/env python3
"""Figures of issue 10 (tenants, JWTs, authorization rules, quotas), in one run.

1. CPU per call of the checks a call passes before it is routed, in one process, on the same parsed request
   (several rounds; process_time; best and median), against today's check (`Access.identify` alone):
   - anonymous loopback caller, default config (what every existing box pays);
   - a cached JWT (ES256) + 20 authorization rules + a tenant and a service quota (large enough never to bite);
   - a static token with the same rules and quotas;
   - an uncached JWT: the signature check of RS256, ES256 and EdDSA tokens (each call a new token).
2. A burst of `--burst` calls (16 keep-alive connections, as fast as the daemon answers) against a quota of
   `--rate` calls/s through the real daemon: how many passed, how fast the refused ones were answered
   (latency of the 429s), and the daemon's CPU per call; the same burst with no quota beside it.
For instructions per call through the real daemon (callgrind, steadier here than wall time), `--callcost-files
DIR` writes a config (a JWKS, 20 rules, two quotas) and prints the header of a JWT for
`scripts/callcost.py --extra-config DIR/extra.toml --header 'Authorization: Bearer ...' --baseline main`.

usage: scripts/authz_figures.py [--calls 50000] [--rounds 5] [--burst 10000] [--rate 100] [--json-only]
                                [--skip-burst] [--callcost-files DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from harness import Edged
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from edged.access import Access, AccessConfig
from edged.admission import Gate
from edged.authz import Authorizer, AuthzConfig, Rule
from edged.config import TenantConfig
from edged.http.message import Request
from edged.jwt_auth import JwtConfig
from edged.model import QuotaSpec, Service, ServiceSpec
from edged.quota import Quotas
from edged.telemetry import MeshMetrics

ISSUER = "https://id.example"
TENANTS = {"default": TenantConfig("default", open_on_loopback=True), "garden": TenantConfig("garden")}
PUMP = 'service_name = "pump"\ntenant = "garden"\n[[endpoints]]\ntype = "local"\nurl = "http://127.0.0.1:{port}"\n'
HEADERS = [(b"host", b"127.0.0.1:7700"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]


def request(auth: bytes | None = None) -> Request:
    headers = HEADERS + ([(b"authorization", b"Bearer " + auth)] if auth else [])
    return Request("GET", "/svc/thermo/readings", "/svc/thermo/readings", "", "1.1", headers, b"", "127.0.0.1", True)


def rules(n: int) -> AuthzConfig:
    """`n` rules, most of them about other services and callers: what a real table looks like."""
    out = [Rule(f"r{i}", "allow", "garden", f"svc-{i}", (f"garden/app-{i}",), frozenset({"GET"})) for i in range(n - 2)]
    out.append(Rule("no-setpoint", "deny", "garden", "thermo", ("*",), paths=("/setpoint",)))
    out.append(Rule("lamps-thermo", "allow", "garden", "thermo", ("garden/lamps", "garden/token"), frozenset({"GET"})))
    return AuthzConfig(tenants={"garden": "deny"}, rules=tuple(out))


def cpu_per_call(fn, calls: int, rounds: int) -> dict:
    per = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        per.append((time.process_time() - t0) / calls * 1e6)
    return {"best_us": round(min(per), 3), "median_us": round(statistics.median(per), 3)}


def key_sets() -> tuple[dict, dict]:
    keys = {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }
    algo = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}
    jwks = {"keys": [{**json.loads(algo[a].to_jwk(k.public_key())), "kid": a} for a, k in keys.items()]}
    return keys, jwks


def token(key, alg: str, n: int = 0) -> bytes:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": "edged", "sub": "lamps", "tenant": "garden", "exp": now + 3600, "jti": str(n)}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": alg}).encode()


def in_process(args, tmp: Path) -> dict:
    keys, jwks = key_sets()
    (tmp / "jwks.json").write_text(json.dumps(jwks))
    jwt_config = JwtConfig(issuer=ISSUER, audience="edged", jwks_file=str(tmp / "jwks.json"))
    plain = Access(AccessConfig(), TENANTS)
    tenants = {**TENANTS, "garden": TenantConfig("garden", frozenset({"g-token"}))}
    full = Access(AccessConfig(jwt=jwt_config), tenants)
    metrics = MeshMetrics()
    open_gate = Gate(Authorizer(), Quotas(), MeshMetrics())
    big = 10**9
    quotas = {"garden": QuotaSpec(rate=big, burst=big), "garden/thermo": QuotaSpec(rate=big, in_flight=big)}
    gate = Gate(Authorizer(rules(20)), Quotas(quotas), metrics)
    default_svc = Service(ServiceSpec("thermo"), ())
    garden_svc = Service(ServiceSpec("thermo", tenant="garden"), ())
    anon, static = request(), request(b"g-token")
    cached = request(token(keys["ES256"], "ES256"))
    assert full.identify(cached).id == "garden/lamps"

    def today_anon():
        plain.identify(anon)

    def now_anon():
        caller = plain.identify(anon)
        open_gate.admit(caller, default_svc, "GET", "/readings").release()

    def today_static():
        full.identify(static)

    def now_static():
        caller = full.identify(static)
        gate.admit(caller, garden_svc, "GET", "/readings").release()

    def now_jwt():
        caller = full.identify(cached)
        gate.admit(caller, garden_svc, "GET", "/readings").release()

    n, r = args.calls, args.rounds
    out = {
        "anonymous, default config": {"today": cpu_per_call(today_anon, n, r), "now": cpu_per_call(now_anon, n, r)},
        "static token, 20 rules, 2 quotas": {
            "today": cpu_per_call(today_static, n, r),
            "now": cpu_per_call(now_static, n, r),
        },
        "cached JWT (ES256), 20 rules, 2 quotas": {
            "today": cpu_per_call(today_static, n, r),  # today's nearest: a static token
            "now": cpu_per_call(now_jwt, n, r),
        },
    }
    for row in out.values():
        row["added_us"] = round(row["now"]["median_us"] - row["today"]["median_us"], 3)
    uncached = {}
    for alg, key in keys.items():
        tokens = [request(token(key, alg, i)) for i in range(max(50, n // 200))]
        it = iter(tokens)
        m = len(tokens) // r
        uncached[alg] = cpu_per_call(lambda it=it: full.identify(next(it)), m, r)
    out["uncached JWT (signature check + claims)"] = uncached
    return out


# -- the burst ---------------------------------------------------------------------------------------------


async def burst(port: int, total: int, conns: int = 16) -> dict:
    req = b"GET /svc/pump/x HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer g-token\r\n\r\n"
    statuses: dict[int, int] = {}
    lat: dict[int, list[float]] = {}
    left = [total]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left[0] > 0:
                left[0] -= 1
                t0 = time.perf_counter()
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                status = int(head.split(b" ", 2)[1])
                statuses[status] = statuses.get(status, 0) + 1
                lat.setdefault(status, []).append((time.perf_counter() - t0) * 1e6)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    wall = time.perf_counter() - t0

    def pct(values: list[float], p: float) -> float:
        values = sorted(values)
        return round(values[min(len(values) - 1, int(p * len(values)))], 1) if values else 0.0

    return {
        "wall_s": round(wall, 3),
        "statuses": statuses,
        "latency_us": {str(s): {"p50": pct(v, 0.5), "p99": pct(v, 0.99)} for s, v in lat.items()},
    }


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def burst_figures(args, tmp: Path, stack: ExitStack) -> dict:
    from bench import start_backend

    notes: list[str] = []
    backend, backend_port, backend_name = start_backend(tmp, notes)
    stack.callback(backend.stop)
    out = {"backend": backend_name}
    for name, quota in (("no quota", ""), (f"{args.rate:g}/s quota", f"[quotas.garden]\nrate = {args.rate}\n")):
        d = Edged(
            tmp / name.replace(" ", "-").replace("/", ""),
            {"pump.toml": PUMP.format(port=backend_port)},
            '[tenants.garden]\ntokens = ["g-token"]\n' + quota,
        )
        text = d.config.read_text().replace("[log]\n", '[log]\nlevel = "warning"\n', 1)
        d.config.write_text(text)
        stack.callback(d.kill)
        d.start()
        assert d.proc is not None
        asyncio.run(burst(d.port, 200))  # warm: connections, imports, caches (and the bucket is refilled below)
        time.sleep(1.0 + 100 / max(args.rate, 1))
        cpu0 = cpu_seconds(d.proc.pid)
        res = asyncio.run(burst(d.port, args.burst))
        cpu = cpu_seconds(d.proc.pid) - cpu0
        d.kill()
        res["daemon_cpu_s"] = round(cpu, 3)
        res["daemon_cpu_us_per_call"] = round(cpu / args.burst * 1e6, 1)
        out[name] = res
    return out


def callcost_files(folder: Path) -> str:
    """The config of a call with everything on its path (for scripts/callcost.py); returns its header."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, jwks = key_sets()
    (folder / "jwks.json").write_text(json.dumps(jwks))
    lines = [
        "[access.jwt]",
        f'issuer = "{ISSUER}"',
        'audience = "edged"',
        f'jwks_file = "{(folder / "jwks.json").resolve()}"',
        "[authz]",
        'tenants = { default = "deny" }',
    ]
    for i in range(18):
        lines += ["[[authz.rules]]", f'name = "r{i}"', 'action = "allow"', f'service = "svc-{i}"']
        lines += [f'from = ["default/app-{i}"]', 'methods = ["GET"]']
    lines += ["[[authz.rules]]", 'name = "no-setpoint"', 'action = "deny"', 'service = "bench"']
    lines += ['paths = ["/setpoint"]']
    lines += ["[[authz.rules]]", 'name = "client-bench"', 'action = "allow"', 'service = "bench"']
    lines += ['from = ["default/bench-client"]', 'methods = ["GET"]']
    lines += ["[quotas.default]", "rate = 1000000", "[quotas.\"default/bench\"]", "rate = 1000000", "in_flight = 1000"]
    (folder / "extra.toml").write_text("\n".join(lines) + "\n")
    now = int(time.time())
    body = {"iss": ISSUER, "aud": "edged", "sub": "bench-client", "tenant": "default", "exp": now + 86400}
    return "Authorization: Bearer " + jwt.encode(body, keys["ES256"], algorithm="ES256", headers={"kid": "ES256"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--burst", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--skip-burst", action="store_true")
    ap.add_argument("--json-only", action="store_true")
    ap.add_argument("--callcost-files", metavar="DIR", help="only write the callcost config and print the header")
    args = ap.parse_args()
    if args.callcost_files:
        print(callcost_files(Path(args.callcost_files)))
        return 0
    with tempfile.TemporaryDirectory(prefix="edged-authz-") as name, ExitStack() as stack:
        tmp = Path(name)
        figures = {"cpu_per_call": in_process(args, tmp)}
        if not args.skip_burst:
            figures["burst"] = burst_figures(args, tmp, stack)
    if not args.json_only:
        print("CPU per call of identity + authorization + quota (µs, median of rounds; best in brackets)")
        for case, row in figures["cpu_per_call"].items():
            if "today" in row:
                print(
                    f"  {case:40s} today {row['today']['median_us']:7.2f} ({row['today']['best_us']:.2f})"
                    f"  now {row['now']['median_us']:7.2f} ({row['now']['best_us']:.2f})  added {row['added_us']:.2f}"
                    f"  target <= 10: {'PASS' if row['added_us'] <= 10 else 'MISS'}"
                )
            else:
                for alg, v in row.items():
                    print(f"  {case} {alg:6s} {v['median_us']:8.1f} ({v['best_us']:.1f})")
        for name, res in figures.get("burst", {}).items():
            if name == "backend":
                continue
            print(
                f"burst of {args.burst} calls, {name}: {res['statuses']} in {res['wall_s']} s;"
                f" latency {res['latency_us']}; daemon CPU {res['daemon_cpu_s']} s"
                f" ({res['daemon_cpu_us_per_call']} µs per call)"
            )
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
