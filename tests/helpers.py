"""Small builders shared by the unit tests."""

from __future__ import annotations

from edged.model import Endpoint, EndpointSpec, PolicySpec, Service, ServiceSpec, parse_target


def endpoint(
    name: str, port: int, *, priority: int = 10, weight: int = 100, tier: str = "local", svc: str = "s"
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
        self.up = True
        self.latency_ewma = None
        self.why = "healthy"

    def available(self, now: float) -> bool:
        return self.up

    def reason(self, now: float) -> str:
        return self.why


class FakeHealth:
    """A health view whose verdicts the test sets (the real monitor has its own tests)."""

    def __init__(self) -> None:
        self.states: dict[str, FakeState] = {}
        self.stalled_ids: set[str] = set()
        self.results: list[tuple[str, bool]] = []
        self.started: list[str] = []

    def state(self, endpoint_id: str) -> FakeState:
        return self.states.setdefault(endpoint_id, FakeState())

    def stalled(self, endpoint_id: str, now: float, threshold: float) -> bool:
        return endpoint_id in self.stalled_ids

    def call_started(self, endpoint_id: str) -> None:
        self.started.append(endpoint_id)

    def call_finished(self, ep, service, ok, latency) -> None:
        self.results.append((ep.id, ok))
