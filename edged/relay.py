"""What every HTTP entry point of the mesh (the local API, the peer ingress) does with a call the same way:
its deadline, its request id, and relaying the routed answer back to the caller."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Iterable

from .call import DROPPED, Call
from .errors import CallError, UpstreamError
from .http.message import PLAIN_CONNECTION, Headers, Request, header_lines, strip_hop_by_hop
from .http.server import ResponseWriter
from .model import Service
from .router import Routed, Router

# Request ids: a random per-process prefix and a counter (no syscall per call, unique across restarts).
_ID_PREFIX = secrets.token_hex(4)
_id_counter = itertools.count(1)
# The dropped headers call_for reads: the mesh's own two, and Connection (which may name more to drop).
_READ = frozenset({b"x-request-id", b"x-edged-timeout-ms", b"connection"})


def _asked_timeout(policy_timeout: float, asked: bytes) -> float:
    """Seconds the call may take when the caller asks for less than the service's `timeout`
    (`x-edged-timeout-ms`)."""
    try:
        return min(policy_timeout, max(0.0, int(asked) / 1000))
    except ValueError:
        raise CallError(400, "bad_request", "x-edged-timeout-ms must be an integer") from None


def call_for(
    req: Request,
    svc: Service,
    path: str,
    *,
    tiers: frozenset[str] | None = None,
    drop: frozenset[bytes] = frozenset(),
    add: Iterable[tuple[bytes, bytes]] = (),
    app: str = "",
) -> Call:
    """The call an entry point makes of `req` for `svc`: its deadline (the service's timeout, or the caller's
    shorter one) and request id (the caller's `x-request-id`, or a new one), with `new_call`'s header rules."""
    # new_call's rules, in the one pass over the caller's headers that also finds the mesh's own two (once per
    # call: new_call took two more passes and a list comprehension).
    skip = DROPPED.get(drop) or DROPPED.union(drop)
    kept: Headers = []
    given = asked = None
    named = False
    for header in req.headers:
        name = header[0]
        if name not in skip:
            kept.append(header)
        elif name in _READ:  # (one look-up for the dropped header that is none of them, as Host)
            if name == b"x-request-id":
                if given is None:
                    given = header[1]
            elif name == b"x-edged-timeout-ms":
                if asked is None:
                    asked = header[1]
            elif header[1] not in PLAIN_CONNECTION:
                named = True
    if named:  # it names more headers to drop: new_call's own way (rare)
        kept = strip_hop_by_hop(req.headers, skip)
    if add:
        kept.extend(add)
    spec = svc.spec
    timeout = spec.policy.timeout if asked is None else _asked_timeout(spec.policy.timeout, asked)
    return Call(
        spec.tenant,
        spec.name,
        req.method,
        path,
        kept,
        req.body,
        time.monotonic() + timeout,
        given.decode("ascii", "replace") if given else f"{_ID_PREFIX}-{next(_id_counter):x}",
        tiers,
        app,
    )


def relay_whole(router: Router, resp: ResponseWriter, routed: Routed, extra: tuple[bytes, ...]) -> None:
    """`relay_answer` for an answer that is all here (`answer.complete`, not a HEAD request: the common small
    answer): one write, and no coroutine of its own or of the answer's `read` (two per call otherwise)."""
    answer = routed.answer
    lines = header_lines(answer.headers)
    lines += extra
    outcome = "success" if answer.status < 500 else "error"
    try:
        resp.send_lines(answer.status, lines, answer.take())
        if routed.streamed:  # a streamed answer whose rest came before the head went out
            router.settle(routed, True)
    except ConnectionError:
        answer.discard()
        outcome = "error"
        raise
    finally:
        router.record(routed.service.spec.name, routed.endpoint.tier, outcome, routed.started)


async def relay_answer(
    router: Router, req: Request, resp: ResponseWriter, routed: Routed, extra: tuple[bytes, ...]
) -> None:
    """Send the routed answer to the caller (streamed, or in one write when it is all here) and count the call.
    `extra`: header lines the entry point adds, encoded (pieces that join to "name: value\\r\\n" lines)."""
    if routed.answer.complete and req.method != "HEAD":
        relay_whole(router, resp, routed, extra)
        return
    answer, ep = routed.answer, routed.endpoint
    lines = header_lines(answer.headers)
    lines += extra
    outcome = "success" if answer.status < 500 else "error"
    try:
        resp.start_lines(answer.status, lines, content_length=answer.content_length)
        try:
            while chunk := await answer.read():
                await resp.write(chunk)
        except UpstreamError:
            # The body broke off upstream: the caller must see a truncation, never a short body as whole.
            answer.discard()
            outcome = "truncated"
            router.settle(routed, False)
            resp.cut()
            return
        router.settle(routed, True)
        resp.end()
    except (ConnectionError, asyncio.CancelledError):
        answer.discard()
        outcome = "error"
        raise
    finally:
        router.record(routed.service.spec.name, ep.tier, outcome, routed.started)
