"""Answers whose body may break: small ones are read whole before the caller sees their head (so a break is a
failed try that fails over, like a reset), larger or streamed ones are relayed as they come and, if they break,
cut (the caller's connection closes, so it sees the truncation) and reported to health after the fact.
"""

from __future__ import annotations

import asyncio

from .call import Headers, UpstreamAnswer
from .errors import UpstreamTimeout

WHOLE_ANSWER = 64 * 1024  # default `[limits] answer_buffer`: covers the usual edge API answer


class WholeAnswer:
    """An upstream answer read to its end: `read()` gives the body once, then b""."""

    __slots__ = ("_body", "complete", "content_length", "headers", "reason", "status")

    def __init__(self, head: UpstreamAnswer, body: bytes) -> None:
        self.status = head.status
        self.reason = head.reason
        self.headers: Headers = head.headers
        self.content_length: int | None = len(body)
        self.complete = True
        self._body = body

    def __repr__(self) -> str:
        return f"<WholeAnswer {self.status} {len(self._body)} bytes>"

    async def read(self) -> bytes:
        body, self._body = self._body, b""
        return body

    def take(self) -> bytes:
        body, self._body = self._body, b""
        return body

    def discard(self) -> None:
        self._body = b""


def wants_whole(answer: UpstreamAnswer, method: str, limit: int) -> bool:
    """Whether to read this answer whole before it is the caller's: its body is not all here yet and its
    announced length is within `limit` (chunked and close-delimited answers stream)."""
    length = answer.content_length
    return not answer.complete and length is not None and length <= limit and method != "HEAD"


def streams(answer: UpstreamAnswer, method: str) -> bool:
    """Whether the caller gets this answer while its body is still arriving (its outcome is known only at
    the end: `Router.settle`)."""
    return not answer.complete and method != "HEAD"


async def read_whole(answer: UpstreamAnswer, target: str, timeout: float) -> WholeAnswer:
    """The answer with its whole body, within `timeout` seconds. UpstreamError if the body breaks or is late
    (the connection is closed then)."""
    parts: list[bytes] = []
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout
    try:
        while True:
            left = until - loop.time()
            if left <= 0:
                raise UpstreamTimeout(target, f"answer body not complete within {timeout:.3g}s")
            try:
                chunk = await asyncio.wait_for(answer.read(), left)
            except asyncio.TimeoutError:
                raise UpstreamTimeout(target, f"answer body not complete within {timeout:.3g}s") from None
            if not chunk:
                return WholeAnswer(answer, b"".join(parts))
            parts.append(chunk)
    except BaseException:  # a break, or the try cancelled (the caller left, or a race was won by another try)
        answer.discard()
        raise
