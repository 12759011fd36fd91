#!/usr/bin/env python3
"""Figures of the cloud tier, measured with real parts: Mosquitto on loopback, `edged bridge`, the daemon,
and a real HTTP backend (tests/backend.py).

1. Cloud call round trip (client -> edged -> MQTT -> bridge -> backend and back), one call at a time,
   p50/p99, against a direct HTTP call to the same backend in the same run (the two interleaved), and
   calls/s through the cloud path with 16 calls in flight.
2. Broker restart -> first successful cloud call (daemon and bridge both reconnect; `reconnect_max`).
3. Fleet config pushed once, applied on N daemons: time from the publish to each daemon's
   `fleet_config.applied` log record (same clock, ms resolution), and confirmed through the API.
4. Signed against unsigned cloud calls in the same run: a signed bridge and two daemons with node
   identities (a test fleet CA), one sealing each request and answer with ECDSA (`[mqtt] macs = false`),
   one MAC'ing them per pair (the default); the three paths and a direct call interleaved, one call at a
   time (p50/p99), then calls/s and CPU per call (daemon + bridge) of each, and what one seal and one open
   cost in this process for each scheme, bytes per message, and the ECDH + HKDF a pair costs once.

usage: scripts/cloud_figures.py [--calls 2000] [--nodes 5] [--restarts 5] [--reconnect-max 1s]
                                [--only round_trip,throughput,fleet_config,broker_restart,signatures]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiomqtt
from harness import REPO, Backend, Edged, free_port, wait_for
from loadgen import _read_response

sys.path.insert(0, str(REPO / "tests"))

from fixtures_identity import FleetCA
from fixtures_mqtt import BridgeProc, Broker, bridge_config, mosquitto_path, mqtt_section, name_node

from edged.cloud.fleet import document_text, generate_key, load_private_key, sign_document
from edged.cloud.signing import Seals

CLOUD_ONLY = """
service_name = "thermo"
endpoint_types = ["cloud"]
[policy]
retries = 1
per_try_timeout = "1s"
"""


def backend_manifest(port: int) -> str:
    return f'service_name = "thermo"\n[[endpoints]]\ntype = "local"\nurl = "http://127.0.0.1:{port}"\n'


class KeepAlive:
    """One keep-alive HTTP/1.1 connection, one call at a time (the added latency of one call)."""

    def __init__(self, port: int, path: str) -> None:
        self.port = port
        self.request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self) -> tuple[float, int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        t0 = time.perf_counter()
        self.writer.write(self.request)
        status, headers, _ = await _read_response(self.reader)
        return time.perf_counter() - t0, status, headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


async def round_trips(edged_port: int, backend_port: int, calls: int) -> dict:
    direct, cloud = KeepAlive(backend_port, "/readings"), KeepAlive(edged_port, "/svc/thermo/readings")
    for _ in range(200):  # warm up both paths (connections, pools, caches)
        await direct.call()
        await cloud.call()
    lat_direct, lat_cloud = [], []
    for _ in range(calls):
        lat, status, _ = await direct.call()
        assert status == 200
        lat_direct.append(lat)
        lat, status, headers = await cloud.call()
        assert status == 200 and headers.get("x-edged-endpoint") == "default/thermo/cloud/mqtt", headers
        lat_cloud.append(lat)
    direct.close()
    cloud.close()
    return {
        "direct_p50_ms": round(pct(lat_direct, 0.5), 3),
        "direct_p99_ms": round(pct(lat_direct, 0.99), 3),
        "cloud_p50_ms": round(pct(lat_cloud, 0.5), 3),
        "cloud_p99_ms": round(pct(lat_cloud, 0.99), 3),
        "added_p50_ms": round(pct(lat_cloud, 0.5) - pct(lat_direct, 0.5), 3),
        "added_p99_ms": round(pct(lat_cloud, 0.99) - pct(lat_direct, 0.99), 3),
        "calls": calls,
    }


async def throughput(edged_port: int, seconds: float, in_flight: int = 16) -> dict:
    done, failed = 0, 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, failed
        c = KeepAlive(edged_port, "/svc/thermo/readings")
        while time.perf_counter() < end:
            _, status, _ = await c.call()
            done += 1
            failed += status != 200
        c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return {"calls_per_s": round(done / (time.perf_counter() - t0)), "in_flight": in_flight, "failed": failed}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def interleaved(ports: dict[str, int], backend_port: int, calls: int) -> dict:
    """Round trips of a direct call and of each named daemon's cloud path, interleaved call by call (so that
    load changes hit all alike), one at a time; p50/p99 of each and what each adds over "unsigned"."""
    paths = {"direct": KeepAlive(backend_port, "/readings")}
    paths.update({name: KeepAlive(port, "/svc/thermo/readings") for name, port in ports.items()})
    for _ in range(200):
        for c in paths.values():
            await c.call()
    lat: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(calls):
        for name, c in paths.items():
            took, status, _ = await c.call()
            assert status == 200, (name, status)
            lat[name].append(took)
    for c in paths.values():
        c.close()
    out = {f"{k}_p50_ms": round(pct(v, 0.5), 3) for k, v in lat.items()}
    out.update({f"{k}_p99_ms": round(pct(v, 0.99), 3) for k, v in lat.items()})
    for name in ports:
        if name != "unsigned":
            out[f"{name}_added_p50_ms"] = round(pct(lat[name], 0.5) - pct(lat["unsigned"], 0.5), 3)
            out[f"{name}_added_p99_ms"] = round(pct(lat[name], 0.99) - pct(lat["unsigned"], 0.99), 3)
    out["calls"] = calls
    return out


def seal_costs(folder: Path, ca: FleetCA, rounds: int = 2000) -> dict:
    """CPU microseconds per seal and per open of a typical 300-byte request, in this process: ECDSA seals,
    per-pair MACs (after the first message of the pair), and the ECDH + HKDF a pair costs once."""
    from edged.cloud import pairing

    me = Seals(ca.enroll(folder / "a", "bench-a"), skew=20)
    peer = Seals(ca.enroll(folder / "b", "bench-b"), skew=20)
    payload, topic = b"x" * 300, "hubmesh/home/svc/thermo/req"
    out: dict = {}
    t0 = time.process_time()
    sealed = [me.seal(topic, payload) for _ in range(rounds)]
    t1 = time.process_time()
    for data in sealed:
        peer.open(topic, data)
    t2 = time.process_time()
    out["ecdsa"] = {
        "seal_us": round((t1 - t0) / rounds * 1e6, 1),
        "open_us": round((t2 - t1) / rounds * 1e6, 1),
        "overhead_bytes": len(sealed[0]) - len(payload),
        "per_call_us": round(2 * ((t2 - t0) / rounds) * 1e6, 1),  # request and answer: two seals, two opens
    }
    me.learn(cbor_chain(peer))  # as from the peer's sealed registry entry
    first = me.seal_to(topic, payload, [peer.name])
    peer.open(topic, first, macs=True)
    answer_topic = "hubmesh/home/reply/bench-a"
    me.open(answer_topic, peer.seal_to(answer_topic, b"ok", [me.name]), macs=True)  # the pair is acknowledged
    t0 = time.process_time()
    macd = [me.seal_to(topic, payload, [peer.name]) for _ in range(rounds)]
    t1 = time.process_time()
    for data in macd:
        peer.open(topic, data, macs=True)
    t2 = time.process_time()
    out["mac"] = {
        "seal_us": round((t1 - t0) / rounds * 1e6, 1),
        "open_us": round((t2 - t1) / rounds * 1e6, 1),
        "overhead_bytes": len(macd[0]) - len(payload),
        "first_message_overhead_bytes": len(first) - len(payload),  # with the sender's chain, once per pair
        "per_call_us": round(2 * ((t2 - t0) / rounds) * 1e6, 1),
    }
    from cryptography.hazmat.primitives.asymmetric import ec

    mine, theirs = me._own.key, peer._own.key.public_key()
    t0 = time.process_time()
    for _ in range(rounds // 4):
        shared = mine.exchange(ec.ECDH(), theirs)
        pairing.pair_key(shared, "home", (b"a" * 32, "spiffe://home/node/a"), (b"b" * 32, "spiffe://home/node/b"))
    out["pair_derive_us"] = round((time.process_time() - t0) / (rounds // 4) * 1e6, 1)  # once per pair
    return out


def cbor_chain(seals: Seals) -> list[bytes]:
    import cbor2

    return cbor2.loads(seals.seal("x", b""))["c"]


def signatures(root: Path, broker: Broker, backend: Backend, plain: tuple[Edged, BridgeProc], args) -> dict:
    """Unsigned, ECDSA-sealed (`[mqtt] macs = false`: every request and answer signed and verified) and MAC'd
    per pair (the default) side by side: same broker, backend and signed bridge (which answers each request
    as it came: a MAC'd one MAC'd, a sealed one sealed)."""
    ca = FleetCA("home")
    prefix = f"sig{int(time.time())}"
    bridge = BridgeProc(
        root / "bridge-signed", bridge_config(broker, prefix), {"thermo.toml": backend_manifest(backend.port)}
    )
    (bridge.root / "state" / "identity").mkdir(parents=True)
    ca.enroll(bridge.root / "state" / "identity", "cloud-1")
    started: list = [bridge.start()]
    try:
        daemons: dict[str, tuple[Edged, BridgeProc]] = {"unsigned": plain}
        for name, keys in (("ecdsa", {"macs": False}), ("mac", {})):
            section = mqtt_section(broker, prefix, **keys)
            d = name_node(Edged(root / f"node-{name}", {"thermo.toml": CLOUD_ONLY}, section), f"node-{name}")
            (d.root / "state" / "identity").mkdir(parents=True)
            ca.enroll(d.root / "state" / "identity", f"node-{name}")
            started.append(d.start())
            wait_for(lambda d=d: d.call("thermo", "/r")[0] == 200, 15, what=f"first {name} cloud call")
            assert '"mqtt.unsigned"' not in d.log_text()
            daemons[name] = (d, bridge)
        ports = {name: dd.port for name, (dd, _) in daemons.items()}
        out: dict = {"round_trip": asyncio.run(interleaved(ports, backend.port, args.calls))}
        for name, (dd, bb) in daemons.items():
            pids = [dd.proc.pid, bb.proc.pid]
            cpu0 = [cpu_seconds(pid) for pid in pids]
            tp = asyncio.run(throughput(dd.port, args.seconds))
            calls = tp["calls_per_s"] * args.seconds
            cpu = [cpu_seconds(pid) - c0 for pid, c0 in zip(pids, cpu0, strict=True)]
            tp["daemon_cpu_us_per_call"] = round(cpu[0] / calls * 1e6, 1)
            tp["bridge_cpu_us_per_call"] = round(cpu[1] / calls * 1e6, 1)
            out[f"throughput_{name}"] = tp
        out["seal_costs"] = seal_costs(root / "seal-costs", ca)
        return out
    finally:
        for p in reversed(started):
            (p.stop if isinstance(p, Edged) else p.kill)()


def restart_to_first_call(broker: Broker, d: Edged, restarts: int, down_for: float) -> dict:
    samples = []
    for _ in range(restarts):
        broker.kill()
        time.sleep(down_for)
        broker.start()  # returns once the broker is listening
        back = time.monotonic()
        wait_for(lambda: d.call("thermo", "/r")[0] == 200, 30, interval=0.005, what="first cloud call")
        samples.append(time.monotonic() - back)
    return {
        "restarts": restarts,
        "broker_down_s": down_for,
        "median_s": round(statistics.median(samples), 3),
        "max_s": round(max(samples), 3),
        "samples_s": [round(s, 3) for s in samples],
    }


def applied_at(log: Path, version: int) -> float | None:
    """Wall-clock time of the daemon's `fleet_config.applied` record for `version`."""
    for line in log.read_text().splitlines():
        if '"fleet_config.applied"' in line:
            rec = json.loads(line)
            if rec.get("version") == version:
                return datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
    return None


async def publish_retained(port: int, topic: str, payload: bytes) -> float:
    """Publish (QoS 1, retained); returns the wall-clock time just before the publish."""
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        t0 = time.time()
        await c.publish(topic, payload, qos=1, retain=True)
        return t0


def fleet_push(broker: Broker, prefix: str, daemons: list[Edged], key_file: Path, pushes: int) -> dict:
    key = load_private_key(str(key_file))
    worst = []
    for i in range(pushes):
        version = 10 + i
        chosen = "round_robin" if i % 2 == 0 else "priority"
        doc = document_text({"version": version, "fleet": "home", "policies": {"thermo": {"strategy": chosen}}})
        wire = sign_document(doc, key)

        t0 = asyncio.run(publish_retained(broker.port, f"{prefix}/home/config", wire))
        for d in daemons:  # confirmed through the API, not only the log
            wait_for(lambda d=d, s=chosen: d.get("/v1/services/thermo")["strategy"] == s, 10, what="fleet config")
        delays = []
        for d in daemons:
            at = wait_for(lambda d=d, v=version: applied_at(d.log, v), 5, what="applied log record")
            delays.append(at - t0)
        worst.append(max(delays))
    return {
        "nodes": len(daemons),
        "pushes": pushes,
        "worst_node_ms_per_push": [round(w * 1000, 1) for w in worst],
        "max_ms": round(max(worst) * 1000, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5.0, help="throughput run length")
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--pushes", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--down-for", type=float, default=2.0, help="seconds the broker stays down each time")
    ap.add_argument("--reconnect-max", default="1s", help="[mqtt] reconnect_max of daemon and bridge")
    ap.add_argument("--keep", action="store_true", help="keep the logs and configs (printed) instead of removing them")
    ap.add_argument("--only", default="round_trip,throughput,fleet_config,broker_restart,signatures")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if mosquitto_path() is None:
        print("mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="cloud-figures-"))
    prefix = f"fig{int(time.time())}"
    broker = Broker(root / "broker").start()
    backend = Backend("cloud-backend", free_port(), root).start()
    started: list = [backend]
    out: dict = {}
    try:
        bridge_cfg = bridge_config(broker, prefix).replace(
            'reconnect_max = "500ms"', f'reconnect_max = "{args.reconnect_max}"'
        )
        bridge = BridgeProc(root / "bridge", bridge_cfg, {"thermo.toml": backend_manifest(backend.port)}).start()
        started.append(bridge)
        private_pem, public_pem, _ = generate_key()
        (root / "ops.key").write_bytes(private_pem)
        (root / "ops.pub").write_bytes(public_pem)
        extra = (
            mqtt_section(broker, prefix, reconnect_max=args.reconnect_max) + f'[fleet]\nkeys = ["{root / "ops.pub"}"]\n'
        )
        daemons = []
        for i in range(args.nodes):
            d = name_node(Edged(root / f"node{i}", {"thermo.toml": CLOUD_ONLY}, extra), f"node-{i}").start()
            started.append(d)
            daemons.append(d)
        first = daemons[0]
        wait_for(lambda: first.call("thermo", "/r")[0] == 200, 15, what="first cloud call")
        if "round_trip" in only:
            out["round_trip"] = asyncio.run(round_trips(first.port, backend.port, args.calls))
        if "throughput" in only:
            out["throughput"] = asyncio.run(throughput(first.port, args.seconds))
        if "signatures" in only:
            out["signatures"] = signatures(root, broker, backend, (first, bridge), args)
        if "fleet_config" in only:
            out["fleet_config"] = fleet_push(broker, prefix, daemons, root / "ops.key", args.pushes)
        if "broker_restart" in only:
            out["broker_restart"] = restart_to_first_call(broker, first, args.restarts, args.down_for)
            out["broker_restart"]["reconnect_max"] = args.reconnect_max
    finally:
        for p in reversed(started):
            (p.stop if isinstance(p, Edged) else p.kill)()
        broker.kill()
    if args.keep:
        out["logs"] = str(root)
    else:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
