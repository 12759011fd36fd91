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
    [
        ("before-head", "/svc/slow/sleep/3000"),
        # 100 bytes, one every 100 ms: the head is in and the small answer is being read whole before it is relayed.
        ("reading-whole", "/svc/slow/drip/100/100"),
        # 70,000 bytes: over [limits] answer_buffer, so it streams (a smaller answer is read whole first).
        ("streaming", "/svc/slow/drip/70000/1"),
    ],
)
@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "pooled"])
def test_a_client_that_leaves_leaves_every_count_at_zero(tmp_path, backends, stage, path, pooled):
    """`pooled`: the try goes out on a keep-alive connection an earlier call left in the pool."""
    backend = backends("slow")
    layout = Edged(tmp_path / "edged", {"slow.toml": MANIFEST.format(url=backend.url)})
    daemon = Daemon(load_config(str(layout.config)))

    async def scenario() -> dict:
        await daemon.start()
        try:
            (ep,) = daemon.registry.snapshot().get("default", "slow").endpoints
            health = daemon.health.state(ep.id)
            if pooled:
                first_reader, first_writer = await asyncio.open_connection("127.0.0.1", layout.port)
                first_writer.write(b"GET /svc/slow/big/10 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert (await first_reader.read()).endswith(b"\r\n\r\n" + b"x" * 10)
                first_writer.close()
                await until(lambda: any(s["idle"] == 1 for s in daemon.pool.stats().values()))
            reader, writer = await asyncio.open_connection("127.0.0.1", layout.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())  # a Host that names the API
            if stage == "before-head":
                # The try is out, no head yet: counted in flight as it starts, and sent once its connection is
                # open (a fresh one is still connecting for a moment after the count; under load, for longer).
                opened = lambda: sum(s["opened"] for s in daemon.pool.stats().values())  # noqa: E731
                await until(lambda: health.inflight == 1 and opened() == 1)
            elif stage == "reading-whole":
                await until(lambda: health.inflight == 1)
                await asyncio.sleep(0.3)  # the head came at once; the body's bytes trickle in
                assert daemon.server.in_flight == 1 and health.inflight == 1  # nothing relayed yet
            else:
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(1) == b"."
            assert daemon.server.in_flight == 1
            writer.close()  # the caller leaves
            await until(lambda: daemon.server.in_flight == 0)
            await until(lambda: all(s["busy"] == 0 for s in daemon.pool.stats().values()))
            metrics = daemon.metrics.render()
            return {
                "upstream connections opened": sum(s["opened"] for s in daemon.pool.stats().values()),
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
        "upstream connections opened": 1,  # pooled: the slow call went out on the first call's connection
        "endpoint in flight": 0,
        "calls in flight": 0,
        "upstream connections busy": 0,
        "edged_inflight_calls": True,
        "failures counted": 0,  # a caller leaving says nothing about the endpoint
        "still available": True,
    }
