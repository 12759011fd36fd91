"""Open-loop HTTP/1.1 load at a fixed rate over keep-alive connections; records every call's outcome.

Used by the failover scenario (`scripts/failover.py`), the benchmark and the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Result:
    started: float  # seconds since the run began
    latency: float  # seconds
    status: int  # 0 when the call failed without an HTTP answer
    endpoint: str  # x-edged-endpoint of the answer, "" if none
    tries: int
    error: str = ""
    path: str = ""  # with `paths`: the path of this call
    detail: str = ""  # the start of the body of a 5xx answer (what the daemon said went wrong)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
    return status, headers, body


class LoadGen:
    """Sends `GET path` to host:port at `rate` calls/s for `duration` s. Connections are reused."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        *,
        host_header: str = "localhost",
        timeout: float = 10.0,
        unix: str | None = None,
        paths: Callable[[int], str] | None = None,
        max_connections: int | None = None,
    ):
        self.host, self.port, self.path = host, port, path
        self.unix = unix  # a Unix socket path instead of host:port
        self.timeout = timeout
        self._host_header = host_header
        self._request = self._make(path)
        self._paths = paths  # the path of call i, when calls go to many paths
        self._count = 0
        self._idle: list[_Conn] = []
        self.results: list[Result] = []
        # A bounded caller (like a client's connection pool): a call waits for a free connection, and that wait
        # counts in its latency. None: a new connection whenever none is idle.
        self._slots = asyncio.Semaphore(max_connections) if max_connections else None

    def _make(self, path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {self._host_header}\r\nUser-Agent: loadgen\r\n\r\n".encode()

    async def _one(self, t0: float) -> None:
        if self._slots is None:
            await self._call(t0, time.monotonic())
            return
        started = time.monotonic()
        async with self._slots:
            await self._call(t0, started)

    async def _call(self, t0: float, started: float) -> None:
        path, request = self.path, self._request
        if self._paths is not None:
            path = self._paths(self._count)
            request = self._make(path)
        self._count += 1
        conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                if self.unix is not None:
                    conn = _Conn(*await asyncio.open_unix_connection(self.unix))
                else:
                    conn = _Conn(*await asyncio.open_connection(self.host, self.port))
            conn.writer.write(request)
            status, headers, body = await asyncio.wait_for(_read_response(conn.reader), self.timeout)
            self._idle.append(conn)
            self.results.append(
                Result(
                    started - t0,
                    time.monotonic() - started,
                    status,
                    headers.get("x-edged-endpoint", ""),
                    int(headers.get("x-edged-tries", "1")),
                    path=path,
                    detail=body[:300].decode("utf-8", "replace") if status >= 500 else "",
                )
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as exc:
            if conn is not None:
                conn.writer.close()
            self.results.append(Result(started - t0, time.monotonic() - started, 0, "", 0, repr(exc), path))

    async def run(self, rate: float, duration: float, at: dict[float, object] | None = None) -> list[Result]:
        """Run the load; `at` maps seconds-into-the-run to callables run then (e.g. kill a backend)."""
        t0 = time.monotonic()
        actions = sorted((at or {}).items())
        tasks = []
        n = int(rate * duration)
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # At its time, not one call early: a call answered before `at` must not see the fault.
            while actions and actions[0][0] <= i / rate:
                when, action = actions.pop(0)
                # At its time, not up to one interval early: the calls sent before it are on their way first
                # (a backend killed "at 1.0 s" must not fail calls a test counts as answered before then).
                delay = t0 + when - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                result = action()  # type: ignore[operator]
                if asyncio.iscoroutine(result):
                    await result
            tasks.append(asyncio.ensure_future(self._one(t0)))
        await asyncio.gather(*tasks)
        for conn in self._idle:
            conn.writer.close()
        self._idle.clear()
        return self.results


def summary(results: list[Result]) -> dict[str, object]:
    """Counts and latency percentiles of a run."""
    lat = sorted(r.latency for r in results)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else 0.0

    failed = [r for r in results if r.status == 0 or r.status >= 500]
    return {
        "calls": len(results),
        "failed": len(failed),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(lat[-1] * 1000, 2) if lat else 0.0,
        "over_100ms": sum(1 for x in lat if x > 0.1),
        "retried": sum(1 for r in results if r.tries > 1),
    }
