#!/usr/bin/env python3
"""Issue 12's attacks against a running daemon, with what the attacker got, and the registration burst.

Runs the real daemon (scripts/harness.py) and real backends; prints one JSON document. Run it from an older
checkout (copy this file into its scripts/) with `--before` to get the figures of code that knows no
`[access]` / `[limits]` (the attacker then needs no identity at all).

usage: scripts/security_figures.py [--before] [--only NAME,...]   (mqtt needs mosquitto installed)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import REPO, Backend, Edged, free_port, manifest

sys.path.insert(0, str(REPO))


from edged.client import ApiClient

ACCESS = """
[access.apps.app-a]
tokens = ["t-a"]
[access.apps.app-b]
tokens = ["t-b"]
[limits]
body_timeout = "3s"
registrations_per_owner = 4096
"""


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


class Setup:
    def __init__(self, root: Path, before: bool) -> None:
        self.root, self.before = root, before
        root.mkdir(parents=True, exist_ok=True)
        self.backends: list[Backend] = []
        self.daemons: list[Edged] = []

    def backend(self, name: str) -> Backend:
        b = Backend(name, free_port(), self.root).start()
        self.backends.append(b)
        return b

    def daemon(self, manifests: dict[str, str], extra: str = "") -> Edged:
        d = Edged(self.root / f"d{len(self.daemons)}", manifests, extra + ("" if self.before else ACCESS))
        self.daemons.append(d)
        return d.start()

    def writer(self, d: Edged, token: str) -> list[tuple[str, str]]:
        """Headers of a writer: none at all before (anyone could write), an app token after."""
        return [("Content-Type", "application/json")] + ([] if self.before else [("Authorization", f"Bearer {token}")])

    def close(self) -> None:
        for d in self.daemons:
            d.kill()
        for b in self.backends:
            b.kill()


def attacks(s: Setup) -> dict:
    out: dict = {}
    b1, b2 = s.backend("b1"), s.backend("b2")
    text = 'service_name = "thermo"\ninterface_definition = { version = "1", methods = ["GET /static/*"] }\n'
    text += f'[[endpoints]]\ntype = "local"\nurl = "{b1.url}/api"\npriority = 1\n'
    d = s.daemon({"thermo.toml": text})
    marker = s.root / "pwned"
    evil = {
        "manifest": {
            "service_name": "evil",
            "endpoints": [{"type": "local", "url": b2.url}],
            "health_check": {"command": f"touch {marker}", "interval": "1s", "timeout": "200ms"},
        }
    }
    status = d.api.request("POST", "/v1/register", json.dumps(evil).encode(), [("Content-Type", "application/json")])[0]
    time.sleep(2.5)
    out["anonymous command check"] = {"status": status, "command ran": marker.exists()}
    status = d.api.request("POST", "/v1/register", json.dumps(evil).encode(), s.writer(d, "t-a"))[0]
    time.sleep(2.5)
    out["command check by an app"] = {"status": status, "command ran": marker.exists()}
    # Hijack: priority 0 into the declared service.
    reg = {"service": "thermo", "id": "a-1", "endpoint": {"type": "local", "url": f"{b2.url}/api", "priority": 0}}
    status = d.api.request("POST", "/v1/register", json.dumps(reg).encode(), s.writer(d, "t-b"))[0]
    time.sleep(0.3)
    answered = [json.loads(d.call("thermo", "/static/x")[2]).get("name") for _ in range(10)]
    out["priority 0 registration"] = {
        "status": status,
        "calls answered by the registered endpoint": answered.count("b2"),
    }
    # app-a registers; app-b then takes its id and deletes it.
    mine = {"service": "thermo", "id": "mine", "endpoint": {"type": "local", "url": f"{b1.url}/api", "priority": 5}}
    d.api.request("POST", "/v1/register", json.dumps(mine).encode(), s.writer(d, "t-a"))
    theirs = dict(mine, endpoint={"type": "local", "url": f"{b2.url}/api", "priority": 5})
    replace = d.api.request("POST", "/v1/register", json.dumps(theirs).encode(), s.writer(d, "t-b"))[0]
    delete = d.api.request("DELETE", "/v1/register/mine", b"", s.writer(d, "t-b"))[0]
    out["other app replaces / deletes"] = {"replace status": replace, "delete status": delete}
    status = d.api.request("PUT", "/v1/policies/thermo", b'{"retries": 0}', [("Content-Type", "application/json")])[0]
    out["anonymous PUT /v1/policies"] = {"status": status}
    status = d.api.request("GET", "/v1/services", headers=[("Host", "evil.example")])[0]
    out["DNS rebinding GET /v1/services"] = {"status": status}
    body = json.dumps({"service": "thermo", "endpoint": {"type": "local", "url": b2.url}}).encode()
    headers = [("Content-Type", "text/plain"), ("Origin", "http://evil.example")]
    out["cross-site text/plain POST /v1/register"] = {"status": d.api.request("POST", "/v1/register", body, headers)[0]}
    status, _, data = d.call("thermo", "/static/../../admin")
    seen = json.loads(data).get("path") if status == 200 else None
    out["traversal /svc/thermo/static/../../admin"] = {"status": status, "backend saw": seen}
    return out


def pipelining(s: Setup) -> dict:
    """One client pipelines `GET /metrics` (a few KB each) for 6 s, paced so that each read stays small, and
    never reads an answer (small receive window)."""
    d = s.daemon({})
    rss0 = peak = rss_mib(d.proc.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window stays small
    sock.connect(("127.0.0.1", d.port))
    sock.setblocking(False)
    request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n" * 20
    t0 = last = time.monotonic()
    reset, sent = None, 0
    while time.monotonic() < t0 + 6:
        try:
            sent += sock.send(request) // 40
        except BlockingIOError:
            pass
        except OSError as exc:
            reset = f"{exc.strerror} after {time.monotonic() - t0:.1f} s"
            break
        time.sleep(0.004)
        if time.monotonic() - last > 0.2:
            last = time.monotonic()
            peak = max(peak, rss_mib(d.proc.pid))
    rss1 = rss_mib(d.proc.pid)
    ok = ApiClient(f"http://127.0.0.1:{d.port}", timeout=5).request("GET", "/healthz")[0]
    sock.close()
    return {
        "requests sent": sent,
        "rss before MiB": round(rss0, 1),
        "rss peak MiB": round(max(peak, rss1), 1),
        "connection reset": reset,
        "another client": ok,
    }


def slow_body(s: Setup) -> dict:
    d = s.daemon({})
    sock = socket.create_connection(("127.0.0.1", d.port))
    sock.sendall(b"POST /v1/echo/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n")
    sock.settimeout(0.5)
    t0 = time.monotonic()
    held = None
    while time.monotonic() - t0 < 40:
        try:
            sock.send(b"a")
            data = sock.recv(1000)
            if data or data == b"":
                held = time.monotonic() - t0
                break
        except TimeoutError:
            continue
        except OSError:
            held = time.monotonic() - t0
            break
    sock.close()
    return {"connection held s (cap 40)": None if held is None else round(held, 1)}


def connections(s: Setup) -> dict:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    d = s.daemon({})
    socks, refused = [], 0
    for _ in range(2000):
        try:
            socks.append(socket.create_connection(("127.0.0.1", d.port), timeout=2))
        except OSError:
            refused += 1
    time.sleep(3.0)  # refused connections linger 2 s to deliver their 503, then close
    answered_503 = 0
    for sk in socks:
        sk.setblocking(False)
        try:
            if sk.recv(100).startswith(b"HTTP/1.1 503"):
                answered_503 += 1
        except OSError:
            pass
    fds = len(list(Path(f"/proc/{d.proc.pid}/fd").iterdir()))
    ok = ApiClient(f"unix:{d.socket}", timeout=5).request("GET", "/healthz")[0]
    for sk in socks:
        sk.close()
    return {"opened": len(socks), "answered 503": answered_503, "daemon fds": fds, "socket client": ok}


def patterns() -> dict:
    """The old compiled regex of a 12-wildcard pattern vs the segment matcher (which refuses it)."""
    pattern = "/" + "*a" * 12
    rx = re.compile("".join(".*" if p == "*" else re.escape(p) for p in re.split(r"(\*)", pattern)) + "/?")
    out = {}
    for n in (24, 28):
        path = "/" + "a" * n + "b"
        t0 = time.perf_counter()
        rx.fullmatch(path)
        out[f"backtracking regex, {n} chars s"] = round(time.perf_counter() - t0, 3)
    try:
        from edged.methods import PathPattern

        try:
            PathPattern.parse(pattern)
            out["segment matcher"] = "accepted"
        except ValueError as exc:
            out["segment matcher"] = f"refused: {exc}"
        twelve = PathPattern.parse("/" + "/".join(f"{{p{i}}}" for i in range(12)))
        path = "/" + "/".join("aa" for _ in range(11)) + "/" + "a" * 4
        t0 = time.perf_counter()
        for _ in range(10000):
            twelve.matches(path)
        out["12-parameter pattern, one match us"] = round((time.perf_counter() - t0) / 10000 * 1e6, 2)
    except ImportError:
        pass
    return out


def burst(s: Setup, count: int = 1000, workers: int = 16) -> dict:
    b = s.backend("b")
    d = s.daemon({"thermo.toml": manifest("thermo", [(b.port, 1)])})
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def work(w: int) -> None:
        client = ApiClient(f"unix:{d.socket}" if not s.before else f"http://127.0.0.1:{d.port}", timeout=60)
        for i in range(w, count, workers):
            reg = {
                "service": "thermo",
                "id": f"r{i}",
                "endpoint": {"type": "local", "url": f"http://127.0.0.1:{20000 + i}"},
            }
            t0 = time.perf_counter()
            status = client.request(
                "POST", "/v1/register", json.dumps(reg).encode(), [("Content-Type", "application/json")]
            )[0]
            with lock:
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1

    state = d.root / "state" / "registrations.json"
    inodes: set[tuple[int, int, int]] = set()
    done = threading.Event()

    def watch() -> None:  # each atomic write: a new file (inode, mtime, size); a lower bound
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):
                st = state.stat()
                inodes.add((st.st_ino, st.st_mtime_ns, st.st_size))
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    done.set()
    watcher.join()
    latencies.sort()
    # Sequential: one client, one registration at a time (the figure the issue quoted: ms per registration).
    client = ApiClient(f"unix:{d.socket}" if not s.before else f"http://127.0.0.1:{d.port}", timeout=60)
    seq = []
    for i in range(100):
        reg = {
            "service": "thermo",
            "id": f"q{i}",
            "endpoint": {"type": "local", "url": f"http://127.0.0.1:{30000 + i}"},
        }
        t1 = time.perf_counter()
        client.request("POST", "/v1/register", json.dumps(reg).encode(), [("Content-Type", "application/json")])
        seq.append(time.perf_counter() - t1)
    return {
        "registrations": count,
        "concurrent clients": workers,
        "statuses": statuses,
        "registrations/s": round(count / elapsed, 1),
        "state file writes seen": len(inodes),
        "p50 ms": round(statistics.median(latencies) * 1000, 1),
        "p99 ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
        "one at a time after 1000, ms each (median)": round(statistics.median(seq) * 1000, 1),
        "call still answers": d.call("thermo", "/x")[0],
    }


def mqtt(s: Setup, size: int = 64 << 20) -> dict:
    """A 64 MB retained message on a topic the daemon follows (any client of the broker may publish it)."""
    import shutil
    import subprocess

    import paho.mqtt.client as paho

    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = s.root / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n")
    broker = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        extra = f'[mqtt]\nenabled = true\nurl = "mqtt://127.0.0.1:{port}"\ntopic_prefix = "sec"\n'
        d = s.daemon({}, extra)
        time.sleep(1.0)
        rss0 = rss_mib(d.proc.pid)
        pub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        pub.publish("sec/home/nodes/evil/services/x", b"\xa0" * size, qos=1, retain=True).wait_for_publish(60)
        peak = rss0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8:
            peak = max(peak, rss_mib(d.proc.pid))
            time.sleep(0.1)
        pub.publish("sec/home/nodes/evil/services/x", b"", qos=1, retain=True).wait_for_publish(10)
        pub.loop_stop()
        return {
            "message MiB": size >> 20,
            "rss before MiB": round(rss0, 1),
            "rss peak MiB": round(peak, 1),
            "daemon alive": d.proc.poll() is None,
            "limit hits": d.api.request("GET", "/metrics")[2].decode().count('limit="mqtt_message"'),
        }
    finally:
        broker.kill()
        broker.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", action="store_true", help="the daemon knows no [access]/[limits] (older code)")
    ap.add_argument(
        "--only", default="", help="comma-separated: attacks,pipelining,slow_body,connections,patterns,burst,mqtt"
    )
    args = ap.parse_args()
    wanted = set(filter(None, args.only.split(","))) or {
        "attacks",
        "pipelining",
        "slow_body",
        "connections",
        "patterns",
        "burst",
        "mqtt",
    }
    figures: dict = {"code": "before" if args.before else "after"}
    with tempfile.TemporaryDirectory(prefix="edged-sec-") as tmp:
        for name in ("attacks", "pipelining", "slow_body", "connections", "burst", "mqtt"):
            if name not in wanted:
                continue
            s = Setup(Path(tmp) / name, args.before)
            try:
                figures[name] = globals()[name](s)
            except Exception as exc:  # a figure that could not be taken says why; the others still count
                figures[name] = {"failed": repr(exc)}
            finally:
                s.close()
        if "patterns" in wanted:
            figures["patterns"] = patterns()
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
