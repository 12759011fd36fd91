"""Active checks against real servers on 127.0.0.1 and real shell commands."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from harness import free_port
from helpers import StatusServer, process_gone

from edged.health.checks import CheckResult, run_check
from edged.http.client import UpstreamPool
from edged.model import Endpoint, HealthCheckSpec, Target, parse_target


def endpoint(url: str, service: str = "thermo") -> Endpoint:
    target = parse_target(url) if url.startswith(("http", "unix")) else None
    return Endpoint(
        id=f"{service}@{url}",
        service=service,
        tenant="default",
        tier="local",
        url=url,
        priority=1,
        weight=100,
        source="manifest",
        target=target,
    )


async def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


HTTP = HealthCheckSpec(kind="http", http_path="/healthz", timeout=1.0)


def test_http_ok_sends_a_proper_request() -> None:
    async def main() -> tuple[CheckResult, bytes]:
        server = StatusServer(200)
        port = await server.start_tcp()
        try:
            result = await run_check(HTTP, endpoint(f"http://127.0.0.1:{port}/api"))
        finally:
            await server.stop()
        return result, server.requests[0]

    result, head = asyncio.run(main())
    assert result.ok and result.detail == "HTTP 200" and result.latency > 0
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET /api/healthz HTTP/1.1"
    assert "Connection: close" in lines and "User-Agent: edged-health" in lines
    assert any(line.startswith("Host: 127.0.0.1:") for line in lines)


def test_http_status_decides() -> None:
    async def main() -> list[CheckResult]:
        results = []
        for status in (503, 302, 404):
            server = StatusServer(status)
            port = await server.start_tcp()
            try:
                results.append(await run_check(HTTP, endpoint(f"http://127.0.0.1:{port}")))
            finally:
                await server.stop()
        return results

    r503, r302, r404 = asyncio.run(main())
    assert (r503.ok, r503.detail) == (False, "HTTP 503")
    assert (r302.ok, r302.detail) == (True, "HTTP 302")
    assert (r404.ok, r404.detail) == (False, "HTTP 404")


def test_http_over_unix_socket() -> None:
    async def main(path: str) -> CheckResult:
        server = StatusServer(200)
        await server.start_unix(path)
        try:
            return await run_check(HTTP, endpoint(f"unix:{path}"))
        finally:
            await server.stop()

    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(main(os.path.join(tmp, "s.sock")))
    assert result.ok and result.detail == "HTTP 200"


def test_http_server_that_never_answers_times_out() -> None:
    with socket.socket() as listener:  # accepts into the backlog, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        spec = HealthCheckSpec(kind="http", http_path="/healthz", timeout=0.2)
        result = asyncio.run(run_check(spec, endpoint(f"http://127.0.0.1:{port}")))
    assert (result.ok, result.detail) == (False, "timeout 200ms")


def test_closed_port_and_missing_socket_are_refused() -> None:
    port = free_port()
    http = asyncio.run(run_check(HTTP, endpoint(f"http://127.0.0.1:{port}")))
    tcp = asyncio.run(run_check(HealthCheckSpec(kind="tcp"), endpoint(f"http://127.0.0.1:{port}")))
    unix = asyncio.run(run_check(HTTP, endpoint("unix:/nonexistent/edged-test.sock")))
    assert (http.ok, http.detail) == (False, "connect refused")
    assert (tcp.ok, tcp.detail) == (False, "connect refused")
    assert not unix.ok and unix.detail.startswith("connect failed")


def test_closed_without_answer_and_garbage() -> None:
    async def serve(answer: bytes) -> CheckResult:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await run_check(HTTP, endpoint(f"http://127.0.0.1:{port}"))
        finally:
            server.close()
            await server.wait_closed()

    empty = asyncio.run(serve(b""))
    garbage = asyncio.run(serve(b"SSH-2.0-OpenSSH\r\n"))
    assert (empty.ok, empty.detail) == (False, "closed without answer")
    assert not garbage.ok and garbage.detail.startswith("bad response")


def test_pooled_http_checks_reuse_one_connection() -> None:
    async def main() -> tuple[list[CheckResult], StatusServer, dict]:
        server = StatusServer(200, keep_alive=True)
        port = await server.start_tcp()
        pool = UpstreamPool()
        ep = endpoint(f"http://127.0.0.1:{port}/api")
        try:
            results = [await run_check(HTTP, ep, pool=pool, headers=[("X-Fleet", "f1")]) for _ in range(3)]
            server.status = 503
            results.append(await run_check(HTTP, ep, pool=pool))
            stats = pool.stats()
        finally:
            await pool.close()
            await server.stop()
        return results, server, stats

    results, server, stats = asyncio.run(main())
    assert [(r.ok, r.detail) for r in results] == [(True, "HTTP 200")] * 3 + [(False, "HTTP 503")]
    assert server.connections == 1 and len(server.requests) == 4
    assert next(iter(stats.values()))["opened"] == 1
    lines = server.requests[0].decode().split("\r\n")
    assert lines[0] == "GET /api/healthz HTTP/1.1"
    assert "user-agent: edged-health" in lines and "x-fleet: f1" in lines
    assert any(line.startswith("host: 127.0.0.1:") for line in lines)


def test_pooled_http_checks_over_a_unix_socket() -> None:
    async def main(path: str) -> tuple[list[CheckResult], int]:
        server = StatusServer(200, keep_alive=True)
        await server.start_unix(path)
        pool = UpstreamPool()
        try:
            results = [await run_check(HTTP, endpoint(f"unix:{path}"), pool=pool) for _ in range(2)]
        finally:
            await pool.close()
            await server.stop()
        return results, server.connections

    with tempfile.TemporaryDirectory() as tmp:
        results, connections = asyncio.run(main(os.path.join(tmp, "s.sock")))
    assert [(r.ok, r.detail) for r in results] == [(True, "HTTP 200")] * 2 and connections == 1


def test_pooled_http_check_failures_read_as_before() -> None:
    async def main() -> list[CheckResult]:
        pool = UpstreamPool()
        results = [await run_check(HTTP, endpoint(f"http://127.0.0.1:{free_port()}"), pool=pool)]
        with socket.socket() as listener:  # accepts into the backlog, never answers
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            spec = HealthCheckSpec(kind="http", http_path="/healthz", timeout=0.2)
            results.append(await run_check(spec, endpoint(f"http://127.0.0.1:{listener.getsockname()[1]}"), pool=pool))

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        try:
            ep = endpoint(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
            results.append(await run_check(HTTP, ep, pool=pool))
        finally:
            server.close()
            await server.wait_closed()
            await pool.close()
        return results

    refused, timeout, closed = asyncio.run(main())
    assert (refused.ok, refused.detail) == (False, "connect refused")
    assert (timeout.ok, timeout.detail) == (False, "timeout 200ms")
    assert (closed.ok, closed.detail) == (False, "closed without answer")


def test_tcp_connects() -> None:
    async def main() -> CheckResult:
        server = StatusServer()
        port = await server.start_tcp()
        try:
            return await run_check(HealthCheckSpec(kind="tcp"), endpoint(f"http://127.0.0.1:{port}"))
        finally:
            await server.stop()

    result = asyncio.run(main())
    assert result.ok and result.detail == "connected"


def test_cloud_endpoint_and_bad_port_are_not_errors() -> None:
    cloud = asyncio.run(run_check(HTTP, endpoint("mqtt:thermo")))
    assert (cloud.ok, cloud.detail) == (True, "not checked")
    bad = Endpoint(
        id="x",
        service="s",
        tenant="default",
        tier="local",
        url="http://127.0.0.1:70000",
        priority=1,
        weight=1,
        source="manifest",
        target=Target(kind="tcp", host="127.0.0.1", port=70000),
    )
    result = asyncio.run(run_check(HealthCheckSpec(kind="tcp"), bad))
    assert not result.ok and result.detail.startswith("bad address")


def command(cmd: str, timeout: float = 2.0) -> HealthCheckSpec:
    return HealthCheckSpec(kind="command", command=cmd, timeout=timeout)


def test_command_exit_status_and_stderr() -> None:
    ep = endpoint("http://127.0.0.1:8080")
    ok = asyncio.run(run_check(command("true"), ep))
    failed = asyncio.run(run_check(command("false"), ep))
    loud = asyncio.run(run_check(command("echo boom >&2; head -c 5000 /dev/zero >&2; exit 3"), ep))
    assert (ok.ok, ok.detail) == (True, "exit 0")
    assert (failed.ok, failed.detail) == (False, "exit 1")
    assert not loud.ok and loud.detail.startswith("exit 3: boom")
    assert len(loud.detail) <= len("exit 3: ") + 200


def test_command_sees_the_endpoint_in_its_environment() -> None:
    ep = endpoint("http://127.0.0.1:8080")
    cmd = (
        'test "$EDGED_SERVICE" = thermo && test "$EDGED_ENDPOINT_HOST" = 127.0.0.1 '
        '&& test "$EDGED_ENDPOINT_PORT" = 8080 && test "$EDGED_ENDPOINT_URL" = http://127.0.0.1:8080 '
        '&& test -n "$PATH"'
    )
    result = asyncio.run(run_check(command(cmd), ep))
    assert result.ok, result.detail


def test_command_timeout_kills_the_shell_and_its_children() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pids = Path(tmp, "pids")
        cmd = f"sleep 30 & echo $$ $! > {pids}; wait"
        result = asyncio.run(run_check(command(cmd, timeout=0.5), endpoint("http://127.0.0.1:1")))
        shell, child = (int(p) for p in pids.read_text().split())
    assert (result.ok, result.detail) == (False, "timeout 500ms")
    assert process_gone(shell)  # killed and awaited by the check: no zombie of ours

    async def reaped() -> None:  # the grandchild was killed too (else it lives 30 s)
        await wait_until(lambda: process_gone(child))

    asyncio.run(reaped())


def test_cancelled_command_check_leaves_no_process() -> None:
    async def main(pidfile: Path) -> None:
        task = asyncio.ensure_future(
            run_check(command(f"echo $$ > {pidfile}; exec sleep 30", timeout=10), endpoint("http://127.0.0.1:1"))
        )
        await wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp, "pid")))
        pid = int(Path(tmp, "pid").read_text())
    assert process_gone(pid)


def make_cert(tmp: str) -> tuple[str, str]:
    cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
    args = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=127.0.0.1"
    args += " -addext subjectAltName=IP:127.0.0.1"
    subprocess.run(["openssl", *args.split(), "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool to make a certificate")
def test_https_target_uses_the_given_tls_context() -> None:
    async def main(cert: str, key: str) -> tuple[CheckResult, CheckResult]:
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(cert, key)
        client_tls = ssl.create_default_context(cafile=cert)
        server = StatusServer(200)
        server.server = await asyncio.start_server(server._handle, "127.0.0.1", 0, ssl=server_tls)
        port = server.server.sockets[0].getsockname()[1]
        try:
            trusted = await run_check(HTTP, endpoint(f"https://127.0.0.1:{port}"), ssl_context=client_tls)
            untrusted = await run_check(HTTP, endpoint(f"https://127.0.0.1:{port}"))
        finally:
            await server.stop()
        return trusted, untrusted

    with tempfile.TemporaryDirectory() as tmp:
        trusted, untrusted = asyncio.run(main(*make_cert(tmp)))
    assert (trusted.ok, trusted.detail) == (True, "HTTP 200")
    assert not untrusted.ok and untrusted.detail.startswith("tls error"), untrusted.detail
