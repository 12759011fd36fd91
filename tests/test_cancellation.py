"""A caller that leaves in the middle of a call: every count the mesh keeps comes back to zero.

The real daemon (in this process, so that every count can be read), a real backend process, and a raw
client socket that closes before the answer head, or while the body streams.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import Edged

from edged.config import load_config
from edged.daemon import Daemon

MANIFEST = """
service_name = "slow"
[[endpoints]]
type = "local"
url = "{url}"
[policy]
timeout = "20s"
per_try_timeout = "10s"
"""


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("stage", "path"),
    # 70,000 bytes: over [limits] answer_buffer, so it streams (a smaller answer is read whole first).
    [("before-head", "/svc/slow/sleep/3000"), ("streaming", "/svc/slow/drip/70000/1")],
)
def test_a_client_that_leaves_leaves_every_count_at_zero(tmp_path, backends, stage, path):
    backend = backends("slow")
    layout = Edged(tmp_path / "edged", {"slow.toml": MANIFEST.format(url=backend.url)})
    daemon = Daemon(load_config(str(layout.config)))

    async def scenario() -> dict:
        await daemon.start()
        try:
            (ep,) = daemon.registry.snapshot().get("default", "slow").endpoints
            health = daemon.health.state(ep.id)
            reader, writer = await asyncio.open_connection("127.0.0.1", layout.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())  # a Host that names the API
            if stage == "before-head":
                await until(lambda: health.inflight == 1)  # the try is out, no head yet
            else:
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(1) == b"."
            assert daemon.server.in_flight == 1
            writer.close()  # the caller leaves
            await until(lambda: daemon.server.in_flight == 0)
            await until(lambda: all(s["busy"] == 0 for s in daemon.pool.stats().values()))
            metrics = daemon.metrics.render()
            return {
                "endpoint in flight": health.inflight,
                "calls in flight": daemon.server.in_flight,
                "upstream connections busy": sum(s["busy"] for s in daemon.pool.stats().values()),
                "edged_inflight_calls": "edged_inflight_calls 0" in metrics,
                "failures counted": health.calls_failed,
                "still available": health.available(time.monotonic()),
            }
        finally:
            await daemon.stop()

    counts = asyncio.run(scenario())
    assert counts == {
        "endpoint in flight": 0,
        "calls in flight": 0,
        "upstream connections busy": 0,
        "edged_inflight_calls": True,
        "failures counted": 0,  # a caller leaving says nothing about the endpoint
        "still available": True,
    }
