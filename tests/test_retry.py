"""The retry decision as plain functions (the router's use of it is in test_router.py)."""

from __future__ import annotations

import pytest

from edged.model import PolicySpec
from edged.retry import answer_error, may_replay, spends_budget, why_not_retry

POLICY = PolicySpec(retries=2)


@pytest.mark.parametrize(
    ("tries", "last", "method", "expected"),
    [
        (1, {"error": "connect", "reached": False}, "POST", None),  # never arrived: safe to send elsewhere
        (1, {"error": "reset", "reached": True}, "POST", "not_idempotent"),
        (1, {"error": "reset", "reached": True}, "GET", None),
        (2, {"error": "http_503", "reached": True}, "PUT", None),
        (3, {"error": "http_503", "reached": True}, "GET", "retries"),  # retries=2: three tries at most
    ],
)
def test_why_not_retry(tries, last, method, expected):
    assert why_not_retry(POLICY, tries, last, method) == expected
    if expected == "not_idempotent":  # unless the policy allows replaying it
        assert why_not_retry(PolicySpec(retries=2, retry_non_idempotent=True), tries, last, method) is None


def test_answer_error_and_replay():
    assert answer_error(503, POLICY) == "http_503" and answer_error(500, POLICY) is None
    assert answer_error(200, POLICY) is None
    assert may_replay("GET", POLICY) and not may_replay("POST", POLICY)
    assert may_replay("POST", PolicySpec(retry_non_idempotent=True))


def test_only_tries_that_may_have_arrived_spend_the_retry_budget():
    assert not spends_budget({"error": "connect_failed", "reached": False})  # never left: free failover
    assert spends_budget({"error": "reset", "reached": True})
    assert spends_budget({"error": "http_503", "reached": True})
    assert spends_budget(None)
