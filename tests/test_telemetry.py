from __future__ import annotations

import math
import re

import pytest

from edged import __version__
from edged.errors import EdgedError
from edged.telemetry import DEFAULT_BUCKETS, Counter, Gauge, Histogram, MeshMetrics, Metrics, TelemetryError

# A strict reader of the text exposition format 0.0.4, so that tests check what a scraper sees.
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], value)


def parse(text: str) -> tuple[dict[str, tuple[str, str]], list[tuple[str, dict[str, str], float]]]:
    """(name -> (type, help), samples) of an exposition; fails on any malformed line."""
    assert text.endswith("\n")
    meta: dict[str, list[str]] = {}
    samples = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            meta.setdefault(name, ["", ""])[1] = _unescape(help_text)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            meta.setdefault(name, ["", ""])[0] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"malformed sample line {line!r}"
            labels: dict[str, str] = {}
            if m.group(2):
                body = m.group(2)[1:-1]
                pos = 0
                while pos < len(body):
                    pm = _PAIR.match(body, pos)
                    assert pm, f"malformed labels in {line!r}"
                    labels[pm.group(1)] = _unescape(pm.group(2))
                    pos = pm.end()
            samples.append((m.group(1), labels, float(m.group(3))))
    return {k: (v[0], v[1]) for k, v in meta.items()}, samples


def find(samples, name, **labels) -> float:
    hits = [v for n, lab, v in samples if n == name and lab == labels]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def test_counter_and_gauge_render_with_help_and_type() -> None:
    m = Metrics()
    calls = m.counter("t_calls_total", "Calls.\nSecond line with \\ backslash.", ("service", "outcome"))
    up = m.gauge("t_up", "Up.", ("endpoint",))
    calls.inc(("thermo", "ok"))
    calls.inc(("thermo", "ok"), 2)
    calls.inc(("thermo", "error"))
    up.set(("a",), 1)
    up.set(("b",), 0)
    meta, samples = parse(m.render())
    assert meta["t_calls_total"] == ("counter", "Calls.\nSecond line with \\ backslash.")
    assert meta["t_up"] == ("gauge", "Up.")
    assert find(samples, "t_calls_total", service="thermo", outcome="ok") == 3
    assert find(samples, "t_calls_total", service="thermo", outcome="error") == 1
    assert find(samples, "t_up", endpoint="a") == 1
    up.remove(("a",))
    _, samples = parse(m.render())
    assert [lab for n, lab, _ in samples if n == "t_up"] == [{"endpoint": "b"}]


def test_label_values_are_escaped() -> None:
    m = Metrics()
    g = m.gauge("t_g", "g", ("v",))
    nasty = 'quote " backslash \\ newline \n end'
    g.set((nasty,), 7)
    text = m.render()
    assert '\\"' in text and "\\\\" in text and "\\n" in text
    assert len([line for line in text.splitlines() if line.startswith("t_g")]) == 1
    _, samples = parse(text)
    assert find(samples, "t_g", v=nasty) == 7


def test_unlabelled_metrics_show_zero_before_first_use() -> None:
    m = Metrics()
    m.counter("t_total", "t")
    m.gauge("t_gauge", "t")
    m.histogram("t_seconds", "t", buckets=(1,))
    _, samples = parse(m.render())
    assert find(samples, "t_total") == 0
    assert find(samples, "t_gauge") == 0
    assert find(samples, "t_seconds_count") == 0
    assert find(samples, "t_seconds_bucket", le="+Inf") == 0


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    m = Metrics()
    h = m.histogram("t_seconds", "t", ("service",), buckets=(0.1, 1, 10))
    for v in (0.05, 0.1, 0.5, 2, 20):  # 0.1 sits on a bound: le is inclusive
        h.observe(("thermo",), v)
    meta, samples = parse(m.render())
    assert meta["t_seconds"][0] == "histogram"
    buckets = [(lab["le"], v) for n, lab, v in samples if n == "t_seconds_bucket"]
    assert buckets == [("0.1", 2), ("1", 3), ("10", 4), ("+Inf", 5)]
    assert find(samples, "t_seconds_count", service="thermo") == 5
    assert find(samples, "t_seconds_sum", service="thermo") == pytest.approx(22.65)
    assert h.get(("thermo",)) == (5, pytest.approx(22.65))
    assert m.value("t_seconds_count", {"service": "thermo"}) == 5
    assert m.value("t_seconds_sum") == pytest.approx(22.65)
    assert m.value("t_seconds") == 5


def test_default_buckets_are_the_call_seconds_buckets() -> None:
    expected = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
    assert expected == DEFAULT_BUCKETS
    m = Metrics()
    m.histogram("t_seconds", "t").observe((), 0.003)
    _, samples = parse(m.render())
    les = [lab["le"] for n, lab, _ in samples if n == "t_seconds_bucket"]
    assert [float(x) for x in les] == [*expected, math.inf]
    assert find(samples, "t_seconds_bucket", le="0.0025") == 0
    assert find(samples, "t_seconds_bucket", le="0.005") == 1


def test_wrong_label_count_and_bad_declarations_raise_edged_errors() -> None:
    m = Metrics()
    c = m.counter("t_total", "t", ("a", "b"))
    with pytest.raises(TelemetryError):
        c.inc(("only-one",))
    with pytest.raises(TelemetryError):
        c.inc(("x", "y"), -1)
    with pytest.raises(TelemetryError):
        m.gauge("t_g", "g", ("a",)).set((), 1)
    with pytest.raises(TelemetryError):
        m.histogram("t_h", "h", ("a",)).observe(("x", "y"), 1)
    with pytest.raises(EdgedError):
        m.counter("t_total", "duplicate")
    with pytest.raises(TelemetryError):
        m.counter("bad name", "x")
    with pytest.raises(TelemetryError):
        m.counter("t_x", "x", ("__reserved",))
    with pytest.raises(TelemetryError):
        m.histogram("t_y", "y", ("le",))
    assert m.value("t_total") is None  # nothing was counted by the refused calls


def test_value_sums_matching_series() -> None:
    m = Metrics()
    c = m.counter("t_total", "t", ("service", "tier"))
    c.inc(("a", "local"))
    c.inc(("a", "edge"), 2)
    c.inc(("b", "local"), 4)
    assert m.value("t_total") == 7
    assert m.value("t_total", {"service": "a"}) == 3
    assert m.value("t_total", {"service": "a", "tier": "edge"}) == 2
    assert m.value("t_total", {"service": "zzz"}) is None
    assert m.value("t_total", {"nope": "a"}) is None
    assert m.value("t_missing") is None


def test_collectors_run_before_render_and_a_failing_one_is_skipped() -> None:
    m = Metrics()
    g = m.gauge("t_peers", "peers")
    seen = []

    def refresh() -> None:
        seen.append(1)
        g.set((), len(seen) * 10)

    def broken() -> None:
        raise RuntimeError("collector bug")

    m.add_collector(broken)
    m.add_collector(refresh)
    _, samples = parse(m.render())
    assert find(samples, "t_peers") == 10
    _, samples = parse(m.render())
    assert find(samples, "t_peers") == 20


def test_series_cap_drops_new_label_sets_but_keeps_existing() -> None:
    m = Metrics(max_series=3)
    c = m.counter("t_total", "t", ("service",))
    for i in range(10):
        c.inc((f"s{i}",))
    c.inc(("s0",))
    assert m.value("t_total") == 4
    assert c.get(("s0",)) == 2
    assert c.dropped == 7


def test_cells_and_rows_count_into_their_series_as_inc_and_observe_do() -> None:
    """The call path holds a counter's cell and a histogram's row and adds to them directly: a scrape, `value`,
    `get` and `values` see those counts; past the series cap a held cell counts nowhere, as `inc` would."""
    m = Metrics(max_series=2)
    c = m.counter("c_total", "c", ("service",))
    h = m.histogram("h_seconds", "h", ("service",), buckets=(0.1, 1))
    cell = c.cell(("a",))
    assert c.cell(("a",)) is cell
    cell[0] += 2
    c.inc(("a",))
    assert c.get(("a",)) == 3 and m.value("c_total") == 3 and c.values() == {("a",): 3}
    row = h.row(("a",))
    assert h.row(("a",)) is row
    row[0] += 1  # as observe counts: the bucket, and the sum (the count is the buckets' total)
    row[-1] += 0.05
    h.observe(("a",), 0.5)
    assert h.get(("a",)) == (2, 0.55) and m.value("h_seconds_count") == 2 and m.value("h_seconds_sum") == 0.55
    text = m.render()
    assert 'c_total{service="a"} 3' in text and 'h_seconds_bucket{service="a",le="0.1"} 1' in text
    c.inc(("b",))
    extra = c.cell(("c",))  # a third series: over the cap
    extra[0] += 5
    assert c.values() == {("a",): 3, ("b",): 1} and c.dropped == 1 and 'c_total{service="c"}' not in m.render()


def test_gauge_inc_dec_and_values_format() -> None:
    m = Metrics()
    g = m.gauge("t_inflight", "t")
    g.inc()
    g.inc()
    g.dec()
    f = m.gauge("t_float", "t", ("k",))
    f.set(("half",), 0.5)
    f.set(("inf",), math.inf)
    f.set(("nan",), math.nan)
    text = m.render()
    assert "t_inflight 1\n" in text
    assert 't_float{k="half"} 0.5\n' in text
    assert 't_float{k="inf"} +Inf\n' in text
    assert 't_float{k="nan"} NaN\n' in text
    parse(text)


def test_mesh_metrics_declares_the_design_names() -> None:
    mm = MeshMetrics()
    expected = {
        "calls": (Counter, "edged_calls_total", ("service", "tier", "outcome")),
        "call_seconds": (Histogram, "edged_call_seconds", ("service", "tier")),
        "failovers": (Counter, "edged_failovers_total", ("service",)),
        "endpoint_up": (Gauge, "edged_endpoint_up", ("service", "endpoint", "tier")),
        "policy_evaluations": (Counter, "edged_policy_evaluations_total", ("policy",)),
        "node_vitals": (Gauge, "edged_node_vitals", ("kind",)),
        "mqtt_connected": (Gauge, "edged_mqtt_connected", ()),
        "mdns_peers": (Gauge, "edged_mdns_peers", ()),
        "retries": (Counter, "edged_retries_total", ("service", "reason")),
        "retry_budget_exhausted": (Counter, "edged_retry_budget_exhausted_total", ("service",)),
        "ejections": (Counter, "edged_outlier_ejections_total", ("service",)),
        "manifest_errors": (Counter, "edged_manifest_errors_total", ()),
        "registry_generation": (Gauge, "edged_registry_generation", ()),
        "registrations": (Gauge, "edged_registrations", ()),
        "http_errors": (Counter, "edged_http_errors_total", ("code",)),
        "inflight": (Gauge, "edged_inflight_calls", ()),
        "build_info": (Gauge, "edged_build_info", ("version",)),
    }
    for attr, (kind, name, labels) in expected.items():
        family = getattr(mm, attr)
        assert type(family) is kind, attr
        assert (family.name, family.labelnames) == (name, labels), attr
    assert mm.call_seconds.buckets == DEFAULT_BUCKETS
    mm.calls.inc(("thermo", "local", "ok"))
    mm.call_seconds.observe(("thermo", "local"), 0.002)
    mm.http_errors.inc(("413",))
    meta, samples = parse(mm.render())
    assert {name for _, name, _ in expected.values()} <= set(meta)
    assert find(samples, "edged_build_info", version=__version__) == 1
    assert find(samples, "edged_calls_total", service="thermo", tier="local", outcome="ok") == 1
    assert find(samples, "edged_call_seconds_bucket", service="thermo", tier="local", le="0.0025") == 1
    assert mm.value("edged_http_errors_total", {"code": "413"}) == 1
    mm.add_collector(lambda: mm.mdns_peers.set((), 3))
    assert mm.value("edged_mdns_peers") == 0  # collectors run at render time only
    assert "edged_mdns_peers 3\n" in mm.render()
    assert mm.value("edged_mdns_peers") == 3


def test_non_string_label_values_share_the_string_series() -> None:
    m = Metrics()
    c = m.counter("t_errors_total", "t", ("code",))
    c.inc((413,))
    c.inc(("413",))
    c.inc((400,))
    h = m.histogram("t_h", "t", ("n",), buckets=(1,))
    h.observe((1,), 0.5)
    h.observe(("1",), 0.5)
    _, samples = parse(m.render())
    assert find(samples, "t_errors_total", code="413") == 2
    assert find(samples, "t_errors_total", code="400") == 1
    assert find(samples, "t_h_count", n="1") == 2
    assert c.get((413,)) == 2
    c.remove((413,))
    assert m.value("t_errors_total") == 1
