"""End to end on a clustered broker: two aedes nodes sharing their state through Redis (MQTT 3.1.1 only; no
`$share`), the real daemon attached to one of them with `[mqtt] url` listing both. A worker on the other node
answers its cloud calls; the node the daemon is attached to dies; the daemon moves to the other node and keeps
working, its retained status and the worker's entry still there (the cluster keeps them in Redis).

Needs node, redis-server and the packages of tests/aedes/package.json (`scripts/aedes-setup` installs them);
skipped with the reason otherwise.
"""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import cbor2
import pytest
from conftest import wait_for
from fixtures_mqtt import CLOUD_ONLY, REPO, free_port, mqtt_section, name_node, topic_prefix, wait_metric  # noqa: F401

from edged.cloud.envelope import CloudAnswer, decode_request, encode_answer
from edged.cloud.registry_sync import spec_entry
from edged.cloud.topics import Topics
from edged.manifest import parse_manifest_data

AEDES = REPO / "tests" / "aedes"


class Proc:
    """A process started by the test and ended by PID."""

    def __init__(self, argv: list[str], log: Path, ready: str) -> None:
        self.argv, self.log, self.ready = argv, log, ready
        self.proc: subprocess.Popen | None = None

    def start(self) -> Proc:
        self.proc = subprocess.Popen(self.argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, cwd=AEDES)
        wait_for(lambda: self.ready in self.log.read_text(), 10, what=f"{self.argv[0]} ready (log: {self.log})")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def aedes_cluster(tmp_path: Path) -> Iterator[list[Proc]]:
    """Redis and two aedes nodes over it, on free ports."""
    redis = shutil.which("redis-server")
    node = shutil.which("node")
    if redis is None or node is None or not (AEDES / "node_modules" / "aedes").is_dir():
        pytest.skip("needs redis-server, node and tests/aedes/node_modules (run scripts/aedes-setup)")
    redis_port = free_port()
    argv = [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    procs = [Proc(argv, tmp_path / "redis.log", "Ready to accept connections").start()]
    for name in ("a", "b"):
        port = free_port()
        p = Proc([node, "broker.mjs", str(port), str(redis_port), name], tmp_path / f"aedes-{name}.log", "ready")
        p.port, p.url = port, f"mqtt://127.0.0.1:{port}"  # type: ignore[attr-defined]
        procs.append(p.start())
    yield procs[1:]
    for p in reversed(procs):
        p.kill()


def worker(port: int, prefix: str, stop: threading.Event) -> threading.Thread:
    """An MQTT 3.1.1 worker on one aedes node: retained status and entry for thermo, answers its calls."""
    topics = Topics(prefix, "home")
    entry = spec_entry(parse_manifest_data({"service_name": "thermo"}, "w.toml"), node="worker", zone="", cloud=True)

    async def run() -> None:
        async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311) as c:
            await c.subscribe(topics.request("thermo"), qos=0)
            online = {"state": "online", "node": "worker", "fleet": "home", "zone": ""}
            await c.publish(topics.status("worker"), json.dumps(online), qos=1, retain=True)
            await c.publish(topics.service("worker", "default", "thermo"), cbor2.dumps(entry), qos=1, retain=True)

            async def serve() -> None:
                async for msg in c.messages:
                    req = decode_request(bytes(msg.payload))
                    body = json.dumps({"name": "aedes-worker"}).encode()
                    answer = CloudAnswer(req.id, 200, ((b"content-type", b"application/json"),), body, "worker")
                    await c.publish(req.reply, encode_answer(answer), qos=0)

            task = asyncio.ensure_future(serve())
            await asyncio.to_thread(stop.wait)
            task.cancel()

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    return thread


def test_a_box_keeps_working_when_the_aedes_node_it_is_attached_to_dies(edged, aedes_cluster, topic_prefix):
    a, b = aedes_cluster
    stop = threading.Event()
    thread = worker(b.port, topic_prefix, stop)
    try:
        urls = [a.url, b.url]
        section = mqtt_section(a, topic_prefix, url=urls, protocol="3.1.1", switch_back="60s")
        d = edged({"thermo.toml": CLOUD_ONLY}, section, start=False)
        name_node(d, "box-1").start()
        wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)

        def call() -> tuple[int, str]:
            status, _, body = d.call("thermo", "/r")
            return status, json.loads(body).get("name", "") if body.startswith(b"{") else ""

        def worker_state() -> str | None:
            providers = d.get("/v1/services/thermo").get("providers", [])
            return next((p["state"] for p in providers if p["node"] == "worker"), None)

        # Attached to node a: the worker's retained entry (published on b) and its answers cross the cluster.
        wait_for(lambda: worker_state() == "online", 10, what="the box learns the worker through node a")
        wait_for(lambda: call() == (200, "aedes-worker"), 10, what="a call answered across the cluster")

        a.kill()  # the box's node dies; its TCP connection breaks
        wait_for(lambda: call() == (200, "aedes-worker"), 20, what="calls answered again through node b")
        assert [call() for _ in range(5)] == [(200, "aedes-worker")] * 5
        assert worker_state() == "online"
        connects = [json.loads(line)["broker"] for line in d.log_text().splitlines() if '"mqtt.connected"' in line]
        assert connects[0] == urls[0] and connects[-1] == urls[1]
        assert d.stop() == 0
    finally:
        stop.set()
        thread.join(5)
