"""Prometheus metrics without prometheus_client: counters, gauges and histograms keyed by label tuples.

The hot path (`inc`, `observe`) is one length check, one dict lookup and an add. Everything else
(escaping, sorting, cumulative buckets) happens at render time, once per scrape. Mutate metrics from
the event loop thread only: there is no lock.
"""

from __future__ import annotations

import logging
import math
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable

from . import __version__
from .errors import EdgedError

log = logging.getLogger(__name__)

DEFAULT_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# A family refuses new label sets past this many: a bug or a hostile caller that puts unbounded values
# into labels must not grow the daemon's memory without end.
DEFAULT_MAX_SERIES = 2000

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class TelemetryError(EdgedError, ValueError):
    """A metric was declared or used wrongly (bad name, wrong number of labels, negative counter step)."""


def _fmt(value: float) -> str:
    """A sample value as Prometheus text: integers without a fraction, +Inf/-Inf/NaN spelled out."""
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: tuple[str, ...], values: Iterable[object]) -> str:
    """'a="x",b="y"' (no braces), so that a histogram can append its le label."""
    return ",".join(f'{n}="{_escape_label(str(v))}"' for n, v in zip(names, values, strict=True))


class _Family:
    """One metric name: its help, label names and the series it holds."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...], max_series: int) -> None:
        if not _NAME.match(name):
            raise TelemetryError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL.match(label) or label.startswith("__"):
                raise TelemetryError(f"invalid label name {label!r} for {name}")
        if len(set(labelnames)) != len(labelnames):
            raise TelemetryError(f"duplicate label names for {name}: {labelnames}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._arity = len(labelnames)
        self._max_series = max_series
        self.dropped = 0  # label sets refused because of max_series

    def _bad_labels(self, labels: tuple[str, ...]) -> TelemetryError:
        return TelemetryError(f"{self.name} takes labels {self.labelnames}, got {labels!r}")

    def _key(self, labels: tuple[str, ...]) -> tuple[str, ...] | None:
        """The slow path, for labels not found as given: check their number, make them strings (so that
        413 and "413" are one series and rendering can sort), and refuse a new set past the cap (None)."""
        if len(labels) != self._arity:
            raise self._bad_labels(labels)
        key = tuple(str(v) for v in labels)
        if key in self._series():
            return key
        if len(self._series()) >= self._max_series:
            if not self.dropped:
                log.warning("metric %s reached %d series; new label sets are dropped", self.name, self._max_series)
            self.dropped += 1
            return None
        return key

    def _series(self) -> dict:
        raise NotImplementedError

    def remove(self, labels: tuple[str, ...]) -> None:
        """Forget one series (an endpoint or service that is gone). Unknown labels are ignored."""
        self._series().pop(tuple(str(v) for v in labels), None)

    def clear(self) -> None:
        """Forget every series; an unlabelled metric goes back to zero."""
        self._series().clear()
        if not self._arity:
            self._init_unlabelled()

    def _init_unlabelled(self) -> None:
        raise NotImplementedError

    def lines(self) -> Iterable[str]:
        """The sample lines of the exposition, sorted by labels."""
        raise NotImplementedError


class _Scalar(_Family):
    """A family whose series hold one number each (counter, gauge)."""

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...], max_series: int) -> None:
        super().__init__(name, help, labelnames, max_series)
        self._values: dict[tuple[str, ...], float] = {}
        if not self._arity:
            self._init_unlabelled()

    def _series(self) -> dict:
        return self._values

    def _init_unlabelled(self) -> None:
        # Unlabelled metrics exist from the start, so a scrape shows 0 rather than nothing.
        self._values[()] = 0.0

    def _add(self, labels: tuple[str, ...], value: float) -> None:
        values = self._values
        current = values.get(labels)
        if current is None:
            key = self._key(labels)
            if key is None:
                return
            values[key] = values.get(key, 0.0) + value
        else:
            values[labels] = current + value

    def get(self, labels: tuple[str, ...] = ()) -> float | None:
        """The current value of one series, None if it does not exist."""
        return self._values.get(tuple(str(v) for v in labels))

    def lines(self) -> Iterable[str]:
        name, names = self.name, self.labelnames
        for labels, value in sorted(self._values.items()):
            yield f"{name}{{{_labels_text(names, labels)}}} {_fmt(value)}" if labels else f"{name} {_fmt(value)}"


class Counter(_Family):
    """A number that only goes up (calls, failovers, errors).

    Each series is a cell, a one-element list: `cell(labels)` hands it out, and a holder on the call path adds
    to it directly (`cell[0] += 1`), without a label tuple, a hash and a call per count."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...], max_series: int) -> None:
        super().__init__(name, help, labelnames, max_series)
        self._cells: dict[tuple[str, ...], list[float]] = {}
        if not self._arity:
            self._init_unlabelled()

    def _series(self) -> dict:
        return self._cells

    def _init_unlabelled(self) -> None:
        self._cells[()] = [0.0]  # a scrape shows 0 rather than nothing

    def inc(self, labels: tuple[str, ...] = (), value: float = 1.0) -> None:
        """Add `value` (>= 0) to the series of `labels`."""
        if value < 0:
            raise TelemetryError(f"{self.name}: a counter cannot go down ({value})")
        cell = self._cells.get(labels)
        if cell is None:  # the common case is one lookup and one add
            cell = self.cell(labels)
        cell[0] += value

    def cell(self, labels: tuple[str, ...]) -> list[float]:
        """The series of `labels` as a cell to add to (`cell[0] += n`, n >= 0), made if new. Past the series cap
        it is a cell of its own that nothing renders (the count is dropped, as `inc` drops it). A removed or
        cleared series makes new cells: take the cell again after that."""
        cell = self._cells.get(labels)
        if cell is None:
            key = self._key(labels)
            if key is None:
                return [0.0]
            cell = self._cells.get(key)
            if cell is None:
                cell = self._cells[key] = [0.0]
        return cell

    def get(self, labels: tuple[str, ...] = ()) -> float | None:
        """The current value of one series, None if it does not exist."""
        cell = self._cells.get(tuple(str(v) for v in labels))
        return None if cell is None else cell[0]

    def values(self) -> dict[tuple[str, ...], float]:
        """Every series' value now (a copy)."""
        return {labels: cell[0] for labels, cell in self._cells.items()}

    def lines(self) -> Iterable[str]:
        name, names = self.name, self.labelnames
        for labels, cell in sorted(self._cells.items()):
            value = cell[0]
            yield f"{name}{{{_labels_text(names, labels)}}} {_fmt(value)}" if labels else f"{name} {_fmt(value)}"


class Gauge(_Scalar):
    """A number that goes up and down (endpoint up, in-flight calls, peers)."""

    kind = "gauge"

    def set(self, labels: tuple[str, ...], value: float) -> None:
        """Set the series of `labels` to `value`."""
        values = self._values
        if labels not in values:
            key = self._key(labels)
            if key is None:
                return
            labels = key
        values[labels] = float(value)

    def inc(self, labels: tuple[str, ...] = (), value: float = 1.0) -> None:
        """Add `value` to the series of `labels` (for counts of things in flight)."""
        self._add(labels, value)

    def dec(self, labels: tuple[str, ...] = (), value: float = 1.0) -> None:
        """Subtract `value` from the series of `labels`."""
        self._add(labels, -value)


class Histogram(_Family):
    """Observations counted into buckets, with their sum and count (call durations in seconds)."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, labelnames: tuple[str, ...], buckets: Iterable[float], max_series: int
    ) -> None:
        if "le" in labelnames:
            raise TelemetryError(f"{name}: 'le' is reserved for histogram buckets")
        bounds = sorted(float(b) for b in buckets if b != math.inf)
        if not bounds or len(set(bounds)) != len(bounds):
            raise TelemetryError(f"{name}: buckets must be distinct and non-empty, got {buckets!r}")
        super().__init__(name, help, labelnames, max_series)
        self.buckets = tuple(bounds)
        # labels -> [count in each bucket (not cumulative), count above the last bound, sum]; the count is the
        # buckets' total (whole numbers, exact as floats): one write less per observation
        self._data: dict[tuple[str, ...], list[float]] = {}
        if not self._arity:
            self._init_unlabelled()

    def _series(self) -> dict:
        return self._data

    def _init_unlabelled(self) -> None:
        self._data[()] = [0.0] * (len(self.buckets) + 2)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        """Count `value` into the series of `labels`."""
        row = self._data.get(labels)
        if row is None:
            row = self.row(labels)
        row[bisect_left(self.buckets, value)] += 1  # bounds are inclusive: le="0.1" counts 0.1
        row[-1] += value

    def row(self, labels: tuple[str, ...]) -> list[float]:
        """The series of `labels` as a row a holder counts into as `observe` does (its bucket, and the sum), made
        if new; past the series cap, a row of its own that nothing renders. A removed or cleared series makes new
        rows."""
        row = self._data.get(labels)
        if row is None:
            key = self._key(labels)
            if key is None:
                return [0.0] * (len(self.buckets) + 2)
            row = self._data.get(key)
            if row is None:
                row = self._data[key] = [0.0] * (len(self.buckets) + 2)
        return row

    def get(self, labels: tuple[str, ...] = ()) -> tuple[float, float] | None:
        """(count, sum) of one series, None if it does not exist."""
        row = self._data.get(tuple(str(v) for v in labels))
        return None if row is None else (sum(row[:-1]), row[-1])

    def lines(self) -> Iterable[str]:
        name = self.name
        bounds = [*(f'le="{_fmt(b)}"}}' for b in self.buckets), 'le="+Inf"}']
        for labels, row in sorted(self._data.items()):
            text = _labels_text(self.labelnames, labels)
            bucket_prefix = f"{name}_bucket{{{text}," if text else f"{name}_bucket{{"
            plain = f"{{{text}}}" if text else ""
            cumulative = 0.0
            for le, n in zip(bounds, row[:-1], strict=True):
                cumulative += n
                yield f"{bucket_prefix}{le} {_fmt(cumulative)}"
            yield f"{name}_sum{plain} {_fmt(row[-1])}"
            yield f"{name}_count{plain} {_fmt(cumulative)}"


class Metrics:
    """A registry of metric families that renders the Prometheus text exposition format 0.0.4."""

    def __init__(self, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self._families: dict[str, _Family] = {}
        self._collectors: list[Callable[[], None]] = []
        self._max_series = max_series

    def _register(self, family: _Family) -> None:
        if family.name in self._families:
            raise TelemetryError(f"metric {family.name} is already declared")
        self._families[family.name] = family

    def counter(self, name: str, help: str, labelnames: tuple[str, ...] = ()) -> Counter:
        """Declare a counter."""
        family = Counter(name, help, tuple(labelnames), self._max_series)
        self._register(family)
        return family

    def gauge(self, name: str, help: str, labelnames: tuple[str, ...] = ()) -> Gauge:
        """Declare a gauge."""
        family = Gauge(name, help, tuple(labelnames), self._max_series)
        self._register(family)
        return family

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: tuple[str, ...] = (),
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """Declare a histogram; `buckets` are upper bounds (+Inf is always added)."""
        family = Histogram(name, help, tuple(labelnames), buckets, self._max_series)
        self._register(family)
        return family

    def add_collector(self, fn: Callable[[], None]) -> None:
        """Register a function that refreshes gauges lazily; `collect()` (and so `render()`) calls it."""
        self._collectors.append(fn)

    def collect(self) -> None:
        """Run the collectors. One that fails is logged and skipped: a scrape must still answer."""
        for fn in self._collectors:
            try:
                fn()
            except Exception:
                log.exception("metrics collector %r failed", fn)

    def render(self) -> str:
        """Run the collectors, then every family as Prometheus text (HELP, TYPE, samples)."""
        self.collect()
        lines: list[str] = []
        for family in self._families.values():
            lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            lines.extend(family.lines())
        # A full metric refuses new label sets (existing ones keep updating): say how many, per metric.
        name = "edged_metric_series_refused_total"
        lines.append(f"# HELP {name} New label sets refused because the metric held max_series series.")
        lines.append(f"# TYPE {name} counter")
        lines.extend(f'{name}{{metric="{f.name}"}} {f.dropped}' for f in self._families.values() if f.dropped)
        lines.append("")
        return "\n".join(lines)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of a metric, summed over the series that match `labels` (all series when None).

        For a histogram, `NAME_count` and `NAME_sum` give its count and sum (`NAME` alone: the count).
        None when the metric is unknown or no series matches. Collectors are not run.
        """
        family = self._families.get(name)
        count = isinstance(family, Histogram)  # a histogram's count: its buckets' total
        if family is None:
            base, _, suffix = name.rpartition("_")
            family = self._families.get(base)
            if not isinstance(family, Histogram) or suffix not in ("count", "sum"):
                return None
            count = suffix == "count"
        wanted = labels or {}
        if any(key not in family.labelnames for key in wanted):
            return None
        positions = [(family.labelnames.index(key), str(val)) for key, val in wanted.items()]
        total: float | None = None
        for series_labels, data in family._series().items():
            if all(series_labels[i] == val for i, val in positions):
                number = (sum(data[:-1]) if count else data[-1]) if isinstance(data, list) else data
                total = number if total is None else total + number
        return total


class MeshMetrics:
    """The daemon's metrics, named as DESIGN.md ("Telemetry names") promises; each attribute is a family."""

    def __init__(self, registry: Metrics | None = None, version: str = __version__) -> None:
        m = self.registry = registry if registry is not None else Metrics()
        svc = ("service",)
        self.calls = m.counter(
            "edged_calls_total", "Calls routed through the mesh, by final outcome.", ("service", "tier", "outcome")
        )
        self.call_seconds = m.histogram(
            "edged_call_seconds", "Duration of calls routed through the mesh, in seconds.", ("service", "tier")
        )
        self.failovers = m.counter("edged_failovers_total", "Calls that moved on to another endpoint.", svc)
        self.overloaded = m.counter(
            "edged_breaker_overflows_total",
            "Calls or tries turned away by a circuit breaker limit (max_inflight, max_pending, endpoint_max_inflight).",
            ("service", "limit"),
        )
        self.endpoint_up = m.gauge(
            "edged_endpoint_up", "1 when an endpoint is healthy, 0 when not.", ("service", "endpoint", "tier")
        )
        self.policy_evaluations = m.counter(
            "edged_policy_evaluations_total", "Times a policy ranked endpoints.", ("policy",)
        )
        self.node_vitals = m.gauge("edged_node_vitals", "This node's vitals (cpu, battery, link), 0..100.", ("kind",))
        self.mqtt_connected = m.gauge("edged_mqtt_connected", "1 while connected to the MQTT broker.")
        self.mdns_peers = m.gauge("edged_mdns_peers", "HubMesh peers currently seen over mDNS.")
        self.retries = m.counter("edged_retries_total", "Extra tries of a call, by reason.", ("service", "reason"))
        self.retry_budget_exhausted = m.counter(
            "edged_retry_budget_exhausted_total", "Retries refused because the retry budget was spent.", svc
        )
        self.ejections = m.counter(
            "edged_outlier_ejections_total", "Endpoints ejected by passive outlier detection.", svc
        )
        self.manifest_errors = m.counter("edged_manifest_errors_total", "Manifests refused as invalid.")
        self.registry_generation = m.gauge("edged_registry_generation", "Generation of the current registry snapshot.")
        self.registrations = m.gauge("edged_registrations", "Services registered locally through the API.")
        self.http_errors = m.counter("edged_http_errors_total", "Requests the local API refused, by status.", ("code",))
        self.inflight = m.gauge("edged_inflight_calls", "Calls in flight through the mesh.")
        self.limit_hits = m.counter(
            "edged_limit_hits_total", "Times a resource limit ([limits]) refused or held back input.", ("limit",)
        )
        self.identity_expiry = m.gauge(
            "edged_identity_expiry_seconds", "Seconds until this node's fleet certificate expires (negative: expired)."
        )
        self.identity_renewals = m.counter(
            "edged_identity_renewals_total", "Renewals of this node's fleet certificate, by result.", ("result",)
        )
        self.peers_refused = m.counter(
            "edged_peer_refused_total", "Advertised peers refused because their TLS handshake did not prove them."
        )
        self.build_info = m.gauge("edged_build_info", "Always 1; the version is the label.", ("version",))
        self.build_info.set((version,), 1)
        self.body_breaks = m.counter(
            "edged_body_breaks_total",
            "Answers whose body broke off upstream, by what the caller saw (failover: another endpoint answered"
            " or a clean error; truncated: the caller's connection was closed mid-body).",
            ("service", "outcome"),
        )
        self.task_restarts = m.counter(
            "edged_task_restarts_total", "Background loops that failed and were started again.", ("task",)
        )
        self.tasks = m.gauge("edged_tasks", "asyncio tasks alive in the daemon.")
        self.loop_lag = m.histogram(
            "edged_loop_lag_seconds",
            "How late the event loop ran a timer, sampled 4 times a second.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )

    def add_collector(self, fn: Callable[[], None]) -> None:
        """Shortcut for `registry.add_collector()`."""
        self.registry.add_collector(fn)

    def render(self) -> str:
        """Shortcut for `registry.render()`."""
        return self.registry.render()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """Shortcut for `registry.value()`."""
        return self.registry.value(name, labels)
