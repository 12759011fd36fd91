"""A real HTTP/1.1 backend for end-to-end tests, run as its own process so tests can SIGKILL or SIGSTOP it.

usage: python tests/backend.py PORT NAME [--unix PATH]
  GET|POST /anything     -> 200 {"name": NAME, "method": ..., "path": ..., "body": ...}
  /healthz               -> 200, or 503 while the file NAME.unhealthy exists in the cwd
  /status/CODE           -> that status
  /sleep/MS              -> answers after MS milliseconds (a line in NAME.sleeps in the cwd as it starts:
                            tests wait on it to know the call is at the backend)
  /drip/COUNT/MS         -> 200 with a body of COUNT bytes, one every MS milliseconds (a streaming answer)
  /big/COUNT             -> 200 with a body of COUNT bytes
  while the file NAME.half exists in the cwd, every answer but /healthz promises its whole body, sends half of
  it and closes the connection (an endpoint that dies mid-body); while NAME.fault exists, every request but
  /healthz gets what it says: "503" (that status), "slow" (answers after 2 s) or "reset" (a TCP reset, no answer)
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "backend"
    wbufsize = -1  # buffer the whole answer: one write, so Nagle + delayed ACK never add 40 ms

    def setup(self) -> None:
        super().setup()
        if self.connection.family != socket.AF_UNIX:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # quiet
        pass

    def _drip(self, count: int, every: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(count))
        self.end_headers()
        self.wfile.flush()
        try:
            for _ in range(count):
                time.sleep(every)
                self.wfile.write(b".")
                self.wfile.flush()
        except OSError:  # the caller left
            self.close_connection = True

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        name = self.server.name  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        status = 200
        fault = self._fault(name) if path != "/healthz" else ""
        if fault == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if fault == "slow":
            time.sleep(2)
        elif fault.isdigit():
            status = int(fault)
        if path == "/healthz" and os.path.exists(f"{name}.unhealthy"):
            status = 503
        elif path.startswith("/status/"):
            status = int(path.split("/")[2])
        elif path.startswith("/sleep/"):
            with open(f"{name}.sleeps", "a") as f:
                f.write(path + "\n")
            time.sleep(int(path.split("/")[2]) / 1000)
        elif path.startswith("/drip/"):
            self._drip(int(path.split("/")[2]), int(path.split("/")[3]) / 1000)
            return
        if path.startswith("/big/"):
            self._send(status, b"x" * int(path.split("/")[2]), "application/octet-stream")
            return
        doc = {
            "name": name,
            "method": self.command,
            "path": self.path,
            "body": body.decode("utf-8", "replace"),
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        self._send(status, json.dumps(doc).encode(), "application/json")

    @staticmethod
    def _fault(name: str) -> str:
        try:
            with open(f"{name}.fault") as f:
                return f.read().strip()
        except OSError:
            return ""

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        half = self.path != "/healthz" and os.path.exists(f"{self.server.name}.half")  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[: len(data) // 2] if half else data)
        self.wfile.flush()
        if half:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _answer


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        pass  # a client that went away mid-answer is normal in fault tests


class UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def get_request(self):
        request, _ = super().get_request()
        return request, ("unix", 0)


def main() -> None:
    port, name = int(sys.argv[1]), sys.argv[2]
    if len(sys.argv) > 4 and sys.argv[3] == "--unix":
        server = UnixServer(sys.argv[4], Handler)
    else:
        server = QuietServer(("127.0.0.1", port), Handler)
    server.name = name  # type: ignore[attr-defined]
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
