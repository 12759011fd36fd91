"""The call path on one keep-alive connection, end to end: pipelined calls, failover among them, and every count
back at zero afterwards.

The real daemon (in this process, so that its counts can be read), two real backend processes, and a raw client
socket that sends several calls in one write.
"""

from __future__ import annotations

import asyncio
import json

from conftest import Edged
from test_cancellation import until
from test_http_server import ResponseReader

from edged.config import load_config
from edged.daemon import Daemon

MANIFEST = """
service_name = "two"
[[endpoints]]
type = "local"
url = "{a}"
priority = 1
[[endpoints]]
type = "local"
url = "{b}"
priority = 2
[policy]
strategy = "priority"
"""


def test_pipelined_calls_are_answered_in_order_and_fail_over_each_on_its_own(tmp_path, backends):
    a, b = backends("a"), backends("b")
    a.set_fault("503")  # every call to `a` answers 503: a call that may be sent again fails over to `b`
    layout = Edged(tmp_path / "edged", {"two.toml": MANIFEST.format(a=a.url, b=b.url)})
    daemon = Daemon(load_config(str(layout.config)))
    calls = [
        b"GET /svc/two/first HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"POST /svc/two/second HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /svc/two/sleep/200 HTTP/1.1\r\nHost: localhost\r\n\r\n",  # a slow one between the others
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",  # not a call: answered in its turn all the same
        b"GET /svc/two/fifth?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ]

    async def scenario() -> tuple[list, dict]:
        await daemon.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", layout.port)
            writer.write(b"".join(calls))
            answers = await ResponseReader(reader).read(len(calls))
            writer.close()
            await until(lambda: daemon.server.in_flight == 0)
            endpoints = daemon.registry.snapshot().get("default", "two").endpoints
            return answers, {
                "endpoints in flight": [daemon.health.state(ep.id).inflight for ep in endpoints],
                "calls in flight": daemon.server.in_flight,
                "upstream connections busy": sum(s["busy"] for s in daemon.pool.stats().values()),
            }
        finally:
            await daemon.stop()

    answers, counts = asyncio.run(scenario())
    # The POST reached `a` and may have done its work there: it is not sent again, and its 503 is the answer.
    assert [r.status for r in answers] == [200, 503, 200, 200, 200]
    bodies = [json.loads(r.body) for r in answers]
    assert [body.get("path") for body in bodies] == ["/first", "/second", "/sleep/200", None, "/fifth?x=1"]
    assert bodies[1] == {**bodies[1], "name": "a", "method": "POST", "body": "abc"}
    assert [body.get("name") for body in bodies] == ["b", "a", "b", None, "b"]
    assert answers[0].headers[b"x-edged-tries"] == b"2"  # `a` answered 503 first
    assert counts == {"endpoints in flight": [0, 0], "calls in flight": 0, "upstream connections busy": 0}
