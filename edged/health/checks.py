"""Active health checks: one probe of one endpoint (http, tcp or command), bounded by the spec's timeout.

A check never raises for what the endpoint does: every outcome (refused, reset, timeout, bad answer, exit
status) becomes a `CheckResult`. Only cancellation propagates, after the probe's socket or process is gone.

Given the daemon's upstream pool, plain-HTTP checks go over its keep-alive connections (as Envoy's checks
reuse theirs): a check is then one write and one read, not a connect, a handshake and a close, which is
most of what an idle daemon with many checked endpoints spends (scripts/bench.py, the full daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

from edged import looplag
from edged.errors import ConnectFailed, UpstreamError, UpstreamProtocolError, UpstreamReset, UpstreamTimeout
from edged.http.client import UpstreamPool
from edged.model import Endpoint, HealthCheckSpec, Target
from edged.systemd import child_environ

_USER_AGENT = "edged-health"
_STATUS_LINE_LIMIT = 1024  # a status line longer than this is not an HTTP server we can judge
_STDERR_KEEP = 200


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Outcome of one probe: ok, a short human detail ("HTTP 503", "timeout 500ms") and its duration in seconds."""

    ok: bool
    detail: str
    latency: float


class _Failed(Exception):
    """A probe failed for a reason already worded for humans (internal: becomes a CheckResult)."""


async def run_check(
    spec: HealthCheckSpec,
    endpoint: Endpoint,
    *,
    ssl_context: ssl.SSLContext | None = None,
    headers: Sequence[tuple[str, str]] = (),
    pool: UpstreamPool | None = None,
) -> CheckResult:
    """Probe `endpoint` once as `spec` says; the whole probe (connect, answer, process exit) is bounded by spec.timeout.

    Endpoints without an HTTP target (cloud tier) are not checked and count as ok, and so are `ttl` specs,
    which are driven by heartbeats (see HealthMonitor.heartbeat). `ssl_context` is used for https targets
    (default: the system's verifying context). `headers` go with http checks (a peer's ingress wants the
    caller's fleet identity). With `pool`, http checks go over its keep-alive connections (a peer's ingress
    over mutual TLS: no handshake per check).
    """
    if spec.kind == "ttl" or endpoint.target is None:
        return CheckResult(ok=True, detail="not checked", latency=0.0)
    target = endpoint.target
    started = time.monotonic()
    if spec.kind == "http" and pool is not None:
        ok, detail = await _pooled_http(spec, target, headers, pool)
        return CheckResult(ok=ok, detail=detail, latency=time.monotonic() - started)
    try:
        if spec.kind == "http":
            probe = _http(spec, target, ssl_context, headers)
        elif spec.kind == "tcp":
            probe = _tcp(target, ssl_context)
        elif spec.kind == "command":
            probe = _command(spec, endpoint)
        else:
            return CheckResult(ok=False, detail=f"unknown check kind {spec.kind!r}", latency=0.0)
        # Only the loop's own time counts (edged.looplag): a slow box's lag must not fail a healthy endpoint;
        # still, one probe never runs more than an interval past its timeout.
        detail = await looplag.wait_for(probe, spec.timeout, limit=spec.timeout + spec.interval)
        ok = True
    except asyncio.TimeoutError:
        ok, detail = False, f"timeout {_human_duration(spec.timeout)}"
    except _Failed as exc:
        ok, detail = False, str(exc)
    return CheckResult(ok=ok, detail=detail, latency=time.monotonic() - started)


def _check_path(spec: HealthCheckSpec) -> str:
    path = spec.http_path or "/"
    return path if path.startswith("/") else "/" + path


async def _pooled_http(
    spec: HealthCheckSpec, target: Target, headers: Sequence[tuple[str, str]], pool: UpstreamPool
) -> tuple[bool, str]:
    """GET the health path over the pool; ok on 2xx/3xx. The pool's time limit counts only the loop's own
    time, as `looplag.wait_for` does for the other probes. A body that is not all here with the head is not
    waited for: its connection is dropped instead of kept (a health answer is small)."""
    sent = [(b"user-agent", _USER_AGENT.encode()), (b"accept", b"*/*")]
    sent.extend((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers)
    try:
        path = _check_path(spec)
        answer = await pool.request(target, "GET", path, sent, b"", spec.timeout, spec.timeout + spec.interval)
    except UpstreamTimeout:
        return False, f"timeout {_human_duration(spec.timeout)}"
    except ConnectFailed as exc:
        return False, "connect refused" if exc.refused else f"connect failed: {exc.detail}"
    except UpstreamReset:
        return False, "closed without answer"
    except UpstreamProtocolError as exc:
        return False, f"bad response: {exc.detail}"
    except UpstreamError as exc:
        return False, f"{exc.kind}: {exc.detail}"
    if not answer.complete:
        answer.discard()
    status = answer.status
    if not 200 <= status < 400:
        return False, f"HTTP {status}"
    return True, f"HTTP {status}"


async def _http(
    spec: HealthCheckSpec, target: Target, ssl_context: ssl.SSLContext | None, headers: Sequence[tuple[str, str]] = ()
) -> str:
    """GET the health path; ok on 2xx/3xx. Only the status line is read: the body does not matter."""
    path = _check_path(spec)
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    request = (
        f"GET {target.base_path}{path} HTTP/1.1\r\n"
        f"Host: {target.host_header}\r\n"
        f"User-Agent: {_USER_AGENT}\r\n"
        f"Accept: */*\r\n{extra}"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    reader, writer = await _connect(target, ssl_context)
    try:
        try:
            writer.write(request)
            await writer.drain()
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError) as exc:
            raise _Failed("bad response: status line too long") from exc
        except OSError as exc:
            raise _Failed(_os_detail("connection", exc)) from exc
    finally:
        await _close(writer)
    if not line:
        raise _Failed("closed without answer")
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise _Failed(f"bad response: {line[:60]!r}")
    status = int(parts[1])
    if not 200 <= status < 400:
        raise _Failed(f"HTTP {status}")
    return f"HTTP {status}"


async def _tcp(target: Target, ssl_context: ssl.SSLContext | None) -> str:
    """Connect (and finish the TLS handshake for https targets), then close."""
    _, writer = await _connect(target, ssl_context)
    await _close(writer)
    return "connected"


async def _command(spec: HealthCheckSpec, endpoint: Endpoint) -> str:
    """Run the shell command with the endpoint in its environment; exit 0 = ok.

    The command runs in its own session so that a timeout (or cancellation) kills the shell and everything
    it started, and the process is always awaited: no zombies, no orphans holding the stderr pipe.
    """
    target = endpoint.target
    env = child_environ()  # not the daemon's own NOTIFY_SOCKET / WATCHDOG_* variables
    env.update(
        EDGED_ENDPOINT_URL=endpoint.url,
        EDGED_ENDPOINT_HOST=target.host if target is not None and target.kind == "tcp" else "",
        EDGED_ENDPOINT_PORT=str(target.port) if target is not None and target.kind == "tcp" else "",
        EDGED_SERVICE=endpoint.service,
    )
    try:
        proc = await asyncio.create_subprocess_shell(
            spec.command or "",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise _Failed(_os_detail("spawn", exc)) from exc
    done = False
    try:
        stderr = await _read_head(proc.stderr)
        code = await proc.wait()
        done = True
    finally:
        if not done:  # timeout or cancellation: the shell and whatever it started (they may hold the pipe)
            _kill_group(proc.pid)
            await proc.wait()
    if code == 0:
        return "exit 0"
    why = f"killed by signal {-code}" if code < 0 else f"exit {code}"
    text = stderr.decode("utf-8", "replace").strip()
    raise _Failed(f"{why}: {text}" if text else why)


async def _read_head(stream: asyncio.StreamReader | None) -> bytes:
    """Read a stream to its end, keeping only the first bytes (a chatty command must not fill memory or block)."""
    if stream is None:
        return b""
    head = b""
    while chunk := await stream.read(4096):
        if len(head) < _STDERR_KEEP:
            head += chunk[: _STDERR_KEEP - len(head)]
    return head


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _connect(
    target: Target, ssl_context: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        if target.kind == "unix":
            return await asyncio.open_unix_connection(target.path, limit=_STATUS_LINE_LIMIT)
        tls = (ssl_context or _default_tls()) if target.tls else None
        return await asyncio.open_connection(
            target.host,
            target.port,
            ssl=tls,
            server_hostname=target.host if tls is not None else None,
            limit=_STATUS_LINE_LIMIT,
        )
    except ssl.SSLError as exc:
        raise _Failed(f"tls error: {exc.reason or exc}") from exc
    except OSError as exc:
        raise _Failed(_os_detail("connect", exc)) from exc
    except (ValueError, OverflowError) as exc:  # a host or port the socket layer refuses
        raise _Failed(f"bad address: {exc}") from exc


async def _close(writer: asyncio.StreamWriter) -> None:
    if writer.get_extra_info("sslcontext") is not None:
        writer.transport.abort()  # a TLS close waits for the peer's close_notify: never let that fail a check
        return
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


@functools.lru_cache(maxsize=1)
def _default_tls() -> ssl.SSLContext:
    return ssl.create_default_context()  # built once: loading the CA store costs milliseconds


def _os_detail(stage: str, exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"{stage} refused"
    if isinstance(exc, ConnectionResetError):
        return f"{stage} reset"
    if isinstance(exc, FileNotFoundError):
        return f"{stage} failed: no such socket or file"
    return f"{stage} failed: {exc.strerror or exc}"


def _human_duration(seconds: float) -> str:
    if seconds < 1.0:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"
