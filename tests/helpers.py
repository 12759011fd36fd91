"""Small builders shared by the unit tests."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

from edged.balancer import PeakEwma
from edged.model import Endpoint, EndpointSpec, PolicySpec, Service, ServiceSpec, parse_target


def endpoint(
    name: str,
    port: int,
    *,
    priority: int = 10,
    weight: int = 100,
    tier: str = "local",
    svc: str = "s",
    meta: tuple[tuple[str, str], ...] = (),
) -> Endpoint:
    url = f"http://127.0.0.1:{port}"
    return Endpoint(
        id=f"default/{svc}/{tier}/{name}",
        service=svc,
        tenant="default",
        tier=tier,
        url=url,
        priority=priority,
        weight=weight,
        source="test",
        target=parse_target(url),
        meta=meta,
    )


def service(
    *eps: Endpoint, name: str = "s", policy: PolicySpec | None = None, types=("local", "edge", "cloud")
) -> Service:
    spec = ServiceSpec(
        name=name,
        endpoint_types=tuple(types),
        endpoints=tuple(EndpointSpec(tier=e.tier, url=e.url) for e in eps),
        policy=policy or PolicySpec(),
    )
    return Service(spec=spec, endpoints=tuple(eps))


class FakeState:
    def __init__(self) -> None:
        self.active_ok = True  # (`up`: the test's verdict)
        self.ejected_until = 0.0
        # Never a sign of life: the ranker's cheap stall check (`policy.is_stalled`) then always asks
        # `FakeHealth.stalled`, that is the test's `stalled_ids`.
        self.busy_since = self.last_response_at = -math.inf
        self.latency_ewma = None
        self.inflight = 0
        self.sent_sum = 0.0  # send times of the tries in flight (edged.predictive reads their mean age)
        self.model = None
        self.peak = PeakEwma()
        self.why = "healthy"

    @property
    def up(self) -> bool:
        return self.active_ok

    @up.setter
    def up(self, value: bool) -> None:
        self.active_ok = value

    def available(self, now: float) -> bool:
        return self.active_ok and now >= self.ejected_until

    def reason(self, now: float) -> str:
        return self.why


class FakeHealth:
    """A health view whose verdicts the test sets (the real monitor has its own tests)."""

    def __init__(self) -> None:
        self.states: dict[str, FakeState] = {}
        self.stalled_ids: set[str] = set()
        self.results: list[tuple[str, bool]] = []
        self.reached: list[bool] = []  # per result: did the try reach the endpoint
        self.started: list[str] = []
        self.released = 0  # in-flight places given back (by `finish` or `release`)

    def state(self, endpoint_id: str) -> FakeState:
        return self.states.setdefault(endpoint_id, FakeState())

    def states_of(self, ids: tuple[str, ...]) -> tuple[FakeState, ...]:
        return tuple(map(self.state, ids))

    def stalled(self, endpoint_id: str, now: float, threshold: float) -> bool:
        return endpoint_id in self.stalled_ids

    def call_started(self, endpoint_id: str) -> FakeFlight:
        self.started.append(endpoint_id)
        return FakeFlight(self)

    def call_finished(self, ep, service, ok, latency, *, reached=True) -> None:
        self.results.append((ep.id, ok))
        self.reached.append(reached)


class FakeFlight:
    """The in-flight handle of `FakeHealth`: records the outcome; counts the places given back (once per handle,
    by `finish` or `release`, as `edged.health.InFlight` does)."""

    def __init__(self, health: FakeHealth) -> None:
        self.health = health
        self.done = False

    def __enter__(self) -> FakeFlight:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if not self.done:
            self.done = True
            self.health.released += 1

    def finish(self, ep, service, ok, latency, *, reached=True, later=False) -> None:
        if not self.done:
            self.health.call_finished(ep, service, ok, latency, reached=reached)
            self.release()


class StatusServer:
    """A tiny HTTP server on 127.0.0.1 (or a Unix socket) answering every request with `status`, which the
    test may flip; records each request head, and when and which path was asked. `keep_alive`: answers every
    request of a connection and keeps it open (`connections` counts them), else one answer and a close."""

    def __init__(self, status: int = 200, *, keep_alive: bool = False) -> None:
        self.status = status
        self.keep_alive = keep_alive
        self.connections = 0
        self.requests: list[bytes] = []
        self.seen: list[tuple[float, str]] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        close = b"" if self.keep_alive else b"Connection: close\r\n"
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                self.seen.append((time.monotonic(), head.split(b" ", 2)[1].decode()))
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n%s\r\nhi" % (self.status, close))
                await writer.drain()
                if not self.keep_alive:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> StatusServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def start_tcp(self) -> int:
        return (await self.start()).port

    async def start_unix(self, path: str) -> None:
        self.server = await asyncio.start_unix_server(self._handle, path)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def process_gone(pid: int) -> bool:
    """Gone or a zombie waiting for a reaper that is not us (the shell's children are re-parented)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def loads_package(pid: int, package: str) -> bool:
    """Whether process `pid` has a native module of site-packages/`package` mapped (what it has imported);
    dist-packages too (Debian's own python3-* packages, scripts/test-floors)."""
    marker = f"-packages/{package}/"
    return any(marker in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
