"""`llm.limits` (token buckets at admission, corrected from `usage`), spend (`llm_cost_total`) and the
OpenTelemetry GenAI metric names, with the real `openai` SDK against the fake provider. The buckets run
on the injected clock: a wait is the clock's, not the test's."""

from __future__ import annotations

import openai
import pytest

from proxy.clock import ManualClock
from proxy.llm.limits import Bucket, Limits, estimate_tokens
from proxy.settings.spec import LLMLimitsSpec
from tests.support.metrics import sample
from tests.support.proxy import upstream_config


def llm_config(url, **llm):
    return upstream_config(url, protocol="openai", llm=llm)


def client(p) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=p.url + "/api/v1", api_key="placeholder", max_retries=0)


def _limits(p) -> Limits:
    """The running upstream's buckets (State kept by the store)."""
    return next(v for k, v in p.app.store.live.items() if k[:2] == ("keep", "llm-limits"))


def q(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_bucket_refills_per_second_and_a_debt_is_paid_first():
    b = Bucket(60, now=0.0)
    assert b.wait(60, 0.0) == 0.0
    b.take(60, 0.0)
    assert b.wait(1, 0.0) == pytest.approx(1.0)
    assert b.wait(1, 1.0) == 0.0
    b.take(30, 1.0)  # a correction: more was used than charged
    assert b.wait(1, 1.0) == pytest.approx(30.0)
    assert b.wait(1000, 100.0) == 0.0, "a cost above the capacity waits for a full bucket, not forever"


def test_limits_are_per_upstream_and_per_model_and_corrected_from_usage():
    clock = ManualClock()
    lim = Limits(LLMLimitsSpec(tokens_per_minute=1000, models={"a": {"requests_per_minute": 1}}), clock)
    assert lim.wait("a", 100) == (0.0, "")
    lim.take("a", 100)
    wait, why = lim.wait("a", 100)
    assert why == "models.a.requests_per_minute" and wait == pytest.approx(60.0)
    assert lim.wait("b", 100) == (0.0, "")
    lim.take("b", 850)
    assert lim.wait("b", 100)[1] == "tokens_per_minute"
    lim.correct("b", 850, 100)  # the answer used far less than reserved: given back
    assert lim.wait("b", 100) == (0.0, "")


def test_the_estimate_counts_text_messages_and_the_reservation():
    doc = {"messages": [{"role": "system", "content": "x" * 40}, {"role": "user", "content": [{"type": "text", "text": "y" * 8}]}],
           "max_tokens": 100}
    assert estimate_tokens(doc) == 10 + 2 + 8 + 100


async def test_over_the_limit_the_app_gets_a_local_429_with_retry_after(fake, start_proxy, metrics):
    name, cfg = llm_config(fake.url, limits={"requests_per_minute": 2})
    p = await start_proxy(cfg, clock=ManualClock())
    c = client(p)
    for i in range(2):
        await c.chat.completions.create(model="m", messages=q(f"q{i}"))
    with pytest.raises(openai.RateLimitError) as ei:
        await c.chat.completions.create(model="m", messages=q("q2"))
    assert int(ei.value.response.headers["Retry-After"]) == 30
    assert "llm.limits.requests_per_minute" in ei.value.message
    assert len(fake.requests) == 2, "no upstream call for the refused request"
    assert metrics.delta("llm_limited_total", name=name, action="rejected") == 1


async def test_over_the_limit_a_fresh_cached_answer_comes_first(fake, start_proxy, metrics):
    name, cfg = llm_config(fake.url, limits={"requests_per_minute": 1}, fallback_models=["fake/b"])
    p = await start_proxy(cfg, clock=ManualClock())
    c = client(p)
    first = await c.chat.completions.create(model="fake/a", messages=q("same"))
    again = await c.chat.completions.create(model="fake/a", messages=q("same"))
    assert again.model_extra["fallback"] is True and again.model_extra["fallback_reason"] == "rate_limited"
    assert again.choices[0].message.content == first.choices[0].message.content and len(fake.requests) == 1
    assert metrics.delta("llm_limited_total", name=name, action="cache") == 1


async def test_over_a_models_limit_a_fallback_model_with_budget_answers(fake, start_proxy, metrics):
    name, cfg = llm_config(fake.url, fallback_models=["fake/b"],
                           limits={"models": {"fake/a": {"requests_per_minute": 1}}})
    p = await start_proxy(cfg, clock=ManualClock())
    c = client(p)
    await c.chat.completions.create(model="fake/a", messages=q("one"))
    raw = await c.chat.completions.with_raw_response.create(model="fake/a", messages=q("two"))
    assert raw.headers["X-Model-Fallback"] == "fake/b" and raw.parse().model == "fake/b"
    assert [r["body"]["model"] for r in fake.requests] == ["fake/a", "fake/b"]
    assert metrics.delta("llm_limited_total", name=name, action="fallback_model") == 1


async def test_a_short_wait_within_max_wait_then_the_request_goes(fake, start_proxy, metrics):
    clock = ManualClock()
    name, cfg = llm_config(fake.url, limits={"requests_per_minute": 60, "max_wait": "2s"})
    p = await start_proxy(cfg, clock=clock)
    c = client(p)
    lim = _limits(p)
    lim.upstream[0].take(60, clock.monotonic())  # the minute's requests are spent
    r = await c.chat.completions.create(model="m", messages=q("waits"))
    assert r.choices[0].message.content and len(fake.requests) == 1
    assert clock.sleeps and 0 < clock.sleeps[-1] <= 1.0
    assert metrics.delta("llm_limited_total", name=name, action="waited") == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_spend_from_the_price_table_or_the_providers_usage_cost(fake, start_proxy, metrics, stream):
    name, cfg = llm_config(fake.url, models=["fake/a"], prices={"fake/a": {"prompt": 1.0, "completion": 2.0}})
    p = await start_proxy(cfg)
    c = client(p)
    r = await c.chat.completions.create(model="fake/a", messages=q("priced"), stream=stream)
    if stream:
        [ch async for ch in r]
    assert metrics.delta("llm_cost_total", name=name, model="fake/a") == pytest.approx((7 * 1.0 + 10 * 2.0) / 1e6)
    fake.usage_cost = 0.0042
    r = await c.chat.completions.create(model="fake/a", messages=q("reported"), stream=stream)
    if stream:
        [ch async for ch in r]
    assert metrics.delta("llm_cost_total", name=name, model="fake/a") == pytest.approx(27e-6 + 0.0042)


async def test_gen_ai_metric_names(fake, start_proxy):
    name, cfg = llm_config(fake.url, models=["fake/a"])
    p = await start_proxy(cfg)
    stream = await client(p).chat.completions.create(model="fake/a", messages=q("otel"), stream=True)
    [ch async for ch in stream]
    labels = {"name": name, "gen_ai_operation_name": "chat", "gen_ai_request_model": "fake/a"}
    assert sample("gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="input") == 7
    assert sample("gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="output") == 10
    assert sample("gen_ai_client_operation_duration_seconds_count", **labels) == 1
    assert sample("gen_ai_client_operation_time_to_first_chunk_seconds_count", **labels) == 1


async def test_a_huge_reservation_that_fails_does_not_lock_everyone_out(fake, start_proxy):
    """Found in review: max_tokens far above tokens_per_minute on a request the provider refused left
    the bucket owing it for ever; the next request got "retry in 599999999941 s"."""
    name, cfg = llm_config(fake.url, limits={"tokens_per_minute": 100000})
    p = await start_proxy(cfg, clock=ManualClock())
    c = client(p)
    fake.content_filter = True
    with pytest.raises(openai.BadRequestError):
        await c.chat.completions.create(model="m", messages=q("huge"), max_tokens=10**15)
    fake.content_filter = False
    r = await c.chat.completions.create(model="m", messages=q("innocent"))
    assert r.choices[0].message.content
    # an answer that used far less than its reservation gives the rest back, a stream's too
    for stream in (False, True):
        r = await c.chat.completions.create(model="m", messages=q(f"big {stream}"), max_tokens=90000, stream=stream)
        if stream:
            [ch async for ch in r]
    r = await c.chat.completions.create(model="m", messages=q("after"), max_tokens=90000)
    assert r.choices[0].message.content and len(fake.requests) == 5


async def test_a_models_limit_holds_for_failover_and_retries_too(fake, start_proxy, metrics):
    """Found in review: only the model chosen at admission was charged; the fallback model was asked
    without limit when the primary failed. Every attempt is charged to the model it asks."""
    name, cfg = llm_config(fake.url, fallback_models=["fake/b"], limits={"models": {"fake/b": {"requests_per_minute": 1}}})
    cfg["upstreams"][name]["retry"] = {"attempts": 1}
    p = await start_proxy(cfg, clock=ManualClock())
    fake.fail_models = {"fake/a"}
    c = client(p)
    r = await c.chat.completions.create(model="fake/a", messages=q("one"))
    assert r.model == "fake/b"
    for i in range(3):
        # fake/a down, fake/b over its limit: the local 429, not a request fake/b's account would refuse
        with pytest.raises(openai.RateLimitError) as ei:
            await c.chat.completions.create(model="fake/a", messages=q(f"more {i}"))
        assert "models.fake/b.requests_per_minute" in ei.value.message and ei.value.response.headers["Retry-After"]
    assert [x["body"]["model"] for x in fake.requests].count("fake/b") == 1


def test_a_debt_after_a_refill_is_not_swallowed_by_the_cap():
    """Found in review: the correction was applied to the level as it was at the last charge, and the
    refill capped at the bucket's size then swallowed the debt."""
    clock = ManualClock(0.0)
    lim = Limits(LLMLimitsSpec(tokens_per_minute=10000), clock)
    lim.take("m", 2000)
    clock.advance(30)
    lim.correct("m", 2000, 6000)  # 4,000 more used than charged
    wait, _ = lim.wait("m", 10000)
    assert wait == pytest.approx(4000 / (10000 / 60))


async def test_a_stream_without_usage_is_charged_its_text_not_its_reservation(fake, start_proxy):
    """Found in review: without a usage chunk the reservation came back and only the prompt was charged."""
    name, cfg = llm_config(fake.url, limits={"tokens_per_minute": 10000})
    p = await start_proxy(cfg, clock=ManualClock())
    fake.stream_usage = False
    question = q("x" * 400)
    r = await client(p).chat.completions.create(model="m", messages=question, max_tokens=5000, stream=True)
    [ch async for ch in r]
    lim = _limits(p)
    text = fake.content({"messages": question})
    used = (400 // 4 + 4) + -(-len(text) // 4)  # the prompt's estimate and the answer's text, 4 chars a token
    assert lim.upstream[1].level == pytest.approx(10000 - used)
