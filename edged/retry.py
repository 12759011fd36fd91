"""The retry decision: what to do after a try, as plain functions of the policy and what the tries came to.

The router asks these, then acts (spends the retry budget, sends the next try); nothing here does I/O, holds
state or reads a clock, so every case is a one-line test.
"""

from __future__ import annotations

from .model import IDEMPOTENT_METHODS, PolicySpec


def may_replay(method: str, policy: PolicySpec) -> bool:
    """Whether a call that may have reached an endpoint can be sent again (idempotent, or the policy says so)."""
    return method in IDEMPOTENT_METHODS or policy.retry_non_idempotent


def answer_error(status: int, policy: PolicySpec) -> str | None:
    """None when an answer with this status is the caller's; else the error it counts as ("http_503"), and the
    router tries the next endpoint (keeping this answer in case every other try fails)."""
    return f"http_{status}" if status in policy.retry_on_status else None


def why_not_retry(policy: PolicySpec, tries: int, last: dict | None, method: str) -> str | None:
    """After `tries` tries (at least one), before the next: None to go on (if the retry budget allows), else
    why the call stops. `last` is the previous try as reported in call details (`reached`: it may have
    arrived)."""
    if tries > policy.retries:
        return "retries"
    if last is not None and last.get("reached") and not may_replay(method, policy):
        return "not_idempotent"  # a call that may have arrived is not sent twice
    return None


def spends_budget(last: dict | None) -> bool:
    """Whether the next try draws on the retry budget. A try that never left (a connect failure: `reached` is
    False) added no load anywhere, so failing over from it is free; the budget is there to keep retries from
    multiplying the work of endpoints that did receive the call."""
    return last is None or last.get("reached", True)
