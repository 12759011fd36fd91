"""A small blocking client for the local API (stdlib only): used by the CLI, scripts and tests."""

from __future__ import annotations

import http.client
import json
import socket
from urllib.parse import urlsplit

from .errors import EdgedError


class ApiError(EdgedError):
    """The daemon could not be reached, or answered with an error."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class ApiClient:
    """Talks to `http://HOST:PORT` or `unix:/path/to/edged.sock`."""

    def __init__(self, address: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        self.address = address
        self._token = token
        self._timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self.address.startswith("unix:"):
            return _UnixConnection(self.address[5:], self._timeout)
        parts = urlsplit(self.address)
        return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 7700, timeout=self._timeout)

    def request(
        self, method: str, path: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """(status, headers, body). Raises ApiError when the daemon cannot be reached."""
        conn = self._connection()
        hdrs = dict(headers or [])
        if self._token:
            hdrs.setdefault("Authorization", f"Bearer {self._token}")
        if body and path.startswith("/v1/") and not any(k.lower() == "content-type" for k in hdrs):
            hdrs["Content-Type"] = "application/json"  # the API takes JSON bodies only when they say so
        try:
            conn.request(method, path, body=body or None, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(f"cannot reach the daemon at {self.address}: {exc}") from None
        finally:
            conn.close()

    def call_json(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
        """(status, decoded JSON answer) for any method; ApiError if the answer is not JSON."""
        status, _, data = self.request(method, path, body, [("Content-Type", "application/json")] if body else None)
        try:
            return status, json.loads(data)
        except ValueError:
            raise ApiError(f"{path}: HTTP {status}, not JSON: {data[:200]!r}") from None

    def get_json(self, path: str) -> dict:
        """GET and decode JSON; an error answer becomes ApiError with the daemon's error code and detail."""
        status, _, data = self.request("GET", path)
        try:
            doc = json.loads(data)
        except ValueError:
            raise ApiError(f"{path}: HTTP {status}, not JSON: {data[:200]!r}") from None
        if status >= 400:
            raise ApiError(f"{path}: HTTP {status} {doc.get('error')}: {doc.get('detail')}")
        return doc
