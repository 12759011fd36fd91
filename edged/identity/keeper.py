"""Keeps this node's certificate fresh and says how it stands: renewal two thirds into its life (over MQTT, to
`edged fleet ca serve`), reload of the TLS contexts when the files change, and the state for `edged status`,
the metrics and the journal, long before an expiry bites.

The certificate is read with `ssl`'s decoder (files.summary): `cryptography` is loaded only when a renewal
is due (about 9 MiB of RSS, once a day at most; the cloud tier loads it anyway for signed envelopes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

from ..errors import EdgedError
from ..logs import log_event
from .files import CertSummary, IdentityFiles, clock_problem, summary, utc_text

log = logging.getLogger("edged.identity")

CHECK_EVERY = 60.0  # seconds between looks at the files and the clock
WAITING_CHECK = 2.0  # ... while there is no usable certificate yet (a stat() call: enrollment is picked up at once)
RETRY_FIRST, RETRY_MAX = 30.0, 600.0  # renewal retry backoff


class IdentityKeeper:
    """Owner of one task: watch the certificate, renew it when due, reload `contexts` when it changed."""

    def __init__(
        self,
        files: IdentityFiles,
        contexts: list[ssl.SSLContext],
        *,
        skew: float,
        renew: Callable[[], Any] | None,
        metrics=None,
        clock: Callable[[], float] = time.time,
        waiting_for: Callable[[CertSummary], str | None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """With `waiting_for`, the contexts hold no certificate yet (the node is not enrolled, or enrolled as
        someone else): each new `node.crt` is checked by it (a problem text: keep waiting), and the first that
        passes is loaded into the contexts, after which `on_ready()` is called once."""
        self.files = files
        self._contexts = contexts
        self._skew = skew
        self._renew = renew  # async () -> None, or None when this node cannot renew online
        self._metrics = metrics
        self._clock = clock
        self._cert: CertSummary | None = None
        self._mtime = 0.0
        self._task: asyncio.Task | None = None
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST
        self._warned = ""
        self.last_renewal: dict | None = None  # {"at", "ok", "error"}
        self._waiting_for = waiting_for
        self._on_ready = on_ready
        self.waiting_problem: str | None = None  # why the certificate on disk cannot be used (waiting_for said)

    def start(self) -> None:
        self._load()
        if self._cert is not None:
            cert = self._cert
            log_event(
                log,
                logging.INFO,
                "identity.loaded",
                spiffe_id=f"spiffe://{cert.fleet}/node/{cert.node}",
                not_after=utc_text(cert.not_after),
                renew_after=utc_text(cert.renew_after),
            )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="edged-identity")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _load(self) -> None:
        try:
            mtime = os.stat(self.files.cert).st_mtime
        except OSError:
            return
        if mtime == self._mtime:
            return
        try:
            cert = summary(self.files.cert)
        except EdgedError as exc:
            log.error("cannot read the node certificate: %s", exc)
            return
        waiting = self._waiting_for is not None
        if self._waiting_for is not None:
            problem = self._waiting_for(cert)
            if problem is not None:
                if problem != self.waiting_problem:
                    log.error("%s: peers stay off until another certificate is installed", problem)
                self.waiting_problem, self._mtime = problem, mtime  # looked at again once it changes
                return
        # Changed on disk (renewed, `edged fleet enroll` again) or the first one while waiting: use it from now on.
        if self._cert is not None or waiting:
            for ctx in self._contexts:
                try:
                    ctx.load_cert_chain(self.files.cert, self.files.key)
                    ctx.load_verify_locations(cafile=self.files.ca)
                except (ssl.SSLError, OSError) as exc:
                    log.error("cannot use the new node certificate: %s (the old one stays in use)", exc)
                    return
            if not waiting:
                log_event(log, logging.INFO, "identity.reloaded", not_after=utc_text(cert.not_after))
        self._cert, self._mtime = cert, mtime
        if waiting:
            self._waiting_for, self.waiting_problem = None, None
            log_event(
                log,
                logging.INFO,
                "identity.enrolled",
                spiffe_id=f"spiffe://{cert.fleet}/node/{cert.node}",
                not_after=utc_text(cert.not_after),
            )
            if self._on_ready is not None:
                self._on_ready()

    async def _run(self) -> None:
        while True:
            self.tick()
            now = self._clock()
            cert = self._cert
            if cert is not None and self._renew is not None and now >= cert.renew_after and now >= self._retry_at:
                await self._try_renew()
            if cert is None:
                await asyncio.sleep(CHECK_EVERY if self._waiting_for is None else WAITING_CHECK)
            else:
                await asyncio.sleep(max(1.0, min(CHECK_EVERY, cert.renew_after - now)))

    def tick(self) -> None:
        """Look at the files and the clock: reload, metrics, and a journal line when something is wrong."""
        self._load()
        cert = self._cert
        if cert is None:
            return
        now = self._clock()
        if self._metrics is not None:
            self._metrics.identity_expiry.set((), cert.not_after - now)
        problem = clock_problem(cert, now, self._skew)
        if problem is None and now >= cert.renew_after:
            left = (cert.not_after - now) / 3600
            why = (self.last_renewal or {}).get("error") or "no online renewal ([identity] renew, [mqtt])"
            problem = f"the node certificate expires in {left:.1f} h and is not renewed yet: {why}"
        if problem is not None and problem != self._warned:
            bad = now + self._skew < cert.not_before or now - self._skew > cert.not_after
            log.log(logging.ERROR if bad else logging.WARNING, "%s", problem)
        self._warned = problem or ""

    async def _try_renew(self) -> None:
        assert self._renew is not None
        try:
            await self._renew()
        except EdgedError as exc:
            self.last_renewal = {"at": self._clock(), "ok": False, "error": str(exc)}
            self._retry_at = self._clock() + self._retry_delay
            self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)
            if self._metrics is not None:
                self._metrics.identity_renewals.inc(("failed",))
            log_event(log, logging.WARNING, "identity.renewal_failed", error=str(exc), retry_in=self._retry_delay)
            return
        self.last_renewal = {"at": self._clock(), "ok": True, "error": None}
        self._retry_delay, self._retry_at = RETRY_FIRST, 0.0
        if self._metrics is not None:
            self._metrics.identity_renewals.inc(("ok",))
        self._load()
        log_event(log, logging.INFO, "identity.renewed", not_after=utc_text(self._cert.not_after if self._cert else 0))

    def state(self) -> dict:
        """For `edged status`: who this node is, until when, when it renews, and what is wrong if anything."""
        cert = self._cert
        if cert is None:
            return {"state": "missing", "dir": self.files.dir, "detail": self.waiting_problem}
        now = self._clock()
        problem = clock_problem(cert, now, self._skew)
        state = "ok"
        if problem is not None:
            state = "expired" if now - self._skew > cert.not_after else "clock_wrong"
        elif now >= cert.renew_after:
            state = "renew_failing" if self.last_renewal and not self.last_renewal["ok"] else "renew_due"
        return {
            "state": state,
            "spiffe_id": f"spiffe://{cert.fleet}/node/{cert.node}",
            "not_after": utc_text(cert.not_after),
            "expires_in_s": round(cert.not_after - now),
            "renew_after": utc_text(cert.renew_after),
            "problem": problem,
            "renews_online": self._renew is not None,
            "last_renewal": self.last_renewal,
        }
