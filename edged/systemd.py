"""systemd integration without libsystemd: sd_notify datagrams and the watchdog.

Notification is best effort: a missing or broken notify socket never breaks the daemon. Errors are
swallowed and logged once, at debug level.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# Variables that describe *our* relation to systemd; a child process (a health-check command) that
# inherited them could notify or claim sockets in our name.
SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def child_environ(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`environ` without the systemd variables that belong to the daemon itself, for child processes."""
    return {k: v for k, v in environ.items() if k not in SYSTEMD_ENV}


class Notifier:
    """Sends sd_notify messages to $NOTIFY_SOCKET (a path, or '@name' in the abstract namespace)."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        # Only AF_UNIX addresses are supported (systemd may also pass vsock: for VMs; not for us).
        self._address = address if address.startswith(("/", "\0")) and len(address) > 1 else ""
        self.enabled: bool = bool(self._address)
        self._watchdog_usec = environ.get("WATCHDOG_USEC", "")
        self._watchdog_pid = environ.get("WATCHDOG_PID", "")
        self._sock: socket.socket | None = None
        self._failed = False  # an error was already logged

    def __repr__(self) -> str:
        where = self._address.replace("\0", "@") if self.enabled else "disabled"
        return f"Notifier({where}, watchdog={self.watchdog_interval()})"

    def ready(self, status: str = "") -> None:
        """Startup (or a reload) is complete: the daemon serves."""
        self._send("READY=1", status)

    def reloading(self) -> None:
        """A reload began; send `ready()` when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Shutdown began."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Keep-alive for WatchdogSec=."""
        self._send("WATCHDOG=1")

    def status(self, text: str) -> None:
        """A one-line status shown by `systemctl status`."""
        self._send("", text)

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WATCHDOG_USEC), or None when no watchdog is ours.

        None also when notification is disabled: pings would go nowhere.
        """
        if not self.enabled:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 2 / 1_000_000

    async def async_watchdog_loop(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping the watchdog every interval until cancelled; returns at once when there is no watchdog.

        A ping skipped because `healthy()` is false lets systemd restart a daemon that is stuck but alive.
        The owner runs this as a task and cancels and awaits it on shutdown.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            if healthy is None or healthy():
                self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        """Close the socket; later messages open a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str, status: str = "") -> None:
        if not self.enabled:
            return
        if status:
            # One line: a newline would start a new (forged) assignment in the datagram.
            line = "STATUS=" + status.replace("\n", " ").replace("\r", " ")
            message = f"{message}\n{line}" if message else line
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode("utf-8", "replace"), self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.debug("sd_notify to %r failed: %s", self._address.replace("\0", "@"), exc)
