"""One exception root for the daemon; library errors never leak past the module that met them."""

from __future__ import annotations


class EdgedError(Exception):
    """Root of every error edged raises on purpose."""


class ConfigError(EdgedError):
    """A config file or manifest is invalid: names the file, the line (when known) and the key."""

    def __init__(self, file: str, message: str, *, line: int | None = None, key: str | None = None):
        self.file = file
        self.line = line
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"{self.key}: {self.message}" if self.key else self.message
        return f"{where}: {what}"


class CallError(EdgedError):
    """A call through the mesh failed in a way the caller sees: carries the HTTP status and code (and any
    headers the answer must have, such as `retry-after`)."""

    def __init__(self, status: int, code: str, detail: object = None, headers: tuple[tuple[bytes, bytes], ...] = ()):
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        super().__init__(f"{status} {code}: {detail}")


class UpstreamError(EdgedError):
    """A try against one endpoint failed; `reached` tells whether the request may have arrived."""

    reached = True
    kind = "error"

    def __init__(self, target: str, detail: str):
        self.target = target
        self.detail = detail
        super().__init__(f"{self.kind} {target}: {detail}")


class ConnectFailed(UpstreamError):
    """The connection could not be made: the request never reached the endpoint."""

    reached = False
    kind = "connect_failed"

    def __init__(self, target: str, detail: str, *, refused: bool = False):
        super().__init__(target, detail)
        self.refused = refused  # nothing listens there (ECONNREFUSED), as opposed to a timeout or a bad address


class UpstreamReset(UpstreamError):
    """The connection broke after the request was (perhaps partly) sent, before a full response head."""

    kind = "reset"


class UpstreamTimeout(UpstreamError):
    """No response head within the per-try timeout."""

    kind = "timeout"


class UpstreamProtocolError(UpstreamError):
    """The endpoint answered with something that is not HTTP/1.x."""

    kind = "protocol_error"


# Exit codes of `edged run` (documented in README.md): systemd's RestartPreventExitStatus= names EXIT_CONFIG,
# so a config error stops the unit instead of restarting it forever.
EXIT_START_FAILED = 1  # could not start (a port in use, a folder it may not write): may succeed on a restart
EXIT_CONFIG = 78  # the config is invalid or unsafe (EX_CONFIG of sysexits.h): fix it, then start again


class IdentityError(EdgedError):
    """A certificate, key, signature or trust bundle is missing, invalid, expired or not trusted: says which."""
