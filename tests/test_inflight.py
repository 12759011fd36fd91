"""One in-flight mechanism (edged/inflight.py) for quotas' caps and breakers: places given back exactly once."""

from __future__ import annotations

import asyncio

from edged.inflight import Hold, Places
from edged.model import QuotaSpec
from edged.quota import Quotas


def test_a_hold_gives_each_place_back_once_however_often_it_is_released():
    tenant, service = Places(), Places()
    hold = Hold.take((tenant, service))
    other = Hold.take((tenant,))
    assert (tenant.count, service.count) == (2, 1)
    with hold:
        pass
    hold.release()  # a second release (a done-callback after the `with`) takes nothing from the other call
    assert (tenant.count, service.count) == (1, 0) and not hold.held
    other.release()
    assert tenant.count == 0


def test_a_waiter_cancelled_before_its_turn_leaves_no_trace_and_the_next_gets_the_place():
    async def scenario():
        places = Places()
        places.take()
        first = asyncio.create_task(places.wait(5.0))
        second = asyncio.create_task(places.wait(5.0))
        await asyncio.sleep(0)
        first.cancel()  # its client left while it waited
        await asyncio.gather(first, return_exceptions=True)
        assert places.waiting == 1
        places.give()  # handed to `second`: the count stays
        assert await second is True and places.count == 1 and places.waiting == 0
        places.give()
        assert places.count == 0
        assert await places.wait(0.01) is False and places.waiting == 0  # nobody gives: time runs out, no trace

    asyncio.run(scenario())


def test_quota_caps_count_in_the_same_places_and_a_ticket_gives_them_back():
    quotas = Quotas({"garden": QuotaSpec(in_flight=2), "garden/thermo": QuotaSpec(in_flight=1)})
    ticket = quotas.admit("garden", "thermo", None)
    state = quotas.state()
    assert state["garden"]["in_flight_now"] == 1 and state["garden/thermo"]["in_flight_now"] == 1
    ticket.release()
    ticket.release()
    assert all(v["in_flight_now"] == 0 for v in quotas.state().values())
