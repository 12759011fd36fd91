"""HTTP/1.1 data plane: the server that takes calls and the pooled client that forwards them upstream."""

from edged.http.client import UpstreamPool, UpstreamResponse
from edged.http.message import HOP_BY_HOP, Headers, Request, strip_hop_by_hop
from edged.http.server import ClientDisconnected, Handler, HttpServer, ListenError, ResponseWriter, error_body

__all__ = [
    "HOP_BY_HOP",
    "ClientDisconnected",
    "Handler",
    "Headers",
    "HttpServer",
    "ListenError",
    "Request",
    "ResponseWriter",
    "UpstreamPool",
    "UpstreamResponse",
    "error_body",
    "strip_hop_by_hop",
]
