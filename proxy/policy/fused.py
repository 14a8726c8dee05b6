"""The standard HTTP chain as one coroutine: fallback → shed → total timeout → retry (budget) → breaker
→ classify → attempt timeout → terminal, the same policies and state as the fold (proxy/policy/base.py)
in the same order, without a coroutine frame and a partial call per policy.

Per request the fold creates, runs and unwinds seven coroutines that mostly decide "nothing to do";
that interpreting was a quarter of the proxy's CPU per request (issue 17). This class calls the policies'
plain methods — `Fallback._key/_keep/serve`, `Shed.admits`, `TotalTimeout.start`, `Retry.acquire`,
`BreakerState.admit/record/cancel`, `Classify.verdict`, `AttemptTimeout.budget/expired` with its
`Deadlines` — so each rule still lives in one place, in its policy. `fuse()` builds it only for exactly
that list of exactly those classes (a subclass or another policy gets the fold); tests/unit/policy runs
the chain table through both and a randomised comparison of the two.
"""

from __future__ import annotations

import asyncio
import functools
import math

from proxy.exchange import Handler, ProxyRequest, ProxyResponse, Reason, Verdict, shed_response
from proxy.policy.breaker import Breaker, _settle
from proxy.policy.classify import Classify
from proxy.policy.fallback import Fallback
from proxy.policy.retry import Retry
from proxy.policy.shed import Shed
from proxy.policy.timeout import AttemptTimeout, TotalTimeout

_SUCCESS, _FAILURE, _RETRYABLE = Verdict.SUCCESS, Verdict.FAILURE, Verdict.RETRYABLE
_INF = math.inf


def fuse(policies, terminal: Handler) -> FusedChain | None:
    """The fused chain when `policies` (None entries skipped) is exactly the standard HTTP list, else None."""
    ps = [p for p in policies if p is not None]
    if len(ps) == 6:
        ps.insert(3, None)  # attempts: 1, no retry policy
    if len(ps) != 7:
        return None
    shape = (Fallback, Shed, TotalTimeout, Retry, Breaker, Classify, AttemptTimeout)
    for p, cls in zip(ps, shape, strict=True):
        if p is not None and type(p) is not cls:
            return None
        if p is None and cls is not Retry:
            return None
    return FusedChain(*ps, terminal)


class FusedChain:
    __slots__ = ("fallback", "shed", "total", "retry", "breaker", "classify", "attempt", "terminal", "clock",
                 "deadlines")

    def __init__(self, fallback: Fallback, shed: Shed, total: TotalTimeout, retry: Retry | None, breaker: Breaker,
                 classify: Classify, attempt: AttemptTimeout, terminal: Handler) -> None:
        self.fallback, self.shed, self.total, self.retry = fallback, shed, total, retry
        self.breaker, self.classify, self.attempt, self.terminal = breaker, classify, attempt, terminal
        self.clock = breaker.clock
        self.deadlines = attempt.deadlines

    async def __call__(self, req: ProxyRequest) -> ProxyResponse:
        # One frame for the whole chain: the retry loop and the attempt are written inline on purpose
        # (each nested coroutine is a frame to create, suspend, resume and unwind per request).
        fallback = self.fallback
        key = fallback._key(req)
        shed = self.shed
        if not shed.admits():
            shed.events.shed()
            resp = shed_response(shed.refusal())
        else:
            self.total.start(req)
            retry, clock, n, held = self.retry, self.clock, 1, False
            while True:
                # -- breaker → classify → attempt timeout → terminal: one attempt --------------------
                br = req.target.breaker
                token = br.admit()
                if token is None:
                    if held:
                        retry.budget.release()
                    resp = Breaker.refusal(req)
                    break  # a refusal is REJECTED: retry stops here
                start = clock.monotonic()
                try:
                    seconds, which = self.attempt.budget(req, start)
                    if seconds == _INF:  # `attempt: .inf`: no deadline to arm
                        resp = await self.terminal(req)
                    else:
                        deadlines = self.deadlines
                        armed = deadlines.arm(seconds)
                        expired = False
                        try:
                            resp = await self.terminal(req)
                        except asyncio.CancelledError:
                            # ours only when our deadline fired and nobody else asked to cancel the task
                            if not (armed.fired and armed.task.uncancel() <= armed.cancelling):
                                raise
                            expired = True
                        finally:
                            deadlines.disarm(armed)
                        if expired:
                            resp = self.attempt.expired(req, which)
                        elif armed.fired:
                            armed.task.uncancel()  # something below swallowed our cancellation
                except BaseException:
                    br.cancel(token)
                    if held:
                        retry.budget.release()
                    raise
                resp.verdict = verdict = self.classify.verdict(resp)
                resp.elapsed = elapsed = clock.monotonic() - start
                if verdict is _SUCCESS and resp.stream is not None:
                    resp.after_body(functools.partial(_settle, br, token, elapsed))
                else:
                    br.record(token, verdict, elapsed, resp.failure)
                # -- retry (budget) ------------------------------------------------------------------
                if held:
                    retry.budget.release()  # the retried attempt has its outcome
                    held = False
                if retry is None or not (verdict is _FAILURE or verdict is _RETRYABLE) or not req.replayable:
                    break
                f = resp.failure
                delay = retry.acquire(req, f.kind if f is not None else str(resp.status), resp.status, resp.headers, n)
                if delay is None:
                    break
                held = True
                resp.release()
                if delay > 0:
                    try:
                        await clock.sleep(delay)
                    except BaseException:
                        retry.budget.release()
                        raise
                n += 1
            if resp.outcome == "shed":
                shed.events.shed()
        # -- fallback ----------------------------------------------------------------------------------
        if resp.verdict is _SUCCESS:
            fallback.fresh()
            if key is not None:
                fallback._keep(req, resp, key)
            return resp
        reason = resp.reason or Reason.UPSTREAM_ERROR
        served = (fallback.serve(key, reason, req) if fallback.cache.shared is None
                  else await fallback.recover(key, reason, req))
        if served is None:
            return resp
        resp.release()
        return served
