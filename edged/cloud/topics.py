"""MQTT topic names of the cloud tier (DESIGN.md, section MQTT), all under `{prefix}/{fleet}/`."""

from __future__ import annotations

from dataclasses import dataclass

from ..model import DEFAULT_TENANT


def service_key(tenant: str, service: str) -> str:
    """One topic level naming a service: `thermo` in the default tenant, `garden.thermo` in another.

    Tenant and service names are DNS labels (no '.'), so the split is unambiguous.
    """
    return service if tenant == DEFAULT_TENANT else f"{tenant}.{service}"


def split_service_key(key: str) -> tuple[str, str]:
    """(tenant, service) from a `service_key`."""
    tenant, dot, service = key.partition(".")
    return (tenant, service) if dot else (DEFAULT_TENANT, key)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches an MQTT filter (`+` one level, `#` the rest); `$share/{group}/` is ignored."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    if topic.startswith("$") and not topic_filter.startswith("$"):
        return False  # wildcards never match $SYS-like topics (MQTT 4.7.2)
    want = topic_filter.split("/")
    have = topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have):
            return False
        if level != "+" and level != have[i]:
            return False
    return len(want) == len(have)


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names for one fleet: `Topics("hubmesh", "home").status("pi-1")` -> `hubmesh/home/nodes/pi-1/status`."""

    prefix: str
    fleet: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    def status(self, node: str) -> str:
        return f"{self.base}/nodes/{node}/status"

    def service(self, node: str, tenant: str, service: str) -> str:
        return f"{self.base}/nodes/{node}/services/{service_key(tenant, service)}"

    def request(self, service: str) -> str:
        return f"{self.base}/svc/{service}/req"

    def reply(self, node: str) -> str:
        return f"{self.base}/reply/{node}"

    def config(self, node: str | None = None) -> str:
        return f"{self.base}/config" if node is None else f"{self.base}/config/{node}"

    def telemetry(self, node: str) -> str:
        return f"{self.base}/telemetry/{node}"

    # -- filters
    @property
    def all_status(self) -> str:
        return f"{self.base}/nodes/+/status"

    @property
    def all_services(self) -> str:
        return f"{self.base}/nodes/+/services/+"

    def service_filter(self, key: str) -> str:
        """Every node's entry of one service (`service_key`)."""
        return f"{self.base}/nodes/+/services/{key}"

    def parse_node_topic(self, topic: str) -> tuple[str, str, str] | None:
        """(node, "status", "") or (node, "services", key) for a registry topic of this fleet, else None."""
        head = f"{self.base}/nodes/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) == 2 and parts[1] == "status":
            return parts[0], "status", ""
        if len(parts) == 3 and parts[1] == "services":
            return parts[0], "services", parts[2]
        return None


def shared_request_filter(group: str, prefix: str) -> str:
    """The bridges' subscription: every fleet's requests, shared by the bridges of `group`."""
    return f"$share/{group}/{prefix}/+/svc/+/req"


def parse_request_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """(fleet, service) of `{prefix}/{fleet}/svc/{service}/req`, else None."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) != 4 or parts[1] != "svc" or parts[3] != "req":
        return None
    return parts[0], parts[2]
