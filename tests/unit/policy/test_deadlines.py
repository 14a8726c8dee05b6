"""Attempt timeouts on the coarse timer wheel: what fires, what is left alone (outcomes, not timings)."""

from __future__ import annotations

import asyncio

from proxy.clock import ManualClock
from proxy.exchange import ProxyRequest, ProxyResponse
from proxy.policy.timeout import AttemptTimeout, Deadlines, TotalTimeout


def _req() -> ProxyRequest:
    return ProxyRequest("GET", "/", "/", {}, {}, None, True, "rid")


async def test_expired_attempt_becomes_a_504_and_the_call_is_cancelled():
    cancelled = asyncio.Event()

    async def never(req):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    resp = await AttemptTimeout(0.02, ManualClock(), Deadlines())(_req(), never)
    assert resp.status == 504 and resp.failure.kind == "timeout"
    assert cancelled.is_set()
    assert asyncio.current_task().cancelling() == 0  # no stray cancellation left on the task


async def test_answer_in_time_disarms_and_leaves_the_task_clean():
    async def quick(req):
        await asyncio.sleep(0)
        return ProxyResponse(200)

    wheel = Deadlines()
    for _ in range(100):
        assert (await AttemptTimeout(5, ManualClock(), wheel)(_req(), quick)).status == 200
    assert not any(wheel._slots.values())
    assert asyncio.current_task().cancelling() == 0


async def test_a_foreign_cancellation_is_not_turned_into_a_timeout():
    entered = asyncio.Event()

    async def slow(req):
        entered.set()
        await asyncio.sleep(10)
        return ProxyResponse(200)

    task = asyncio.ensure_future(AttemptTimeout(5, ManualClock(), Deadlines())(_req(), slow))
    await entered.wait()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("a cancelled caller must see CancelledError, not a 504")
    assert task.cancelled()


async def test_attempt_is_cut_to_what_is_left_of_the_total():
    clock = ManualClock()

    async def never(req):
        await asyncio.Event().wait()

    async def inner(req):
        clock.advance(4.99)  # most of the 5 s total spent before the attempt starts
        return await AttemptTimeout(60, clock, Deadlines())(req, never)

    resp = await TotalTimeout(5, clock)(_req(), inner)
    assert resp.status == 504 and "total timeout (5s)" in resp.failure.message


async def test_a_cancellation_swallowed_below_leaves_no_count_behind():
    async def stubborn(req):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # code below the policy that eats the cancellation and answers anyway
        return ProxyResponse(200)

    resp = await AttemptTimeout(0.02, ManualClock(), Deadlines())(_req(), stubborn)
    assert resp.status == 200
    assert asyncio.current_task().cancelling() == 0
    await asyncio.sleep(0)  # and the task is not cancelled at its next await


async def test_infinite_attempt_timeout_arms_nothing():
    async def quick(req):
        return ProxyResponse(200)

    assert (await AttemptTimeout(float("inf"), ManualClock(), Deadlines())(_req(), quick)).status == 200
