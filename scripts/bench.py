#!/usr/bin/env python3
"""Data-plane benchmark: the same 64-byte backend called directly, through edged and through HAProxy, in one run.

Measures, per path: throughput on one core (wrk -t1 -c16, proxy pinned to one CPU, backend and client to
the other), CPU per call of the proxy, latency at a fixed low rate (open loop, Python client), latency one
call at a time on one keep-alive connection, and idle RSS. Then the footprint of two idle daemons: the
local tier alone, and everything on (mDNS on loopback, MQTT to a Mosquitto it starts, a fleet key, 20
services with health checks): RSS, CPU and context switches per second. `--baseline REF` runs a second
edged from that git ref (e.g. main) beside this tree's, in the same run, for before/after figures.
`--compiled VENV` runs the opt-in compiled build installed in that venv too (`scripts/build-compiled`).
The `floor` column is the same stack with no mesh logic (scripts/floor_relay.py: uvloop + httptools, callbacks
only): edged's CPU per call above it is edged's own work, and the floor's distance to HAProxy is the stack's.
Prints a table, the issue's targets with PASS/MISS, then the figures as JSON. Installs nothing; ends
every process it started.

usage: scripts/bench.py [--duration 5] [--rounds 2] [--rate 500] [--baseline REF] [--compiled VENV] [--skip-haproxy]
                        [--skip-floor] [--skip-footprint] [--json-only]
       scripts/bench.py --slow-cpu [FACTOR]   (only the daemon, capped at 1/FACTOR of a core: see slow_cpu_bench)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from harness import REPO, Edged, free_port, wait_for
from loadgen import LoadGen
from slowcpu import DEFAULT_FACTOR

BODY = "0123456789abcdef" * 4  # the 64-byte answer
SERVICE = "bench"
CONNECTIONS = 16
SEQUENTIAL_CALLS = 2000
IDLE_CALLS = 100
IDLE_WAIT = 3.0

IDLE_WINDOW = 10.0  # seconds over which idle CPU and context switches are counted
FULL_SERVICES = 20
FULL_SETTLE = 5.0  # seconds for the full daemon to probe mDNS names and connect to the broker
INSTALL_HINT = "apt-get install haproxy wrk nginx mosquitto"

TARGET_CALLS_PER_S = 14_000
TARGET_VS_HAPROXY = 0.3
TARGET_ADDED_P50_US = 150.0
TARGET_CPU_AT_RATE_US = 150.0
TARGET_IDLE_RSS_MIB = 35.0

MANIFEST = """
service_name = "bench"
[[endpoints]]
type = "local"
url = "http://127.0.0.1:{port}"
"""

# Everything on: the edge tier with mDNS on loopback, the cloud tier on a local Mosquitto, a trusted fleet
# key, and FULL_SERVICES services each with an HTTP health check.
FULL_CONFIG = """
[node]
name = "bench-full"
fleet = "bench"
[api]
listen = "127.0.0.1:{api_port}"
socket = "run/edged.sock"
[services]
dirs = ["services.d"]
[state]
dir = "state"
[mdns]
enabled = true
interfaces = ["127.0.0.1"]
[ingress]
listen = "127.0.0.1:{ingress_port}"
insecure = true
[mqtt]
enabled = true
url = "mqtt://127.0.0.1:{mqtt_port}"
[fleet]
keys = ["fleet.pub"]
[log]
level = "warning"
"""

FULL_MANIFEST = """
service_name = "svc{i:02d}"
[[endpoints]]
type = "local"
url = "http://127.0.0.1:{port}"
[health_check]
http = "/"
interval = "2s"
"""

MOSQUITTO_CFG = """
listener {port} 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
persistence false
log_dest stderr
"""

HAPROXY_CFG = """
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 127.0.0.1:{backend}
"""

NGINX_CFG = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
{temp_paths}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{ default_type text/plain; return 200 "{body}"; }}
    }}
}}
"""


QUIET = False  # --json-only: no progress lines either


def log(msg: str) -> None:
    """Progress on stderr, so that stdout holds only the table and the JSON."""
    if not QUIET:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- processes


class Proc:
    """A child process that is always ended by its PID: SIGTERM, then SIGKILL after a grace period."""

    def __init__(self, name: str, argv: list[str], cwd: Path, log_path: Path) -> None:
        self.name = name
        with log_path.open("ab") as out:
            self.popen = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        """Fail with the end of the process's log if it has exited."""
        if self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def stop_edged(d: Edged) -> None:
    """Stop the daemon by PID; kill it if it does not stop in time."""
    if d.proc is None or d.proc.poll() is not None:
        return
    with contextlib.suppress(AssertionError):  # Edged.stop() SIGKILLs it when it does not stop in time
        d.stop()


def pin(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of `pid` to `cpus` (a process's affinity call only moves its main thread)."""
    if cpus is None:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # the thread ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of the whole process (all threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def per_call_us(before: tuple[float, float], after: tuple[float, float], calls: int) -> tuple[float, float]:
    """(user, system) CPU µs per call between two `cpu_times` readings."""
    if not calls:
        return 0.0, 0.0
    return round((after[0] - before[0]) * 1e6 / calls, 1), round((after[1] - before[1]) * 1e6 / calls, 1)


def ctx_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of `pid` so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # the thread ended meanwhile
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per CPU, from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+)\s+(.*)", line)
        if m:
            v = [int(x) for x in m.group(2).split()]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            out[int(m.group(1))] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def busy_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpu: int) -> float | None:
    if cpu not in before or cpu not in after:
        return None
    total = after[cpu][1] - before[cpu][1]
    return round(100 * (after[cpu][0] - before[cpu][0]) / total) if total else None


def http_get_once(port: int, path: str, timeout: float = 1.0) -> int:
    """Status of one GET, 0 if the server is not answering yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(65536)
        return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    except (OSError, ValueError, IndexError):
        return 0


# --------------------------------------------------------------------------------------------- backends


def start_nginx(tmp: Path) -> tuple[Proc, int, str]:
    """nginx as one process (no master), answering 64 bytes on every path."""
    port = free_port()
    info = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    temp_paths = [f"    client_body_temp_path {tmp}/client_body;"]
    for module in ("proxy", "fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in info:
            temp_paths.append(f"    {module}_temp_path {tmp}/{module};")
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CFG.format(tmp=tmp, port=port, body=BODY, temp_paths="\n".join(temp_paths)))
    proc = Proc("nginx", ["nginx", "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")], tmp, tmp / "out.log")
    version = info.splitlines()[0].split(":", 1)[-1].strip() if info else "nginx"
    return proc, port, version


def start_python_backend(tmp: Path) -> tuple[Proc, int, str]:
    port = free_port()
    argv = [sys.executable, str(REPO / "scripts" / "bench_backend.py"), str(port)]
    proc = Proc("bench_backend", argv, tmp, tmp / "backend.log")
    try:
        import uvloop  # noqa: F401

        flavour = "uvloop"
    except ImportError:
        flavour = "asyncio"
    return proc, port, f"scripts/bench_backend.py ({flavour})"


def wait_ready(proc: Proc, port: int) -> None:
    """Wait until `proc` answers 200 on `port`; stop it (by PID) if it never does."""
    try:
        wait_for(lambda: proc.check() or http_get_once(port, "/") == 200, 10, what=f"{proc.name} on port {port}")
    except BaseException:
        proc.stop()
        raise


def start_backend(tmp: Path, notes: list[str]) -> tuple[Proc, int, str]:
    """nginx when installed and it starts, else the Python backend."""
    if shutil.which("nginx"):
        proc, port, name = start_nginx(tmp)
        try:
            wait_ready(proc, port)
            return proc, port, name
        except (AssertionError, RuntimeError) as exc:
            notes.append(f"nginx did not start ({str(exc).splitlines()[0]}); using the Python backend")
    else:
        notes.append(f"nginx is not installed; using the Python backend (install: {INSTALL_HINT})")
    proc, port, name = start_python_backend(tmp)
    wait_ready(proc, port)
    return proc, port, name


def start_haproxy(tmp: Path, backend_port: int) -> tuple[Proc, int]:
    port = free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(textwrap.dedent(HAPROXY_CFG).format(port=port, backend=backend_port))
    proc = Proc("haproxy", ["haproxy", "-db", "-f", str(conf)], tmp, tmp / "haproxy.log")
    wait_ready(proc, port)
    return proc, port


def start_floor(tmp: Path, backend_port: int) -> tuple[Proc, int]:
    """scripts/floor_relay.py: the stack edged is built on (uvloop + httptools) relaying with no mesh logic."""
    port = free_port()
    argv = [sys.executable, str(REPO / "scripts" / "floor_relay.py"), str(port), str(backend_port)]
    proc = Proc("floor", argv, tmp, tmp / "floor.log")
    wait_ready(proc, port)
    return proc, port


def bench_daemon(
    tmp: Path, backend_port: int, source: Path | None = REPO, name: str = "edged", python: str | None = None
) -> Edged:
    """The daemon (from the edged tree `source`; None: the edged installed for `python`) with one local
    endpoint, not started, logging at warning so that logging is not what we measure."""
    d = Edged(tmp / name, {"bench.toml": MANIFEST.format(port=backend_port)}, source=source, python=python)
    text = d.config.read_text()
    # The harness's test settings, back to production ones: quiet logs, manifests checked every 2 s.
    changes = (("[log]\n", '[log]\nlevel = "warning"\n'), ('reload_interval = "200ms"', 'reload_interval = "2s"'))
    for old, new in changes:
        if old not in text:
            raise RuntimeError(f"harness.Edged config has no {old.strip()!r}: update scripts/bench.py")
        text = text.replace(old, new, 1)
    d.config.write_text(text)
    return d


def start_edged(
    tmp: Path,
    backend_port: int,
    stack: ExitStack,
    source: Path | None = REPO,
    name: str = "edged",
    python: str | None = None,
) -> Edged:
    """`bench_daemon`, started. Its stop is on `stack` before it starts, so a daemon that never gets ready is
    stopped too."""
    d = bench_daemon(tmp, backend_port, source, name, python)
    stack.callback(stop_edged, d)
    return d.start()


def start_mosquitto(tmp: Path) -> tuple[Proc, int] | None:
    """A Mosquitto broker on a free loopback port, None when it is not installed."""
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
    if binary is None:
        return None
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(MOSQUITTO_CFG.format(port=port))
    proc = Proc("mosquitto", [binary, "-c", str(conf)], tmp, tmp / "mosquitto.log")

    def listening() -> bool:
        proc.check()
        with socket.socket() as s, contextlib.suppress(OSError):
            s.settimeout(0.2)
            s.connect(("127.0.0.1", port))
            return True
        return False

    try:
        wait_for(listening, 10, what=f"mosquitto on port {port}")
    except BaseException:
        proc.stop()
        raise
    return proc, port


def start_full_edged(
    tmp: Path, backend_port: int, mqtt_port: int, source: Path | None, name: str, python: str | None = None
) -> Edged:
    """The daemon with everything on (FULL_CONFIG), from the tree `source` (None: the edged installed for
    `python`); the caller stops it."""
    root = tmp / name
    manifests = {f"svc{i:02d}.toml": FULL_MANIFEST.format(i=i, port=backend_port) for i in range(FULL_SERVICES)}
    api_port = free_port()
    config = FULL_CONFIG.format(api_port=api_port, ingress_port=free_port(), mqtt_port=mqtt_port)
    d = Edged(root, manifests, config_text=config, port=api_port, source=source, python=python)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    keygen = [d.python, "-m", "edged", "fleet", "keygen", "fleet"]
    subprocess.run(keygen, cwd=root, env=env, check=True, capture_output=True, timeout=30)
    return d.start()


def idle_figures(pids: dict[str, int], seconds: float) -> dict[str, dict]:
    """RSS now, then CPU ms and context switches per second of each process over `seconds` of quiet."""
    rss = {name: rss_mib(pid) for name, pid in pids.items()}
    before = {name: (cpu_times(pid), ctx_switches(pid)) for name, pid in pids.items()}
    time.sleep(seconds)
    out = {}
    for name, pid in pids.items():
        (cpu0, sw0), cpu1, sw1 = before[name], cpu_times(pid), ctx_switches(pid)
        out[name] = {
            "rss_mib": rss[name],
            "cpu_ms_per_s": round((sum(cpu1) - sum(cpu0)) * 1000 / seconds, 2),
            "ctx_switches_per_s": round((sw1 - sw0) / seconds, 1),
        }
    return out


def footprint(
    tmp: Path, backend_port: int, trees: dict[str, tuple[Path | None, str | None]], notes: list[str]
) -> dict[str, dict]:
    """Idle figures of the full daemon of each tree, one at a time (their mDNS must not see each other)."""
    started = start_mosquitto(tmp)
    if started is None:
        notes.append(f"mosquitto is not installed: no full-daemon footprint (install: {INSTALL_HINT})")
        return {}
    broker, mqtt_port = started
    out = {}
    try:
        for name, (source, python) in trees.items():
            log(f"[{name}] full daemon: mDNS + MQTT + {FULL_SERVICES} services; {FULL_SETTLE:g} s to settle")
            d = start_full_edged(tmp, backend_port, mqtt_port, source, f"{name.replace('@', '-')}-full", python)
            try:
                assert d.proc is not None
                time.sleep(FULL_SETTLE)
                broker.check()
                d.ready()
                out[name] = idle_figures({name: d.proc.pid}, IDLE_WINDOW)[name]
                snap = d.get("/v1/services")
                up = sum(ep["up"] for svc in snap["services"] for ep in svc["endpoints"])
                metrics = d.api.request("GET", "/metrics")[2].decode()
                mqtt = "edged_mqtt_connected 1" in metrics.splitlines()
                out[name].update(services=len(snap["services"]), endpoints_up=up, mqtt_connected=mqtt)
                if not mqtt:
                    notes.append(f"{name}: the full daemon was not connected to the broker when measured")
            finally:
                stop_edged(d)
    finally:
        broker.stop()
    return out


def runs_uvloop(pid: int) -> bool:
    return "uvloop" in Path(f"/proc/{pid}/maps").read_text()


# --------------------------------------------------------------------------------------------- clients


class SequentialClient:
    """One keep-alive connection, one call at a time: latency without any client-side scheduling."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench\r\n\r\n".encode()
        self.buf = b""

    def call(self) -> int:
        """One call; returns the status."""
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
        length = int(m.group(1)) if m else 0
        while len(self.buf) < length:
            self._recv()
        self.buf = self.buf[length:]
        return int(head.split(b" ", 2)[1])

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by the server")
        self.buf += data

    def latencies_us(self, n: int) -> tuple[list[float], int]:
        """`n` calls; their latencies in µs and the count of non-200 answers."""
        out, bad = [], 0
        for _ in range(n):
            t0 = time.perf_counter_ns()
            status = self.call()
            out.append((time.perf_counter_ns() - t0) / 1000)
            bad += status != 200
        return out, bad

    def close(self) -> None:
        self.sock.close()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(p * len(s)))], 1) if s else 0.0


def run_async(coro):
    """Client-side event loop: uvloop when installed (less client noise), the same for every path."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_wrk(port: int, path: str, duration: float) -> dict:
    """wrk -t1 -c16 --latency; calls, calls/s and errors."""
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(duration))}s", "--latency"]
    out = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=duration + 30
    )
    text = out.stdout
    m_rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    m_calls = re.search(r"(\d+) requests in", text)
    if out.returncode != 0 or not m_rps or not m_calls:
        raise RuntimeError(f"wrk failed ({out.returncode}): {text[-500:]} {out.stderr[-500:]}")
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    m_bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return {
        "calls": int(m_calls.group(1)),
        "calls_per_s": round(float(m_rps.group(1))),
        "errors": errors + (int(m_bad.group(1)) if m_bad else 0),
    }


class _LoopConn(asyncio.Protocol):
    """One connection of the closed-loop client: a new call as soon as the previous answer is complete."""

    def __init__(self, request: bytes, end: float, done: asyncio.Future) -> None:
        self.request, self.end, self.done = request, end, done
        self.buf = b""
        self.calls = self.bad = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        m = re.search(rb"\r\ncontent-length:\s*(\d+)", self.buf[:end], re.IGNORECASE)
        length = int(m.group(1)) if m else 0
        if len(self.buf) < end + 4 + length:
            return
        self.calls += 1
        self.bad += not self.buf.startswith(b"HTTP/1.1 200")
        self.buf = self.buf[end + 4 + length :]
        assert self.transport is not None
        if time.monotonic() < self.end:
            self.transport.write(self.request)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def closed_loop(port: int, path: str, duration: float) -> dict:
    """The fallback when wrk is missing: 16 connections, one call in flight on each."""
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    end = time.monotonic() + duration
    conns = []
    for _ in range(CONNECTIONS):
        done = loop.create_future()
        _, proto = await loop.create_connection(lambda d=done: _LoopConn(request, end, d), "127.0.0.1", port)
        conns.append(proto)
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(c.done for c in conns)), duration + 10)
    calls = sum(c.calls for c in conns)
    return {
        "calls": calls,
        "calls_per_s": round(calls / (time.monotonic() - t0)),
        "errors": sum(c.bad for c in conns),
    }


def open_loop_us(port: int, path: str, rate: float, duration: float, pid: int) -> dict:
    """LoadGen at a fixed rate: p50/p99 in µs, failures, and the CPU per call of process `pid` at that rate."""
    before = cpu_times(pid)
    results = run_async(LoadGen("127.0.0.1", port, path).run(rate, duration))
    user, system = per_call_us(before, cpu_times(pid), len(results))
    lat = [r.latency * 1e6 for r in results if r.status == 200]
    return {
        "calls": len(results),
        "failed": len(results) - len(lat),
        "p50_us": pct(lat, 0.50),
        "p99_us": pct(lat, 0.99),
        "cpu_us_per_call": round(user + system, 1),
    }


def throughput_run(p: Route, duration: float, use_wrk: bool, cpus: tuple[int, int] | None, warm: bool) -> dict:
    """Calls/s over `duration`, CPU per call of the measured process, and how busy each CPU was meanwhile.

    `own_cpu_pct` below `busy_pct_proxy_cpu` (proxied paths) means something else ran on the proxy's CPU.
    """
    run = run_wrk if use_wrk else (lambda port, path, d: run_async(closed_loop(port, path, d)))
    if warm:
        run(p.port, p.path, 1.0)  # connection pools filled, code paths hot
    cpu0, ticks0, t0 = cpu_times(p.pid), cpu_ticks(), time.monotonic()
    out = run(p.port, p.path, duration)
    cpu1, ticks1, wall = cpu_times(p.pid), cpu_ticks(), time.monotonic() - t0
    user, system = per_call_us(cpu0, cpu1, out["calls"])
    out.update(
        cpu_us_per_call=round(user + system, 1),
        cpu_user_us=user,
        cpu_sys_us=system,
        own_cpu_pct=round(100 * (sum(cpu1) - sum(cpu0)) / wall),
        busy_pct_proxy_cpu=busy_share(ticks0, ticks1, cpus[0]) if cpus else None,
        busy_pct_client_cpu=busy_share(ticks0, ticks1, cpus[1]) if cpus else None,
    )
    return out


# --------------------------------------------------------------------------------------------- the run


@dataclass
class Route:
    """One way to reach the backend; `pid` is the process whose CPU we charge (the proxy, or the backend)."""

    name: str
    port: int
    path: str
    pid: int
    check: Callable[[], None]


def latency(p: Route, args) -> dict:
    """One call at a time, then the open loop at a fixed rate."""
    log(f"[{p.name}] one call at a time ({SEQUENTIAL_CALLS} calls)")
    c = SequentialClient(p.port, p.path)
    try:
        c.latencies_us(200)  # warm-up
        seq, bad = c.latencies_us(SEQUENTIAL_CALLS)
    finally:
        c.close()
    log(f"[{p.name}] open loop {args.rate:g} calls/s for {args.duration:g} s")
    ol = open_loop_us(p.port, p.path, args.rate, args.duration, p.pid)
    p.check()
    return {
        "seq_p50_us": pct(seq, 0.50),
        "seq_p99_us": pct(seq, 0.99),
        "seq_mean_us": round(statistics.fmean(seq), 1),
        "seq_bad": bad,
        "open_loop": ol,
    }


def throughput(paths: list[Route], args, use_wrk: bool, cpus: tuple[int, int] | None) -> dict[str, dict]:
    """`--rounds` throughput runs per path, interleaved so that a noisy spell hits every path alike.

    The best round of each path is its figure (the least disturbed one on a shared machine); every
    round's calls/s is kept under `rounds_calls_per_s`.
    """
    best: dict[str, dict] = {}
    rounds: dict[str, list[int]] = {p.name: [] for p in paths}
    for i in range(args.rounds):
        for p in paths:
            log(f"[{p.name}] throughput round {i + 1}/{args.rounds}, {CONNECTIONS} connections, {args.duration:g} s")
            run = throughput_run(p, args.duration, use_wrk, cpus, warm=i == 0)
            p.check()
            rounds[p.name].append(run["calls_per_s"])
            if p.name not in best or run["calls_per_s"] > best[p.name]["calls_per_s"]:
                best[p.name] = run
    for p in paths:
        best[p.name]["rounds_calls_per_s"] = rounds[p.name]
    return best


def idle_footprint(paths: list[Route]) -> dict[str, dict]:
    """100 calls to each proxy, 3 s of quiet, then RSS, CPU and context switches per second (`idle_figures`)."""
    for p in paths:
        c = SequentialClient(p.port, p.path)
        try:
            c.latencies_us(IDLE_CALLS)
        finally:
            c.close()
    time.sleep(IDLE_WAIT)
    return idle_figures({p.name: p.pid for p in paths}, IDLE_WINDOW)


def choose_cpus(notes: list[str]) -> tuple[int, int] | None:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        notes.append(f"only {len(allowed)} CPU allowed: no pinning, proxy and client share the CPU")
        return None
    return allowed[0], allowed[1]


def baseline_tree(ref: str, tmp: Path) -> Path:
    """The edged tree at git ref `ref` of this repository, unpacked under `tmp` (the worktree is not touched)."""
    out = tmp / "baseline-tree"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True, timeout=60)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True, timeout=60)
    return out


def bench(args, tmp: Path, stack: ExitStack) -> dict:
    notes: list[str] = []
    use_wrk = shutil.which("wrk") is not None
    if not use_wrk:
        notes.append(f"wrk is not installed: throughput from a Python closed-loop client (install: {INSTALL_HINT})")
    use_haproxy = not args.skip_haproxy and shutil.which("haproxy") is not None
    if args.skip_haproxy:
        notes.append("HAProxy skipped (--skip-haproxy): no edged/HAProxy ratio")
    elif not use_haproxy:
        notes.append(f"haproxy is not installed: its column is skipped (install: {INSTALL_HINT})")
    cpus = choose_cpus(notes)
    proxy_cpus, client_cpus = ({cpus[0]}, {cpus[1]}) if cpus else (None, None)
    # Children inherit this process's affinity: backend, wrk and this client land on the client CPU.
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)

    backend, backend_port, backend_name = start_backend(tmp, notes)
    stack.callback(backend.stop)
    log(f"backend: {backend_name} on port {backend_port}")
    paths = [Route("direct", backend_port, "/x", backend.pid, backend.check)]

    trees: dict[str, tuple[Path | None, str | None]] = {"edged": (REPO, None)}
    if args.baseline:
        trees[f"edged@{args.baseline}"] = (baseline_tree(args.baseline, tmp), None)
    if args.compiled:  # the opt-in compiled build, installed in its own venv (scripts/build-compiled)
        trees["edged-compiled"] = (None, str(Path(args.compiled).absolute() / "bin" / "python"))
    edged_uvloop = True
    for name, (source, python) in trees.items():
        log(f"starting {name}")
        d = start_edged(tmp, backend_port, stack, source, name.replace("@", "-"), python)
        assert d.proc is not None
        pin(d.proc.pid, proxy_cpus)
        if not runs_uvloop(d.proc.pid):
            edged_uvloop = False
            notes.append(f"{name} is NOT running on uvloop (pip install uvloop): the target assumes uvloop")
        paths.append(Route(name, d.port, f"/svc/{SERVICE}/x", d.proc.pid, lambda d=d: d.ready() and None))

    if not args.skip_floor:
        floor, floor_port = start_floor(tmp, backend_port)
        stack.callback(floor.stop)
        pin(floor.pid, proxy_cpus)
        paths.append(Route("floor", floor_port, "/x", floor.pid, floor.check))

    if use_haproxy:
        hap, hap_port = start_haproxy(tmp, backend_port)
        stack.callback(hap.stop)
        pin(hap.pid, proxy_cpus)
        paths.append(Route("haproxy", hap_port, "/x", hap.pid, hap.check))

    log(f"idle: {IDLE_CALLS} calls each, {IDLE_WAIT:g} s of quiet, then {IDLE_WINDOW:g} s counted")
    idle = idle_footprint(paths[1:])
    figures = {p.name: latency(p, args) for p in paths}
    for name, tp in throughput(paths, args, use_wrk, cpus).items():
        figures[name]["throughput"] = tp
    for p in paths:
        figures[p.name]["rss_after_load_mib"] = rss_mib(p.pid)
    for name, fig in idle.items():
        figures[name]["idle_rss_mib"] = fig["rss_mib"]
        figures[name]["idle_cpu_ms_per_s"] = fig["cpu_ms_per_s"]
        figures[name]["idle_ctx_switches_per_s"] = fig["ctx_switches_per_s"]
    full = {} if args.skip_footprint else footprint(tmp, backend_port, trees, notes)
    return {
        "backend": backend_name,
        "throughput_client": f"wrk -t1 -c{CONNECTIONS}"
        if use_wrk
        else f"python closed loop, {CONNECTIONS} connections",
        "latency_client": "scripts/loadgen.py LoadGen (open loop) + one blocking keep-alive socket (sequential)",
        "pinning": {"proxy_cpu": cpus[0], "backend_and_client_cpu": cpus[1]} if cpus else None,
        "edged_uvloop": edged_uvloop,
        "duration_s": args.duration,
        "rate": args.rate,
        "paths": figures,
        "full_daemon": full,
        "derived": derive(figures),
        "notes": notes,
    }


def derive(f: dict) -> dict:
    """Ratios and added latencies (through a proxy minus direct). An open-loop run with failed calls, on
    either side, has no added latency (None): its percentiles are of what was left, not of the load."""
    out: dict = {}
    direct = f["direct"]
    for name in f:
        if name == "direct":
            continue
        p = f[name]
        whole = not p["open_loop"]["failed"] and not direct["open_loop"]["failed"]
        out[name] = {
            "added_p50_us": round(p["open_loop"]["p50_us"] - direct["open_loop"]["p50_us"], 1) if whole else None,
            "added_p99_us": round(p["open_loop"]["p99_us"] - direct["open_loop"]["p99_us"], 1) if whole else None,
            "added_seq_p50_us": round(p["seq_p50_us"] - direct["seq_p50_us"], 1),
        }
    if "haproxy" in f:
        hp = f["haproxy"]["throughput"]["calls_per_s"]
        for name in f:
            if name.startswith("edged") or name == "floor":
                ratio = round(f[name]["throughput"]["calls_per_s"] / hp, 3) if hp else None
                out[f"{name}_over_haproxy" if name != "edged" else "edged_over_haproxy"] = ratio
    if "floor" in f:
        # What edged's own work costs per call: its CPU per call above the bare stack's, under load and at the rate.
        fl = f["floor"]
        for name in f:
            if name.startswith("edged"):
                e = f[name]
                out[f"{name}_above_floor_us"] = {
                    "under_load": round(e["throughput"]["cpu_us_per_call"] - fl["throughput"]["cpu_us_per_call"], 1),
                    "at_rate": round(e["open_loop"]["cpu_us_per_call"] - fl["open_loop"]["cpu_us_per_call"], 1),
                }
    return out


def targets(r: dict) -> list[dict]:
    """The issue's targets, each with the figure it is judged on."""
    e, dv = r["paths"]["edged"], r["derived"]

    def row(name: str, value, ok: bool | None, goal: str) -> dict:
        return {
            "target": name,
            "goal": goal,
            "value": value,
            "result": "n/a" if ok is None else "PASS" if ok else "MISS",
        }

    cps = e["throughput"]["calls_per_s"]
    ratio = dv.get("edged_over_haproxy")
    added, added_seq = dv["edged"]["added_p50_us"], dv["edged"]["added_seq_p50_us"]
    cpu_at_rate = e["open_loop"]["cpu_us_per_call"]
    full = r["full_daemon"].get("edged", {}).get("rss_mib")
    uv = "" if r["edged_uvloop"] else " (no uvloop)"
    return [
        row(f"calls/s on one core{uv}", cps, cps >= TARGET_CALLS_PER_S, f">= {TARGET_CALLS_PER_S:,}"),
        row(
            "calls/s vs HAProxy",
            ratio,
            None if ratio is None else ratio >= TARGET_VS_HAPROXY,
            f">= {TARGET_VS_HAPROXY}x",
        ),
        row(
            f"CPU µs per call at {r['rate']:g}/s",
            cpu_at_rate,
            cpu_at_rate <= TARGET_CPU_AT_RATE_US,
            f"<= {TARGET_CPU_AT_RATE_US:g}",
        ),
        row(
            "added p50 at fixed rate (µs)",
            added,
            None if added is None else added <= TARGET_ADDED_P50_US,
            f"<= {TARGET_ADDED_P50_US:g}",
        ),
        row("added p50 one at a time (µs)", added_seq, added_seq <= TARGET_ADDED_P50_US, f"<= {TARGET_ADDED_P50_US:g}"),
        row(
            "idle RSS, local tier (MiB)",
            e["idle_rss_mib"],
            e["idle_rss_mib"] <= TARGET_IDLE_RSS_MIB,
            f"<= {TARGET_IDLE_RSS_MIB:g}",
        ),
        row(
            "idle RSS, everything on (MiB)",
            full,
            None if full is None else full <= TARGET_IDLE_RSS_MIB,
            f"<= {TARGET_IDLE_RSS_MIB:g}",
        ),
    ]


def table(r: dict) -> str:
    """The figures side by side, then the targets."""
    names = list(r["paths"])
    f = r["paths"]

    def get(name: str, key: str):
        cur = f[name]
        for part in key.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return "-"
            cur = cur[part]
        if isinstance(cur, list):
            return "/".join(f"{x / 1000:.1f}k" for x in cur)
        return "-" if cur is None else f"{cur:,}" if isinstance(cur, int) else cur

    rows = [
        ("calls/s (one core, best round)", "throughput.calls_per_s"),
        ("  each round", "throughput.rounds_calls_per_s"),
        ("errors in throughput run", "throughput.errors"),
        ("CPU µs per call *", "throughput.cpu_us_per_call"),
        ("  of which system", "throughput.cpu_sys_us"),
        ("CPU % of the measured process", "throughput.own_cpu_pct"),
        ("busy % of the proxy CPU", "throughput.busy_pct_proxy_cpu"),
        ("busy % of the client CPU", "throughput.busy_pct_client_cpu"),
        (f"p50 µs @ {r['rate']:g}/s open loop", "open_loop.p50_us"),
        (f"p99 µs @ {r['rate']:g}/s open loop", "open_loop.p99_us"),
        ("failed @ open loop", "open_loop.failed"),
        (f"CPU µs per call @ {r['rate']:g}/s *", "open_loop.cpu_us_per_call"),
        ("p50 µs one at a time", "seq_p50_us"),
        ("p99 µs one at a time", "seq_p99_us"),
        ("idle RSS MiB", "idle_rss_mib"),
        ("idle CPU ms/s", "idle_cpu_ms_per_s"),
        ("idle context switches/s", "idle_ctx_switches_per_s"),
        ("RSS after load MiB", "rss_after_load_mib"),
    ]
    width = 30
    cells = [(label, [str(get(n, key)) for n in names]) for label, key in rows]
    col = max(12, *(len(n) + 2 for n in names), *(len(c) + 2 for _, row in cells for c in row))
    lines = [f"{'':{width}}" + "".join(f"{n:>{col}}" for n in names)]
    for label, row in cells:
        lines.append(f"{label:{width}}" + "".join(f"{c:>{col}}" for c in row))
    for name in names:
        if name in r["derived"]:
            dv = r["derived"][name]
            at_rate = (
                f"p50 {dv['added_p50_us']} µs, p99 {dv['added_p99_us']} µs"
                if dv["added_p50_us"] is not None
                else "n/a (calls failed in an open-loop run)"
            )
            lines.append(
                f"added by {name}: {at_rate} at {r['rate']:g}/s; p50 {dv['added_seq_p50_us']} µs one at a time"
            )
    for name in names:
        key = "edged_over_haproxy" if name == "edged" else f"{name}_over_haproxy"
        if r["derived"].get(key) is not None:
            lines.append(f"{name} / haproxy calls/s: {r['derived'][key]}")
    for name in names:
        above = r["derived"].get(f"{name}_above_floor_us")
        if above is not None:
            lines.append(
                f"{name}'s own work (CPU per call above floor): {above['under_load']} µs under load, "
                f"{above['at_rate']} µs at {r['rate']:g}/s"
            )
    if "floor" in names:
        lines.append("floor: scripts/floor_relay.py, the same stack (uvloop + httptools) relaying with no mesh logic")
    lines.append("* of the proxy process; in the direct column, of the backend (on the client CPU, so there the")
    lines.append("  proxy CPU should be idle: what it shows busy is other work on this machine)")
    full = r["full_daemon"]
    if full:
        lines.append("")
        lines.append(f"idle, everything on (mDNS + MQTT + fleet key + {FULL_SERVICES} services with health checks):")
        lines.append(f"{'':{width}}" + "".join(f"{n:>{col}}" for n in full))
        for label, key in (
            ("RSS MiB", "rss_mib"),
            ("CPU ms/s", "cpu_ms_per_s"),
            ("context switches/s", "ctx_switches_per_s"),
            ("services / endpoints up", None),
        ):
            cells = [f"{f['services']}/{f['endpoints_up']}" if key is None else f[key] for f in full.values()]
            lines.append(f"{label:{width}}" + "".join(f"{c!s:>{col}}" for c in cells))
    lines.append("")
    lines.append(f"{'target':34}{'goal':>12}{'value':>12}  result")
    for t in r["targets"]:
        lines.append(f"{t['target']:34}{t['goal']:>12}{t['value']!s:>12}  {t['result']}")
    return "\n".join(lines)


SLOW_CPU_RATES = (50.0, 500.0)


def slow_cpu_bench(args, tmp: Path, stack: ExitStack) -> dict:
    """The daemon on a slow CPU (scripts/slowcpu.py: a cgroup caps it at 1/factor of one core), open loop at
    50 and 500 calls/s: CPU per call, latency and failed calls at each rate; the same at full speed beside it."""
    notes: list[str] = []
    backend, backend_port, backend_name = start_backend(tmp, notes)
    stack.callback(backend.stop)
    rows = {}
    for label, factor in (("native", None), (f"throttled 1/{args.slow_cpu:g} core", args.slow_cpu)):
        if factor is None:
            os.environ.pop("EDGED_SLOW_CPU", None)
        else:
            os.environ["EDGED_SLOW_CPU"] = str(factor)  # read by harness.Edged
        log(f"edged {label}")
        d = start_edged(tmp / label.replace(" ", "-").replace("/", ""), backend_port, stack)
        assert d.proc is not None
        path = f"/svc/{SERVICE}/x"
        for _ in range(IDLE_CALLS):  # warm: connections made, code paths run once
            http_get_once(d.port, path)
        pid = d.proc.pid
        rows[label] = {f"{rate:g}/s": open_loop_us(d.port, path, rate, args.duration, pid) for rate in SLOW_CPU_RATES}
        stop_edged(d)
    os.environ.pop("EDGED_SLOW_CPU", None)
    return {
        "backend": backend_name,
        "slow_cpu_factor": args.slow_cpu,
        "duration_s": args.duration,
        "runs": rows,
        "notes": notes,
    }


def slow_cpu_table(r: dict) -> str:
    lines = [f"{'edged':24}{'rate':>8}{'CPU µs/call':>13}{'p50 µs':>10}{'p99 µs':>10}{'failed':>8}"]
    for label, by_rate in r["runs"].items():
        for rate, f in by_rate.items():
            lines.append(
                f"{label:24}{rate:>8}{f['cpu_us_per_call']:>13}{f['p50_us']:>10}{f['p99_us']:>10}{f['failed']:>8}"
            )
    return "\n".join(lines)


def main() -> int:
    global QUIET
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of each throughput and open-loop run")
    ap.add_argument("--rounds", type=int, default=2, help="throughput runs per path, interleaved; the best counts")
    ap.add_argument("--rate", type=float, default=500.0, help="calls/s of the open-loop latency run")
    ap.add_argument("--baseline", metavar="REF", help="also run edged from this git ref (e.g. main), same run")
    ap.add_argument(
        "--compiled",
        metavar="VENV",
        help="also run the compiled build installed in this venv (scripts/build-compiled makes .venv-compiled)",
    )
    ap.add_argument("--skip-haproxy", action="store_true")
    ap.add_argument("--skip-floor", action="store_true", help="no floor column (scripts/floor_relay.py)")
    ap.add_argument("--skip-footprint", action="store_true", help="no full daemon (mDNS + MQTT + 20 services)")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON figures")
    ap.add_argument(
        "--slow-cpu",
        type=float,
        nargs="?",
        const=DEFAULT_FACTOR,
        metavar="FACTOR",
        help=f"only the slow-CPU run: the daemon capped at 1/FACTOR of a core (default {DEFAULT_FACTOR:g}; needs root)",
    )
    args = ap.parse_args()
    QUIET = args.json_only
    # SIGTERM ends the run like Ctrl-C does: through the finally blocks that stop every child by PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    if args.slow_cpu is not None:
        with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp, ExitStack() as stack:
            result = slow_cpu_bench(args, Path(tmp), stack)
        if not args.json_only:
            print(slow_cpu_table(result))
        print(json.dumps(result, indent=None if args.json_only else 2, ensure_ascii=False))
        return 0
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp, ExitStack() as stack:
        result = bench(args, Path(tmp), stack)
    result["targets"] = targets(result)
    result["wall_s"] = round(time.monotonic() - started, 1)
    load = ", ".join(f"{x:.2f}" for x in (*load_before, *os.getloadavg()))
    result["machine"] = f"{os.cpu_count()} CPUs; load average (1, 5, 15 min) before, after: {load}"
    if not args.json_only:
        print(f"backend: {result['backend']}; throughput client: {result['throughput_client']}")
        pinning = result["pinning"]
        if pinning:
            print(
                f"proxy on CPU {pinning['proxy_cpu']}; backend and clients on CPU {pinning['backend_and_client_cpu']}"
            )
        print(f"edged on uvloop: {'yes' if result['edged_uvloop'] else 'NO'}")
        print(f"machine: {result['machine']}")
        for note in result["notes"]:
            print(f"note: {note}")
        print()
        print(table(result))
        print()
    print(json.dumps(result, indent=None if args.json_only else 2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # every child is already stopped by then
        print("interrupted", file=sys.stderr)
        sys.exit(130)
