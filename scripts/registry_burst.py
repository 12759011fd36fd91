#!/usr/bin/env python3
"""The cloud registry of one daemon under a burst, in process and measured in CPU time (repeatable on a
loaded machine, where wall-clock figures mostly measure the neighbours).

A real daemon's core and cloud tier (`Daemon(config)`, `[mqtt] follow = ["*"]`, no broker: messages are
handed to the session's handlers as paho would, one event-loop callback each) learns N boxes x 10 services
in the project's formats (`spec_entry()`), then one entry changes, then it is saved and restored. Printed:
- `longest_callback_ms`: the most CPU time one event-loop callback took during the burst (the longest the
  loop was blocked: a local call waits that long at worst), and how many callbacks took over 5 ms;
- the CPU time to apply the burst, and the RSS and Python heap per kept entry;
- the CPU time of a one-entry change once everything is known, of a signed fleet config document
  (policies for two services) being applied, and of a manifest being added;
- the state file's size; the CPU time of its first save (a rewrite of the whole registry log), the most CPU
  time one event-loop callback took meanwhile, and how long a task that yields in a loop waited for its turn
  (`save_loop_wait_ms`, wall-clock: with the waits for the GIL that a thread's work causes, and whatever
  load preempts); the CPU time of a warm start (`restore()`).

`--trace N` also prints where the kept bytes go: the N source lines that allocated most of what is still
held after the burst (tracemalloc; the run is slower, and its other figures are not to be quoted).

usage: scripts/registry_burst.py [--boxes 1000] [--services 10] [--trace 20]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
import tracemalloc
from pathlib import Path

import cbor2
from harness import REPO

sys.path.insert(0, str(REPO))

from edged.cloud.fleet import document_text, generate_key, load_private_key, sign_document
from edged.cloud.registry_sync import spec_entry
from edged.cloud.session import Inbound
from edged.config import load_config
from edged.daemon import Daemon
from edged.manifest import parse_manifest_data


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def config_file(root: Path) -> Path:
    (root / "services.d").mkdir(parents=True, exist_ok=True)
    path = root / "edged.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [node]
            name = "me"
            [services]
            dirs = ["{root}/services.d"]
            [state]
            dir = "{root}/state"
            [mdns]
            enabled = false
            [ingress]
            enabled = false
            [limits]
            peers = 8192
            learned_entries = 100000
            [mqtt]
            enabled = true
            url = "mqtt://127.0.0.1:1"
            follow = ["*"]
            [fleet]
            keys = ["{root}/ops.pub"]
            """
        )
    )
    private_pem, public_pem, _ = generate_key()
    (root / "ops.pub").write_bytes(public_pem)
    (root / "ops.key").write_bytes(private_pem)
    return path


class CallbackMeter:
    """The CPU time of each event-loop callback (asyncio's Handle._run, patched while measuring)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.over_5ms = 0
        self.count = 0
        self._orig = asyncio.events.Handle._run

    def __enter__(self) -> CallbackMeter:
        meter, orig = self, self._orig

        def run(handle: asyncio.events.Handle) -> None:
            t = time.thread_time()
            orig(handle)
            took = time.thread_time() - t
            meter.count += 1
            meter.longest = max(meter.longest, took)
            meter.over_5ms += took > 0.005

        asyncio.events.Handle._run = run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.events.Handle._run = self._orig  # type: ignore[method-assign]


def messages(topics, boxes: int, services: int) -> list[Inbound]:
    out = []
    for b in range(boxes):
        node = f"box-{b:05d}"
        status = {"state": "online", "node": node, "zone": "z1", "vitals": {"cpu": "12", "power": "mains"}}
        out.append(Inbound(topics.status(node), json.dumps(status).encode(), True))
        for s in range(services):
            spec = parse_manifest_data({"service_name": f"svc-{b:05d}-{s}"}, "x.toml")
            entry = spec_entry(spec, node=node, zone="z1", cloud=True)
            out.append(Inbound(topics.service(node, "default", spec.name), cbor2.dumps(entry), True))
    return out


def where_kept(before: tracemalloc.Snapshot, entries: int, top: int) -> list[str]:
    """The source lines that allocated most of what is held now and was not at `before`, per entry."""
    stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    rows = [f"{total / entries:7.1f} B per entry in all (tracemalloc)"]
    for s in stats[:top]:
        frame = s.traceback[0]
        rows.append(f"{s.size_diff / entries:7.1f} B {s.count_diff:7d} blocks  {frame.filename}:{frame.lineno}")
    return rows


async def burst(root: Path, boxes: int, services: int, trace: int = 0) -> dict:
    daemon = Daemon(load_config(str(config_file(root))))
    tier = next(t for t in daemon.core.tiers if t.name == "cloud")
    sync = tier.registry_sync
    tier._started = True
    msgs = messages(tier.topics, boxes, services)
    loop = asyncio.get_running_loop()
    gc.collect()
    if trace:
        tracemalloc.start(1)
        traced = tracemalloc.take_snapshot()
    rss0, cpu0 = rss(), time.process_time()
    with CallbackMeter() as meter:
        for m in msgs:  # one callback per message, as paho's reader hands them over
            loop.call_soon(sync._on_status if m.topic.endswith("/status") else sync._on_service, m)
        for _ in range(100_000):  # until the registry has everything (the applies come in chunks)
            await asyncio.sleep(0.01)
            if not getattr(sync, "_touched", ()) and sync._apply_timer is None:
                break
    cpu = time.process_time() - cpu0
    entries = boxes * services
    del msgs
    gc.collect()
    out = {
        "boxes": boxes,
        "entries": entries,
        "services_known": len(daemon.core.registry.snapshot().services),
        "burst_cpu_s": round(cpu, 2),
        "longest_callback_ms": round(meter.longest * 1000, 1),
        "callbacks_over_5ms": meter.over_5ms,
        "callbacks": meter.count,
        "rss_per_entry_b": round((rss() - rss0) / entries),
    }
    if trace:
        print("\n".join(where_kept(traced, entries, trace)), file=sys.stderr, flush=True)
        tracemalloc.stop()

    node, name = "box-00001", "svc-00001-0"
    spec = parse_manifest_data({"service_name": name, "priority": 3}, "x.toml")
    payload = cbor2.dumps(spec_entry(spec, node=node, zone="z1", cloud=True))
    t = time.process_time()
    sync._on_service(Inbound(tier.topics.service(node, "default", name), payload, True))
    getattr(sync, "_apply_some", sync.apply)()  # (`apply` in versions before the incremental registry)
    out["one_change_cpu_ms"] = round((time.process_time() - t) * 1000, 2)
    # A signed fleet config document: policies for two services.
    policies = {"svc-00002-0": {"strategy": "round_robin"}, "svc-00003-1": {"retries": 1}}
    doc = document_text({"fleet": daemon.config.node.fleet, "version": 1, "policies": policies})
    signed = sign_document(doc, load_private_key(str(root / "ops.key")))
    rebuilds = daemon.core.registry.rebuilds
    t = time.process_time()
    applied = tier.fleet.offer(signed, "fleet", tier.topics.config())
    out["fleet_config_cpu_ms"] = round((time.process_time() - t) * 1000, 2)
    strategy = daemon.core.registry.snapshot().get("default", "svc-00002-0").spec.policy.strategy
    out["fleet_config_applied"] = applied and strategy == "round_robin"
    out["fleet_config_whole_rebuilds"] = daemon.core.registry.rebuilds - rebuilds
    # A manifest added (an operator's edit): a local service next to the ten thousand remote ones.
    registry = daemon.core.registry
    local = parse_manifest_data({"service_name": "local-x", "endpoints": [{"type": "local", "url": "http://h:1"}]}, "x")
    t = time.process_time()
    registry.set_manifests([*registry._sources.services.get("manifest", {}).values(), local])
    out["manifest_change_cpu_ms"] = round((time.process_time() - t) * 1000, 2)
    t = time.process_time()
    waits: list[float] = []

    async def ticker() -> None:  # what a local call sees: how long the loop takes to come back to it
        while True:
            w = time.perf_counter()
            await asyncio.sleep(0)
            waits.append(time.perf_counter() - w)

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    with CallbackMeter() as meter:  # the first save after a start: the registry log rewritten whole
        await tier.saver.flush()
    ticking.cancel()
    out["save_cpu_ms"] = round((time.process_time() - t) * 1000, 1)
    out["save_longest_callback_ms"] = round(meter.longest * 1000, 1)
    waits.sort()
    p99 = waits[len(waits) * 99 // 100]
    out["save_loop_wait_ms"] = {"p99": round(p99 * 1000, 2), "max": round(waits[-1] * 1000, 2)}
    log = getattr(sync, "_log", None)  # the state file: a log, or one JSON document before it
    state = log.path if log is not None else tier.saver.store.path("cloud-registry.json")
    out["state_kb"] = round(await asyncio.to_thread(os.path.getsize, state) / 1024, 1)
    again = Daemon(load_config(str(root / "edged.toml")))
    restored = next(t for t in again.core.tiers if t.name == "cloud").registry_sync
    t = time.process_time()
    if log is None:
        out["restored"] = restored.load(tier.saver.store.read_json("cloud-registry.json", {}))
    else:
        out["restored"] = restored.restore()
    out["warm_start_cpu_s"] = round(time.process_time() - t, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", default="1000", help="a number, or several: 200,1000")
    ap.add_argument("--services", type=int, default=10)
    ap.add_argument("--trace", type=int, default=0, help="print the N lines that allocated most of what is kept")
    args = ap.parse_args()
    for n in (int(x) for x in args.boxes.split(",")):
        root = Path(tempfile.mkdtemp(prefix="registry-burst-"))
        try:
            print(json.dumps(asyncio.run(burst(root, n, args.services, args.trace))), flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
