#!/usr/bin/env python3
"""A simulated fleet on a real Mosquitto, and one real daemon among it: what a box learns and how fast it
stops routing to boxes that die.

Each simulated box has its own MQTT connection, publishes what a real box publishes (retained JSON status
with its last will `offline`, one CBOR registry entry per service made with `spec_entry()`, the status
again every `--status-every` s) and answers the cloud calls for its services. Boxes speak a tiny MQTT
3.1.1 client of their own (below) because the simulator must die in ways no library allows on purpose:
`abrupt` closes the socket with no DISCONNECT (the broker sends the will at once), `clean` deletes the
box's retained entries, says offline and disconnects (as `edged` does on SIGTERM), `powercut` stops
reading, writing and pinging with the socket left open (the broker notices only after 1.5 x keepalive).

The liveness scenario (issue "a dead box's services stop being routed"), per death mode: the daemon starts
with the fleet's registry in its state dir (as after a previous run), calls at `--rate` calls/s spread over
the fleet's services, 10 % of the boxes die at once, and it reports the time from each death to the broker's
announcement (the offline status an observer sees) and to the last call routed to the dead box, failed calls
where another endpoint exists (services of dead boxes with a local fallback: target 0), and memory and
state size before, after the deaths, and after `offline_ttl` (scaled down: simulated time).

The learn scenario (issue "a fleet of a thousand boxes"; `--scenario learn`), for each `--boxes` count: the
fleet is on the broker first; the daemon routes `--needed` of the fleet's services over the cloud tier
(cloud-only manifests) and serves one of its own (`here`, a local backend). It reports the time from the
daemon's connect to knowing every needed service with its provider online, the CPU and RSS it took (RSS
against the same daemon on an empty broker: its idle RSS; once the registry is saved, also per remote entry
kept, `rss_per_entry_kib`), a local call's latency next to a direct call to
the same backend while the retained burst arrives (a separate process calls, one call at a time; the burst
is made again by taking over the daemon's MQTT client id, as a reconnect does) with the daemon's loop lag
meanwhile (its `edged_loop_lag_seconds` samples over 5 and 20 ms), the state file, a warm
start, the time from a provider's death to the daemon withdrawing it (last will) and the time to answer
cloud calls again after the daemon's broker is killed (`[mqtt] url` = the site broker, then the central
one). `--topology bridge` puts the fleet on a central broker and the daemon on a site broker bridged to it
with config/mosquitto/bridge.conf; `direct` puts both on one broker (failover: a second, empty broker).

Fleet config is pushed twice: version 1 as soon as the other daemons are connected (they are still taking the
fleet's retained messages: following a whole fleet, the document waits behind them on each connection), and
version 2 once every daemon knows the whole registry (what applying a document costs); both give the time
until all daemons apply it, and each daemon's own time.

`--pin` puts the box on CPU 0 (the measured daemon, its local backend and the process that calls it) and the
fleet on CPU 1 (brokers, the simulated boxes, the other daemons): on a real box the fleet is not on the box's
CPU. Without it everything shares every CPU.

usage: scripts/fleetsim.py [--boxes 200] [--services 10] [--rate 100] [--modes abrupt,clean,powercut]
       scripts/fleetsim.py --scenario learn --boxes 50,200,500,1000,2000 [--topology direct,bridge] [--pin]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import cbor2
from harness import REPO, Backend, Edged, wait_for
from loadgen import LoadGen, summary

sys.path.insert(0, str(REPO / "tests"))

from fixtures_mqtt import Broker, cloud_first_manifest, mqtt_section, name_node, site_broker_config

from edged.cloud.envelope import CloudAnswer, decode_request, encode_answer
from edged.cloud.fleet import document_text, generate_key, load_private_key, sign_document
from edged.cloud.registry_log import LOG_FILE, read_log
from edged.cloud.registry_sync import STATE_FILE, spec_entry
from edged.cloud.topics import Topics, service_key
from edged.manifest import parse_manifest_data

FLEET = "home"


# -- a tiny MQTT 3.1.1 client that can die on purpose ---------------------------------------------------------


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    n, out = len(body), bytearray([first])
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out) + body


class MiniMqtt:
    """CONNECT with a retained will, PUBLISH (QoS 0/1), SUBSCRIBE, keepalive pings; and ways to die."""

    def __init__(self, host: str, port: int, client_id: str, keepalive: int) -> None:
        self.host, self.port, self.client_id, self.keepalive = host, port, client_id, keepalive
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.on_publish = lambda topic, payload: None
        self._ids = iter(range(1, 1 << 30))
        self._tasks: list[asyncio.Task] = []

    async def connect(self, will_topic: str, will_payload: bytes) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        flags = 0x02 | 0x04 | (1 << 3) | 0x20  # clean session, will, will QoS 1, will retained
        var = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", self.keepalive)
        self.writer.write(_packet(0x10, var + _str(self.client_id) + _str(will_topic) + _str(will_payload)))
        head = await self.reader.readexactly(4)
        if head[0] != 0x20 or head[3] != 0:
            raise ConnectionError(f"CONNACK refused: {head!r}")
        self._tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._ping())]

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        assert self.writer is not None
        var = _str(topic) + (struct.pack("!H", next(self._ids)) if qos else b"")
        self.writer.write(_packet(0x30 | (qos << 1) | int(retain), var + payload))

    def subscribe(self, filters: list[str]) -> None:
        assert self.writer is not None
        body = struct.pack("!H", next(self._ids)) + b"".join(_str(f) + b"\x00" for f in filters)
        self.writer.write(_packet(0x82, body))

    async def _read(self) -> None:
        assert self.reader is not None and self.writer is not None
        try:
            while True:
                first = (await self.reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    b = (await self.reader.readexactly(1))[0]
                    length |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                body = await self.reader.readexactly(length)
                if first >> 4 == 3:  # PUBLISH
                    qos = (first >> 1) & 3
                    tlen = struct.unpack("!H", body[:2])[0]
                    topic, rest = body[2 : 2 + tlen].decode(), body[2 + tlen :]
                    if qos:
                        self.writer.write(_packet(0x40, rest[:2]))
                        rest = rest[2:]
                    self.on_publish(topic, rest)
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def _ping(self) -> None:
        assert self.writer is not None
        while True:
            await asyncio.sleep(self.keepalive / 2)
            self.writer.write(b"\xc0\x00")

    async def disconnect(self) -> None:
        """A clean end: DISCONNECT, so the broker drops the will."""
        assert self.writer is not None
        self.writer.write(b"\xe0\x00")
        await self.writer.drain()
        self._stop_tasks()
        self.writer.close()

    def abort(self) -> None:
        """The process died: the socket closes with no DISCONNECT (the broker sends the will at once)."""
        self._stop_tasks()
        if self.writer is not None:
            self.writer.transport.abort()

    def freeze(self) -> None:
        """The power is cut: nothing more is read, written or pinged; the socket stays open."""
        self._stop_tasks()
        if self.writer is not None:
            self.writer.transport.pause_reading()

    def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()


# -- simulated boxes ----------------------------------------------------------------------------------------


@dataclass
class SimBox:
    index: int
    services: int
    topics: Topics
    keepalive: int
    name: str = ""
    service_names: list[str] = field(default_factory=list)
    mqtt: MiniMqtt | None = None
    answered: int = 0

    def __post_init__(self) -> None:
        self.name = f"sim-{self.index:04d}"
        self.service_names = [f"s{self.index:04d}-{j}" for j in range(self.services)]

    def status(self, state: str, **extra: object) -> bytes:
        doc = {"state": state, "node": self.name, "fleet": FLEET, "zone": "", **extra}
        if state == "online":
            doc.update(vitals={"cpu": "20", "bat": "", "link": "", "power": "mains"}, services=self.keys())
            doc["ts"] = round(time.time(), 3)
        return json.dumps(doc, separators=(",", ":")).encode()

    def keys(self) -> list[str]:
        return [service_key("default", s) for s in self.service_names]

    def entries(self) -> dict[str, dict]:
        out = {}
        for svc in self.service_names:
            spec = parse_manifest_data({"service_name": svc}, "sim.toml")
            out[service_key("default", svc)] = spec_entry(spec, node=self.name, zone="", cloud=True)
        return out

    async def start(self, host: str, port: int) -> None:
        self.mqtt = MiniMqtt(host, port, f"fleetsim-{self.name}-{os.getpid()}", self.keepalive)
        self.mqtt.on_publish = self._on_request
        await self.mqtt.connect(self.topics.status(self.name), self.status("offline", reason="lost"))
        self.mqtt.subscribe([self.topics.request(s) for s in self.service_names])
        self.mqtt.publish(self.topics.status(self.name), self.status("online"), qos=1, retain=True)
        for svc, entry in zip(self.service_names, self.entries().values(), strict=True):
            self.mqtt.publish(self.topics.service(self.name, "default", svc), cbor2.dumps(entry), qos=1, retain=True)

    def _on_request(self, topic: str, payload: bytes) -> None:
        try:
            req = decode_request(payload)
        except Exception:
            return
        body = json.dumps({"name": self.name, "service": req.service}).encode()
        answer = CloudAnswer(req.id, 200, ((b"content-type", b"application/json"),), body, self.name)
        assert self.mqtt is not None
        self.mqtt.publish(req.reply, encode_answer(answer))
        self.answered += 1

    def announce(self) -> None:
        assert self.mqtt is not None
        self.mqtt.publish(self.topics.status(self.name), self.status("online"), qos=1, retain=True)

    async def die(self, mode: str) -> None:
        assert self.mqtt is not None
        if mode == "abrupt":
            self.mqtt.abort()
        elif mode == "powercut":
            self.mqtt.freeze()
        else:  # clean: what edged does on SIGTERM
            for svc in self.service_names:
                self.mqtt.publish(self.topics.service(self.name, "default", svc), b"", qos=1, retain=True)
            offline = self.status("offline", reason="shutdown")
            self.mqtt.publish(self.topics.status(self.name), offline, qos=1, retain=True)
            await asyncio.sleep(0.2)  # as edged does: each publish is acknowledged before the DISCONNECT
            await self.mqtt.disconnect()


class Fleet:
    def __init__(self, boxes: int, services: int, prefix: str, keepalive: int) -> None:
        self.topics = Topics(prefix, FLEET)
        self.boxes = [SimBox(i, services, self.topics, keepalive) for i in range(boxes)]
        self._announcer: asyncio.Task | None = None

    async def start(self, host: str, port: int, parallel: int = 50) -> None:
        sem = asyncio.Semaphore(parallel)

        async def one(box: SimBox) -> None:
            async with sem:
                await box.start(host, port)

        await asyncio.gather(*(one(b) for b in self.boxes))

    def announce_every(self, seconds: float, alive: list[SimBox]) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                for box in alive:
                    box.announce()

        self._announcer = asyncio.ensure_future(loop())

    def state_document(self) -> dict:
        """The daemon's `cloud-registry.json` as a previous run would have saved it (a warm start)."""
        now = round(time.time(), 3)
        return {
            "format": 1,
            "prefix": self.topics.prefix,
            "fleet": FLEET,
            "saved": now,
            "nodes": {b.name: {**json.loads(b.status("online")), "seen": now, "since": now} for b in self.boxes},
            "entries": {b.name: b.entries() for b in self.boxes},
        }

    async def close(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
        for box in self.boxes:
            if box.mqtt is not None:
                box.mqtt.abort()


class Observer:
    """Another client of the broker: when each box's offline status is announced."""

    def __init__(self, host: str, port: int, topics: Topics) -> None:
        self.mqtt = MiniMqtt(host, port, f"fleetsim-observer-{os.getpid()}", 60)
        self.topics = topics
        self.offline_at: dict[str, float] = {}

    async def start(self) -> None:
        def on(topic: str, payload: bytes) -> None:
            parsed = self.topics.parse_node_topic(topic)
            if parsed and payload and json.loads(payload).get("state") == "offline":
                self.offline_at.setdefault(parsed[0], time.monotonic())

        self.mqtt.on_publish = on
        await self.mqtt.connect(f"{self.topics.base}/observer/status", b"")
        self.mqtt.subscribe([self.topics.all_status])


# -- the scenario -------------------------------------------------------------------------------------------


def daemon_learned(log_text: str, nodes: set[str]) -> dict[str, float]:
    """When the daemon logged each node going offline (wall clock, from its JSON log)."""
    out: dict[str, float] = {}
    for line in log_text.splitlines():
        if '"mqtt.node_state"' not in line or '"offline"' not in line:
            continue
        rec = json.loads(line)
        if rec.get("node") in nodes and rec["node"] not in out:
            out[rec["node"]] = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pin(pid: int, cpus: set[int]) -> None:
    """Run every thread of process `pid` on `cpus` (threads made later inherit it from their maker)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task), cpus)


BOX_CPU, FLEET_CPU = {0}, {1}  # `--pin`


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def liveness_run(args, mode: str, tmp: Path) -> dict:
    broker = Broker(tmp / f"broker-{mode}", extra=args.broker_conf.replace("\\n", "\n")).start()
    fleet = Fleet(args.boxes, args.services, f"sim{os.getpid()}", args.keepalive)
    dying = random.Random(7).sample(fleet.boxes, max(1, args.boxes // 10))
    alive = [b for b in fleet.boxes if b not in dying]
    backend = Backend("local-fallback", _free_port(), tmp).start()
    fallbacks = {b.service_names[0] for b in dying} | {b.service_names[0] for b in alive[: len(dying)]}
    # The other endpoint of some services: a local one on the daemon, the cloud tier first.
    manifests = {
        f"{s}.toml": cloud_first_manifest(s, backend.port, per_try="2s", timeout="5s") for s in sorted(fallbacks)
    }
    d = Edged(
        tmp / f"edged-{mode}",
        manifests,
        # Calls go to every service of the fleet: this daemon follows the whole registry.
        mqtt_section(
            broker, fleet.topics.prefix, keepalive=f"{args.keepalive}s", offline_ttl=f"{args.ttl}s", follow=["*"]
        ),
    )
    state = d.root / "state"
    state.mkdir(parents=True, exist_ok=True)
    (state / STATE_FILE).write_text(json.dumps(fleet.state_document()))
    observer = Observer("127.0.0.1", broker.port, fleet.topics)
    out: dict = {"mode": mode, "boxes": args.boxes, "services": args.boxes * args.services}
    try:
        await fleet.start("127.0.0.1", broker.port)
        await observer.start()
        fleet.announce_every(args.status_every, alive)
        t0 = time.monotonic()
        d.start()
        out["warm_start_s"] = round(time.monotonic() - t0, 2)
        pid = d.proc.pid
        wait_for(lambda: d.get("/v1/status") is not None, 20)
        await asyncio.sleep(2.0)  # let the retained burst settle
        out["rss_before_mib"] = round(rss_kib(pid) / 1024, 1)
        out["state_before_kb"] = round((state / STATE_FILE).stat().st_size / 1024)
        all_services = [s for b in fleet.boxes for s in b.service_names]
        rng = random.Random(1)
        load = LoadGen("127.0.0.1", d.port, "/", timeout=10, paths=lambda i: f"/svc/{rng.choice(all_services)}/r")
        died: dict[str, float] = {}
        died_wall: list[float] = []

        async def kill() -> None:
            t = time.monotonic()
            died_wall.append(time.time())
            for box in dying:
                died[box.name] = t
            await asyncio.gather(*(box.die(mode) for box in dying))

        lags: list[float] = []

        async def lag_probe() -> None:
            """The simulator's own loop lag: when it is large, its boxes answer late (not the daemon's fault)."""
            while True:
                t = time.monotonic()
                await asyncio.sleep(0.05)
                lags.append(time.monotonic() - t - 0.05)

        probe = asyncio.ensure_future(lag_probe())

        cpu0 = cpu_s(pid)
        duration = args.before + args.after + (1.5 * args.keepalive if mode == "powercut" else 0)
        t_load = time.monotonic()
        results = await load.run(args.rate, duration, at={args.before: kill})
        probe.cancel()
        out["cpu_during_s"] = round(cpu_s(pid) - cpu0, 2)
        out["sim_loop_lag_ms_p99"] = round(sorted(lags)[int(0.99 * len(lags))] * 1000, 1) if lags else None
        dead_services = {s: b.name for b in dying for s in b.service_names}
        announce = [observer.offline_at.get(b.name, float("nan")) - died[b.name] for b in dying]
        out["announce_s_max"] = round(max(announce), 3)
        learned = daemon_learned(d.log_text(), {b.name for b in dying})
        out["daemon_learned_s_max"] = (
            round(max(learned.values()) - died_wall[0], 3)
            if len(learned) == len(dying)
            else f"{len(learned)} of {len(dying)}"
        )
        # A call routed to a dead box: it reached the cloud endpoint of a dead box's service (answered or not),
        # or spent a try there before the local fallback.
        last_routed = []
        failed_fallback = failed_remote_only = 0
        for r in results:
            svc = r.path.split("/")[2]
            node = dead_services.get(svc)
            if node is None:
                continue
            started = t_load + r.started
            if started < died[node]:
                continue
            routed = r.endpoint.endswith("/cloud/mqtt") or r.tries > 1 or (r.status >= 500 and r.latency > 1.0)
            if routed:
                last_routed.append(started - observer.offline_at.get(node, died[node]))
            if r.status == 0 or r.status >= 500:
                if svc in fallbacks:
                    failed_fallback += 1
                else:
                    failed_remote_only += 1
        out["last_routed_after_announce_s"] = round(max(last_routed), 3) if last_routed else None
        out["calls"] = summary(results)
        out["failed_with_fallback"] = failed_fallback
        out["failed_remote_only"] = failed_remote_only
        out["rss_after_deaths_mib"] = round(rss_kib(pid) / 1024, 1)
        # Simulated time: offline_ttl is scaled down; after it the dead boxes' entries are gone.
        announced = max(observer.offline_at.get(b.name, died[b.name]) for b in dying)
        remaining = args.ttl + 3 - (time.monotonic() - announced)  # + the sweep interval (2 s) and a second
        if remaining > 0:
            await asyncio.sleep(remaining)
        out["rss_after_ttl_mib"] = round(rss_kib(pid) / 1024, 1)
        out["stop_exit"] = d.stop(timeout=60)  # a clean stop writes the registry file now
        out["state_after_ttl_kb"] = round((state / STATE_FILE).stat().st_size / 1024)
        saved = json.loads((state / STATE_FILE).read_text())
        out["nodes_known_after_ttl"] = len(set(saved["nodes"]) | set(saved["entries"]))
    finally:
        await fleet.close()
        observer.mqtt.abort()
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
        backend.kill()
        broker.kill()
    return out


def _free_port() -> int:
    from harness import free_port

    return free_port()


# -- the learn scenario -------------------------------------------------------------------------------------

PROBE = r"""
import http.client, json, sys, time
port, direct, seconds, gap = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
out = {"mesh": [], "direct": []}
conns = {k: http.client.HTTPConnection("127.0.0.1", p) for k, p in (("mesh", port), ("direct", direct))}
paths = {"mesh": "/svc/here/x", "direct": "/x"}
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for kind in ("mesh", "direct"):
        t = time.perf_counter()
        conns[kind].request("GET", paths[kind])
        r = conns[kind].getresponse(); r.read()
        out[kind].append((time.perf_counter() - t, r.status))
    time.sleep(gap)
print(json.dumps(out), flush=True)
"""


async def probe_calls(
    port: int, direct: int, seconds: float, cpus: set[int] | None = None, gap: float = 0.005
) -> asyncio.subprocess.Process:
    """A separate process calling the daemon's local service and the backend directly, one call at a time
    (the simulator's own event loop is busy with a thousand boxes: it must not time the calls); on `cpus`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROBE, str(port), str(direct), str(seconds), str(gap), stdout=asyncio.subprocess.PIPE
    )
    if cpus is not None:
        pin(proc.pid, cpus)
    assert proc.stdout is not None
    assert (await proc.stdout.readline()).strip() == b"ready"
    return proc


async def probe_result(proc: asyncio.subprocess.Process) -> dict:
    out, _ = await proc.communicate()
    doc = json.loads(out.decode().strip().splitlines()[-1])
    res = {}
    for kind, calls in doc.items():
        lat = sorted(t for t, _ in calls)
        res[kind] = {
            "calls": len(lat),
            "failed": sum(1 for _, st in calls if st != 200),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 2),
            "p99_ms": round(lat[int(0.99 * len(lat))] * 1000, 2),
            "max_ms": round(lat[-1] * 1000, 2),
        }
    return res


def connected_at(log_text: str, after: float = 0.0) -> float | None:
    """Wall-clock time of the daemon's first `mqtt.connected` after `after`."""
    for line in log_text.splitlines():
        if '"mqtt.connected"' in line:
            ts = datetime.fromisoformat(json.loads(line)["ts"].replace("Z", "+00:00")).timestamp()
            if ts >= after:
                return ts
    return None


def loop_lag_buckets(d: Edged) -> dict[float, int]:
    """The daemon's `edged_loop_lag_seconds` histogram: cumulative sample counts by upper bound (s)."""
    out: dict[float, int] = {}
    for line in d.api.request("GET", "/metrics")[2].decode().splitlines():
        if line.startswith("edged_loop_lag_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if bound == "+Inf" else float(bound)] = int(float(line.rsplit(" ", 1)[1]))
    return out


def lag_summary(before: dict[float, int], after: dict[float, int]) -> dict:
    """The loop-lag samples taken between two readings (4 a second): how many, how many over 5 and 20 ms,
    and the bucket of the largest ("<= 0.05": the worst sample was 20-50 ms)."""
    delta = {b: after.get(b, 0) - before.get(b, 0) for b in sorted(after)}
    total = delta.get(float("inf"), 0)
    worst = next((b for b in sorted(delta) if delta[b] == total), None)
    return {
        "samples": total,
        "over_5ms": total - delta.get(0.005, 0),
        "over_20ms": total - delta.get(0.02, 0),
        "max_le_s": worst,
    }


def known_services(d: Edged) -> int:
    """How many services a daemon knows (its own and those learned)."""
    return int((d.get("/v1/status?limit=1").get("services_summary") or {}).get("total", 0))


async def applied_times(daemons: list[Edged], strategy: str, since: float, timeout: float) -> list[float | None]:
    """Seconds from `since` until each daemon's service `here` has `strategy` (None: not within `timeout`)."""
    times: list[float | None] = [None] * len(daemons)

    def check() -> bool:
        for i, x in enumerate(daemons):
            if times[i] is None and x.get("/v1/services/here")["strategy"] == strategy:
                times[i] = round(time.monotonic() - since, 3)
        return None not in times

    await poll_until(check, timeout)
    return times


async def poll_until(check, timeout: float, interval: float = 0.01) -> bool:
    """Call `check` (blocking: in a thread) until it is true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if await asyncio.to_thread(check):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


async def learn_run(args, boxes: int, topology: str, tmp: Path) -> dict:
    """One row of the learn table (see the module doc)."""
    root = tmp / f"learn-{topology}-{boxes}"
    extra = args.broker_conf.replace("\\n", "\n")
    fleet = Fleet(boxes, args.services, f"sim{os.getpid()}x{boxes}", args.keepalive)
    central = Broker(root / "central", extra=extra).start()
    if topology == "bridge":
        site = Broker(root / "site", extra=site_broker_config(central.port, fleet.topics.prefix)).start()
        wait_for(lambda: "hubmesh-bridge" in central.log.read_text(), 10)
        second = central  # the daemon fails over from the site broker to the central one
    else:  # one broker (failover is measured with the bridge: the fleet is on the broker the daemon moves to)
        site = second = central
    rng = random.Random(boxes)
    needed_boxes = rng.sample(fleet.boxes, min(args.needed, boxes))
    needed = [b.service_names[0] for b in needed_boxes]
    backend = Backend("here", _free_port(), root).start()
    if args.pin:
        assert backend.proc is not None
        pin(backend.proc.pid, BOX_CPU)
    cloud_only = 'endpoint_types = ["cloud"]\n[policy]\nper_try_timeout = "1s"\ntimeout = "3s"\n'
    manifests = {f"{s}.toml": f'service_name = "{s}"\n{cloud_only}' for s in needed}
    manifests["here.toml"] = f'service_name = "here"\n[[endpoints]]\ntype = "local"\nurl = "{backend.url}"\n'
    urls = list(dict.fromkeys([site.url, second.url]))
    section = (
        mqtt_section(
            site,
            fleet.topics.prefix,
            keepalive=f"{args.keepalive}s",
            url=urls,
            switch_back="600s",
            follow=["*"] if args.follow_all else [],
        )
        + f"[limits]\npeers = 8192\nlearned_entries = {max(12000, 2 * boxes * args.services)}\n"
        + f'[fleet]\nkeys = ["{root / "ops.pub"}"]\n'
    )
    root.mkdir(parents=True, exist_ok=True)
    private_pem, public_pem, _ = generate_key()
    (root / "ops.pub").write_bytes(public_pem)
    (root / "ops.key").write_bytes(private_pem)
    out: dict = {"topology": topology, "follow": "*" if args.follow_all else "needed", "boxes": boxes}
    out.update(entries=boxes * args.services, needed=len(needed))
    daemons: list[Edged] = []
    try:
        # The same daemon on an empty broker first: its idle RSS.
        idle = Edged(root / "idle", manifests, section.replace(fleet.topics.prefix, fleet.topics.prefix + "-idle"))
        daemons.append(idle)
        t = time.monotonic()
        idle.start()
        out["idle_start_s"] = round(time.monotonic() - t, 3)
        if args.pin:
            pin(idle.proc.pid, BOX_CPU)
        await asyncio.sleep(3.0)
        idle_rss_kib = rss_kib(idle.proc.pid)
        out["idle_rss_mib"] = round(idle_rss_kib / 1024, 1)
        out["idle_cpu_s"] = round(cpu_s(idle.proc.pid), 2)
        idle.stop()

        t0 = time.monotonic()
        await fleet.start("127.0.0.1", central.port)
        out["fleet_start_s"] = round(time.monotonic() - t0, 1)
        alive = list(fleet.boxes)
        fleet.announce_every(args.status_every, alive)
        await asyncio.sleep(1.0)
        d = Edged(root / "edged", manifests, section)
        daemons.append(d)
        state = d.root / "state" / LOG_FILE
        wall0 = time.time()
        await asyncio.to_thread(d.start)
        pid = d.proc.pid
        if args.pin:
            pin(pid, BOX_CPU)

        def learned() -> bool:
            for svc in needed:
                providers = d.get(f"/v1/services/{svc}").get("providers", [])
                if not any(p["state"] == "online" for p in providers):
                    return False
            return True

        if await poll_until(learned, args.learn_timeout, interval=0.05):
            conn = connected_at(d.log_text(), wall0) or wall0
            out["learn_s"] = round(time.time() - conn, 3)
        else:
            out["learn_s"] = f"not after {args.learn_timeout} s"
        out["cpu_to_learn_s"] = round(cpu_s(pid), 2)
        await asyncio.sleep(3.0)
        # RSS once the registry is saved (its first save, a whole rewrite, is part of taking a burst in)
        await poll_until(state.exists, 15.0, interval=0.1)
        await asyncio.sleep(1.0)
        status = await asyncio.to_thread(d.get, "/v1/status")
        out["nodes_known"] = (status.get("peers_summary") or {}).get("total", len(status.get("peers", [])))
        out["rss_mib"] = round(rss_kib(pid) / 1024, 1)
        out["rss_over_idle_mib"] = round(out["rss_mib"] - out["idle_rss_mib"], 1)
        saved = read_log(str(state))  # the entries the box keeps: the ones it saves
        kept = sum(len(keys) for keys in saved.entries.values()) if saved is not None else 0
        out["entries_kept"] = kept
        # RSS growth over the idle daemon per remote entry kept (issue 15's target: <= 1 KiB)
        out["rss_per_entry_kib"] = round((rss_kib(pid) - idle_rss_kib) / kept, 2) if kept else None

        # Local calls with the fleet quiet (status messages only), then around the burst of a reconnect: another
        # client takes the daemon's client id, the daemon reconnects and gets every retained message again.
        for phase in ("quiet", "burst"):
            lag0 = await asyncio.to_thread(loop_lag_buckets, d)  # before the calls: a scrape is a stall
            probe = await probe_calls(d.port, backend.port, args.burst_window, BOX_CPU if args.pin else None)
            cpu0 = cpu_s(pid)
            if phase == "burst":
                await asyncio.sleep(0.5)
                kicker = MiniMqtt("127.0.0.1", site.port, "edged-test-node", 60)
                await kicker.connect(f"{fleet.topics.base}/kick", b"")
                kicker.abort()
            out[f"calls_{phase}"] = await probe_result(probe)
            out[f"cpu_{phase}_s"] = round(cpu_s(pid) - cpu0, 2)
            out[f"loop_lag_{phase}"] = lag_summary(lag0, await asyncio.to_thread(loop_lag_buckets, d))

        # Signed fleet config (pushed to the broker the fleet is on) reaching this daemon and `--daemons - 1`
        # others among the simulated boxes.
        others = [
            name_node(Edged(root / f"edged-{i}", manifests, section), f"real-{i}") for i in range(1, args.daemons)
        ]
        daemons.extend(others)
        await asyncio.gather(*(asyncio.to_thread(o.start, False) for o in others))  # a loaded machine: > 20 s
        for o in others:
            await poll_until(lambda o=o: o.ready() and connected_at(o.log_text()), 120, interval=0.2)
        await asyncio.sleep(1.0)
        pusher = MiniMqtt("127.0.0.1", central.port, f"fleetsim-push-{os.getpid()}", 60)
        await pusher.connect(f"{fleet.topics.base}/pusher", b"")
        everyone = [d, *others]
        out["fleet_config_daemons"] = len(everyone)
        # Version 1 at once (the others are still taking the retained burst), version 2 when all know everything.
        for version, strategy, key in ((1, "round_robin", "fleet_config"), (2, "weighted", "fleet_config_settled")):
            if version == 2:
                total = out["entries"] if args.follow_all else 0

                def settled(total: int = total) -> bool:
                    return all(known_services(x) >= total for x in everyone)

                await poll_until(settled, 120, interval=0.2)
            policies = {"here": {"strategy": strategy}}
            doc = document_text({"fleet": FLEET, "version": version, "policies": policies})
            signed = sign_document(doc, load_private_key(str(root / "ops.key")))
            t = time.monotonic()
            pusher.publish(fleet.topics.config(), signed, qos=1, retain=True)
            times = await applied_times(everyone, strategy, t, 60)
            out[f"{key}_s"] = max(times) if None not in times else f"not in 60 s: {times}"
            out[f"{key}_each_s"] = times
        pusher.abort()
        for o in others:
            o.stop(timeout=60)

        # A provider dies (its connection breaks: the broker sends its last will).
        victim = needed_boxes[0]
        alive.remove(victim)
        t = time.monotonic()
        assert victim.mqtt is not None
        victim.mqtt.abort()

        def withdrawn() -> bool:
            providers = d.get(f"/v1/services/{victim.service_names[0]}").get("providers", [])
            return any(p["node"] == victim.name and p["state"] == "offline" for p in providers)

        await poll_until(withdrawn, 30)
        out["last_will_s"] = round(time.monotonic() - t, 3)

        if topology == "bridge":
            # The site broker dies: time until a cloud call is answered again (over the central broker).
            svc = needed[-1]
            t, wall = time.monotonic(), time.time()
            site.kill()
            await poll_until(lambda: d.call(svc, "/r")[0] == 200, 60)
            out["failover_s"] = round(time.monotonic() - t, 3)
            moved = connected_at(d.log_text(), wall)
            out["failover_connected_s"] = round(moved - wall, 3) if moved else None

        # Warm start: a clean stop writes the state; the next start knows the needed services at once.
        assert d.stop(timeout=60) == 0
        out["state_kb"] = round(state.stat().st_size / 1024, 1)
        t = time.monotonic()
        await asyncio.to_thread(d.start)
        out["warm_start_s"] = round(time.monotonic() - t, 3)
        known = await asyncio.to_thread(lambda: [bool(d.get(f"/v1/services/{s}").get("providers")) for s in needed])
        out["warm_known"] = f"{sum(known)} of {len(needed)}"
        d.stop(timeout=60)
    finally:
        await fleet.close()
        for daemon in daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()
        backend.kill()
        for b in {id(x): x for x in (site, second, central)}.values():
            b.kill()
    return out


async def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one connection per simulated box
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=("liveness", "learn"), default="liveness")
    ap.add_argument("--boxes", default="200", help="a number, or several (learn): 50,200,1000")
    ap.add_argument("--needed", type=int, default=10, help="learn: services the daemon routes over the cloud")
    ap.add_argument("--topology", default="direct,bridge", help="learn: direct, bridge or both")
    ap.add_argument("--follow-all", action="store_true", help="learn: the daemon learns the whole fleet's registry")
    ap.add_argument("--daemons", type=int, default=5, help="learn: real daemons that get the fleet config")
    ap.add_argument("--pin", action="store_true", help="learn: the box on CPU 0, the fleet on CPU 1")
    ap.add_argument("--learn-timeout", type=float, default=120.0)
    ap.add_argument("--burst-window", type=float, default=4.0, help="learn: seconds of local calls around the burst")
    ap.add_argument("--services", type=int, default=10, help="per box")
    ap.add_argument("--rate", type=float, default=100.0, help="calls/s spread over the fleet's services")
    ap.add_argument("--modes", default="abrupt,clean,powercut")
    ap.add_argument("--keepalive", type=int, default=15, help="seconds, for the daemon and the boxes")
    ap.add_argument("--status-every", type=float, default=5.0)
    ap.add_argument("--before", type=float, default=5.0, help="seconds of load before the deaths")
    ap.add_argument("--after", type=float, default=5.0, help="seconds of load after the deaths")
    ap.add_argument("--ttl", type=float, default=20.0, help="offline_ttl: stands for an hour (simulated time)")
    ap.add_argument(
        "--broker-conf",
        default="max_queued_messages 20000\\n",
        help="extra mosquitto.conf lines (\\n between): a daemon subscribed to a whole fleet of N boxes gets "
        "about 11 x N retained messages at connect; mosquitto's default queue of 1000 drops the rest",
    )
    ap.add_argument("--keep", action="store_true", help="keep the run's folder (daemon and broker logs)")
    args = ap.parse_args()
    if args.pin:
        os.sched_setaffinity(0, FLEET_CPU)  # this process and what it starts; the box's processes are moved
    tmp = Path(tempfile.mkdtemp(prefix="fleetsim-"))
    counts = [int(n) for n in str(args.boxes).split(",")]
    try:
        if args.scenario == "learn":
            for n in counts:
                for topology in args.topology.split(","):
                    print(json.dumps(await learn_run(args, n, topology, tmp)), flush=True)
            return
        args.boxes = counts[0]
        for mode in args.modes.split(","):
            print(json.dumps(await liveness_run(args, mode, tmp)), flush=True)
    finally:
        if args.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
