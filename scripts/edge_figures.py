#!/usr/bin/env python3
"""The edge tier's figures, measured with real daemons, real zeroconf and real backends (issue: edge tier).

Each box runs in its own network namespace (10.77.0.x on one bridge; created here and removed at the end),
or, where `ip netns` is not permitted, on 127.0.0.1 with zeroconf bound to it (partition is then skipped).

  1. peer start -> first call routed to it       (a caller polls every 5 ms while the peer starts)
  2. goodbye -> removal                           (the peer's "mdns.goodbye" and the caller's "mdns.removed" log times)
  3. SIGKILL / partition of the peer taking the calls, 200 calls/s with another peer ready:
     failed calls, and the last call whose first try went to the dead peer (a try that failed over)
  4. added latency of the ingress hop: the same backend called on its own box (local tier) and from
     another box (edge tier, through the ingress), one call at a time, p50 / p99
  5. `weighted`: calls to a peer on battery at 10 % vs an equal peer on mains

usage: scripts/edge_figures.py [--runs N] [--calls N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fixtures_netns import (  # noqa: E402
    EdgeNode,
    Lan,
    NetnsUnavailable,
    NsBackend,
    UnixLoadGen,
    fake_vitals_roots,
    free_port,
    thermo_manifest,
    unique_fleet,
    wait_for,
)
from loadgen import summary  # noqa: E402

QUIET = False
# A caller's view of thermo, as an operator would write it: edge only, a health check, a short per-try timeout.
CALLER = """
service_name = "thermo"
endpoint_types = ["edge"]
[health_check]
http = "/healthz"
interval = "1s"
timeout = "300ms"
[policy]
per_try_timeout = "300ms"
retries = 2
"""


def say(*args) -> None:
    if not QUIET:
        print(*args, flush=True)


def log_times(daemon: EdgeNode, event: str, **match: str) -> list[float]:
    """Unix times (`at`, else `ts`) of the node's log events named `event` whose fields match."""
    out = []
    for line in daemon.log_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event", doc.get("msg")) != event or any(doc.get(k) != v for k, v in match.items()):
            continue
        out.append(doc["at"] if "at" in doc else datetime.fromisoformat(doc["ts"].replace("Z", "+00:00")).timestamp())
    return out


class UnixHttp(http.client.HTTPConnection):
    """A keep-alive HTTP connection over a Unix socket (one call at a time)."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def interleaved(nodes: list[EdgeNode], path: str, n: int) -> list[list[float]]:
    """One call at a time, taking turns between the nodes (so drift and noise hit both alike): latencies each."""
    conns = [UnixHttp(node.socket) for node in nodes]
    out: list[list[float]] = [[] for _ in nodes]
    try:
        for _ in range(n + 50):
            for conn, values in zip(conns, out, strict=True):
                t0 = time.perf_counter()
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200, resp.status
                values.append(time.perf_counter() - t0)
    finally:
        for conn in conns:
            conn.close()
    return [values[50:] for values in out]  # the first calls warm up connections and caches


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


class Setup:
    """Boxes (namespaces or 127.0.0.1), their daemons and backends; everything stopped by close()."""

    def __init__(self, tmp: Path, hosts: int, notes: list[str]) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.lan: Lan | None = None
        try:
            self.lan = Lan(hosts).create()
        except NetnsUnavailable as exc:
            notes.append(f"no network namespaces ({exc}): boxes share 127.0.0.1, partition skipped")
        self.fleet = unique_fleet()
        self.procs: list = []

    def netns(self, i: int) -> str | None:
        return None if self.lan is None else self.lan.host(i)

    def backend(self, i: int, name: str) -> NsBackend:
        port = 8080 if self.lan is not None else free_port()
        backend = NsBackend(name, port, self.tmp, self.netns(i)).start()
        self.procs.append(backend)
        return backend

    def node(self, i: int, name: str, manifests: dict[str, str] | None = None, **options) -> EdgeNode:
        options.setdefault("resolve_interval", "1s")
        node = EdgeNode(self.tmp / name, name, fleet=self.fleet, manifests=manifests, netns=self.netns(i), **options)
        self.procs.append(node)
        return node

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        if self.lan is not None:
            self.lan.close()


def peer_start_and_goodbye(tmp: Path, runs: int, notes: list[str]) -> dict:
    setup = Setup(tmp / "start", 2, notes)
    try:
        caller = setup.node(1, "caller").start()
        backend = setup.backend(2, "peer-thermo")
        peer = setup.node(2, "peer", {"thermo.toml": thermo_manifest(backend.port)})
        to_first_call, ready_to_call, goodbye = [], [], []
        for _ in range(runs):
            spawned = time.time()
            peer.start(wait=False)
            while caller.call("thermo", "/r")[0] != 200:
                time.sleep(0.005)
            first = time.time()
            wait_for(peer.ready, 10, what="peer ready")
            ready = log_times(peer, "edged ready")[-1]
            to_first_call.append(first - spawned)
            ready_to_call.append(first - ready)
            peer.stop()
            wait_for(lambda: not caller.edge_urls("thermo"), 5, what="peer removed")
            sent = log_times(peer, "mdns.goodbye")[-1]
            removed = log_times(caller, "mdns.removed", reason="goodbye")[-1]
            goodbye.append(removed - sent)
        return {
            "peer_spawn_to_first_routed_call_s": [round(x, 3) for x in to_first_call],
            "peer_ready_to_first_routed_call_s": [round(x, 3) for x in ready_to_call],
            "goodbye_to_removal_ms": [round(x * 1000, 1) for x in goodbye],
        }
    finally:
        setup.close()


def faults(tmp: Path, notes: list[str]) -> dict:
    setup = Setup(tmp / "faults", 3, notes)
    out: dict = {}
    try:
        caller = setup.node(1, "caller", {"thermo.toml": CALLER}).start()
        peers = {}
        for i in (2, 3):
            backend = setup.backend(i, f"box{i}-thermo")
            peers[i] = setup.node(i, f"box{i}", {"thermo.toml": thermo_manifest(backend.port)}).start()
        kinds = ["sigkill"] + (["partition"] if setup.lan is not None else [])
        for kind in kinds:
            wait_for(lambda: len(caller.edge_urls("thermo")) == 2, 15, what="both peers")
            first = json.loads(caller.call("thermo", "/r")[2])["name"]
            victim = int(first[3])
            fault_at: dict[str, float] = {}

            def fault(kind=kind, victim=victim, fault_at=fault_at) -> None:
                fault_at["mono"], fault_at["wall"] = time.monotonic(), time.time()
                if kind == "sigkill":
                    peers[victim].kill()
                else:
                    assert setup.lan is not None
                    setup.lan.partition(victim)

            loadgen = UnixLoadGen(caller.socket, "/svc/thermo/r")
            t0 = time.monotonic()
            results = asyncio.run(loadgen.run(200, 6.0, {2.0: fault}))
            at = fault_at["mono"] - t0
            stats = summary(results)
            failed_over = [r.started - at for r in results if r.tries > 1 and r.started >= at - 0.05]

            def drops(victim=victim, fault_at=fault_at) -> list[float]:
                times = log_times(caller, "edge.peer_down", node=f"box{victim}")
                return [t - fault_at["wall"] for t in times if t > fault_at["wall"]]

            dropped = wait_for(drops, 15, what="the dead peer dropped by re-resolution")
            out[kind] = {
                "calls": stats["calls"],
                "failed": stats["failed"],
                "failed_over": len(failed_over),
                "last_call_to_dead_peer_s": round(max(failed_over), 3) if failed_over else 0.0,
                "answered_by_dead_peer_after_fault": sum(
                    1 for r in results if r.started > at + 0.01 and r.endpoint.endswith(f"box{victim}")
                ),
                "dropped_from_registry_s": round(min(dropped), 2),
                "p99_ms": stats["p99_ms"],
                "max_ms": stats["max_ms"],
            }
            if kind == "sigkill":
                peers[victim].start()
            else:
                assert setup.lan is not None
                setup.lan.heal(victim)
                healed = time.monotonic()
                wait_for(lambda: len(caller.edge_urls("thermo")) == 2, 15, what="healed peer back")
                out[kind]["back_after_heal_s"] = round(time.monotonic() - healed, 2)
        return out
    finally:
        setup.close()


def ingress_hop(tmp: Path, calls: int, notes: list[str]) -> dict:
    setup = Setup(tmp / "hop", 2, notes)
    try:
        backend = setup.backend(2, "box2-thermo")
        box2 = setup.node(2, "box2", {"thermo.toml": thermo_manifest(backend.port)}).start()
        box1 = setup.node(1, "box1").start()
        wait_for(lambda: box1.edge_urls("thermo"), 10, what="thermo on box1")
        local, edge = interleaved([box2, box1], "/svc/thermo/r", calls)
        out = {"calls": calls}
        for name, values in (("local_on_box2", local), ("edge_from_box1", edge)):
            out[f"{name}_p50_ms"] = round(pct(values, 0.5) * 1000, 3)
            out[f"{name}_p99_ms"] = round(pct(values, 0.99) * 1000, 3)
        out["added_p50_ms"] = round(out["edge_from_box1_p50_ms"] - out["local_on_box2_p50_ms"], 3)
        out["added_p99_ms"] = round(out["edge_from_box1_p99_ms"] - out["local_on_box2_p99_ms"], 3)
        out["added_mean_ms"] = round((statistics.mean(edge) - statistics.mean(local)) * 1000, 3)
        return out
    finally:
        setup.close()


def battery_share(tmp: Path, notes: list[str]) -> dict:
    setup = Setup(tmp / "share", 3, notes)
    try:
        for i, name, roots in (
            (2, "on-battery", fake_vitals_roots(tmp / "bat", battery=10, status="Discharging", mains=False)),
            (3, "on-mains", fake_vitals_roots(tmp / "ac", mains=True)),
        ):
            backend = setup.backend(i, name)
            vitals = f'interval = "1s"\nproc_root = "{roots[0]}"\nsys_root = "{roots[1]}"'
            setup.node(i, name, {"t.toml": thermo_manifest(backend.port)}, vitals=vitals).start()
        weighted = CALLER.replace("[policy]", '[policy]\nstrategy = "weighted"')
        caller = setup.node(1, "caller", {"thermo.toml": weighted}).start()
        wait_for(lambda: len(caller.edge_urls("thermo")) == 2, 15, what="both peers")
        results = asyncio.run(UnixLoadGen(caller.socket, "/svc/thermo/r").run(500, 4.0))
        share = Counter(r.endpoint.rpartition(":")[2] for r in results)
        return {
            "calls": len(results),
            "failed": summary(results)["failed"],
            "on_battery_10pct": share["on-battery"],
            "on_mains": share["on-mains"],
            "ratio": round(share["on-battery"] / max(1, share["on-mains"]), 4),
        }
    finally:
        setup.close()


def main() -> int:
    global QUIET
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="peer start / goodbye repetitions")
    ap.add_argument("--calls", type=int, default=5000, help="sequential calls per side for the ingress hop")
    ap.add_argument("--json", action="store_true", help="print only the JSON figures")
    args = ap.parse_args()
    QUIET = args.json
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the finally blocks: children stopped by PID
    notes: list[str] = []
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="edged-edge-") as tmp:
        root = Path(tmp)
        say("1-2. peer start -> first routed call; goodbye -> removal ...")
        figures["start_and_goodbye"] = peer_start_and_goodbye(root, args.runs, notes)
        say("3. SIGKILL / partition at 200 calls/s ...")
        figures["faults"] = faults(root, notes)
        say("4. ingress hop ...")
        figures["ingress_hop"] = ingress_hop(root, args.calls, notes)
        say("5. battery vs mains (weighted) ...")
        figures["battery_vs_mains"] = battery_share(root, notes)
    figures["notes"] = sorted(set(notes))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
