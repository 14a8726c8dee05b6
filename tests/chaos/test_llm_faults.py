"""The sixteen provider faults LLM failover benchmarks use, through the example config shipped in
config/openai-failover.yaml (its timeouts and breaker reset divided by ten), with the real `openai` SDK
as the app and the fault-injecting fake provider (tests/support/fake_openai.py) behind the proxy.

For each fault: the complete canonical answer reached the app (the content filter: the provider's error
after one attempt), the attempts per model stayed within bounds, no model was asked again sooner than a
Retry-After it stated, the wall time stayed within the budget, and the proxy is healthy afterwards.
`python -m tests.chaos.llm_faults` runs this module and writes the table in docs/llm-failover.md (the
README's "LLM upstream" section shows it).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

from proxy.settings.units import parse_duration
from tests.support.fake_openai import FakeOpenAI
from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "openai-failover.yaml"
SCALE = 10
P, F1, F2, LONG = "anthropic/claude-sonnet-4.5", "openai/gpt-4.1-mini", "google/gemini-2.5-flash", "google/gemini-2.5-pro"
SLACK = 6.0  # seconds a loaded machine may add to a budget


def scaled_config(fake_url: str) -> tuple[str, dict, dict]:
    """The shipped config, pointed at the fake, its timeouts and breaker reset divided by SCALE."""
    cfg = yaml.safe_load(CONFIG.read_text())
    up = cfg["upstreams"]["openrouter"]
    up["listen"] = f"127.0.0.1:{free_port()}"
    up["targets"] = [{"name": "stable", "url": fake_url}]
    up.pop("request_headers")  # the key file is the pod's; the fake asks for none
    up["timeouts"] = {k: f"{parse_duration(v) / SCALE}s" for k, v in up["timeouts"].items()}
    up["breaker"]["reset_timeout"] = f"{parse_duration(up['breaker']['reset_timeout']) / SCALE}s"
    cfg["admin"]["listen"] = f"127.0.0.1:{free_port()}"
    cfg["log"] = {"level": "warning", "access": False}
    scaled = {k: float(v[:-1]) for k, v in up["timeouts"].items()}
    scaled["reset"] = float(up["breaker"]["reset_timeout"][:-1])
    return "openrouter", cfg, scaled


@dataclass
class Fault:
    name: str
    what: str
    setup: Callable[[FakeOpenAI], None]
    attempts: dict[str, tuple[int, int]]       # model → (min, max) requests it gets
    budget: Callable[[dict], float]            # seconds, from the scaled timeouts
    stream: bool = True
    answer: str = "complete"                   # complete | provider_error
    requests: int = 1                          # app requests, one every `every` seconds
    every: float = 0.0
    expect_model: str | None = None            # the model that answers (the last request)
    rescue: str = ""                           # what the proxy does, for the table
    heals: float | None = None                 # the primary heals this long after the start
    stays_down: bool = False                   # the primary is still failing at the end (its breaker open)


def _set(**attrs):
    def setup(fake: FakeOpenAI) -> None:
        for k, v in attrs.items():
            setattr(fake, k, v(fake) if callable(v) else v)
    return setup


FAULTS = [
    Fault("429_retry_after_once", "429 with Retry-After: 2, once", _set(fail_all=429, retry_after="2", fail_first=1),
          {P: (2, 2)}, lambda t: 2.0 + SLACK, stream=False, expect_model=P,
          rescue="waits the stated 2 s, asks the same model again"),
    Fault("429_persistent", "429 without Retry-After, persistent", _set(rate_limit_models={P}),
          {P: (1, 2), F1: (1, 1)}, lambda t: 1.0 + SLACK, expect_model=F1,
          rescue="one jittered retry, then the next model"),
    Fault("500_once", "500, once", _set(fail_all=500, fail_first=1),
          {P: (1, 1), F1: (1, 1)}, lambda t: SLACK, stream=False, expect_model=F1,
          rescue="the next model at once (500 is not in retry.on)"),
    Fault("503_persistent", "503, persistent (6 requests)", _set(fail_models={P}, fail_status=503),
          {P: (3, 5), F1: (6, 6)}, lambda t: 6 * 1.0 + SLACK, requests=6, expect_model=F1, stays_down=True,
          rescue="3 attempts, then the next model; the model's breaker opens at 5 failures and later requests skip it"),
    Fault("reset_once", "TCP reset before the headers, once", _set(reset_first=1),
          {P: (2, 2)}, lambda t: SLACK, stream=False, expect_model=P,
          rescue="retried on the same model (a connection failure is the target's)"),
    Fault("no_response", "no response at all", _set(hang_models={P}),
          {P: (1, 1), F1: (1, 1)}, lambda t: t["first_byte"] + SLACK, expect_model=F1,
          rescue="one first_byte timeout, then the next model at once"),
    Fault("first_token_late", "first token after a long delay (keep-alive comments meanwhile)",
          _set(first_delay=5.0, comments=True, fault_models={P}),
          {P: (1, 1), F1: (1, 1)}, lambda t: t["first_byte"] + SLACK, expect_model=F1,
          rescue="comments do not count as the first byte: the next model after first_byte"),
    Fault("cut_40_of_60", "stream cut after 40 of 60 tokens", _set(chunks=60, cut_after=40, fault_times=1),
          {P: (2, 2)}, lambda t: SLACK, expect_model=P,
          rescue="continued on the same model with the 40 tokens as a prefill"),
    Fault("stall_after_20", "stream stalled after 20 tokens", _set(chunks=60, stall_after=20, fault_times=1),
          {P: (2, 2)}, lambda t: t["idle"] + SLACK, expect_model=P,
          rescue="after the idle timeout, continued on the same model"),
    Fault("malformed_event", "a malformed event mid-stream", _set(chunks=60, malformed_after=30, fault_times=1),
          {P: (2, 2)}, lambda t: SLACK, expect_model=P,
          rescue="the event is held back, the answer continued"),
    Fault("no_done", "no data: [DONE]", _set(stream_done=False),
          {P: (1, 1)}, lambda t: SLACK, expect_model=P,
          rescue="whole (every choice finished): [DONE] added, a success"),
    Fault("context_length", "400 context length exceeded", _set(context_limit_models={P}),
          {P: (1, 1), LONG: (1, 1)}, lambda t: SLACK, expect_model=LONG,
          rescue="the larger-context model (llm.context_fallback_models), never the same one again"),
    Fault("content_filter", "400 content filter", _set(content_filter=True),
          {P: (1, 1)}, lambda t: SLACK, answer="provider_error",
          rescue="the provider's error, unchanged, after one attempt"),
    Fault("cut_fallback_no_prefill", "primary cut mid-stream, then down; the first fallback rejects prefill",
          _set(chunks=60, cut_after=40, fault_models={P}, fail_after_fault=True, fail_status=503,
               no_prefill_models={F1}),
          {P: (2, 4), F1: (1, 1), F2: (1, 1)}, lambda t: SLACK,
          rescue="continued on the second fallback; the prefill refusal is learnt, never shown"),
    Fault("down_then_healthy", "primary down ~8 s then healthy, a request every second",
          _set(fail_models={P}, fail_status=503, fail_until=lambda f: time.monotonic() + 8.0),
          {P: (6, 14), F1: (4, 12)}, lambda t: 14 * 1.0 + 14 * 0.5 + SLACK, requests=14, every=1.0, expect_model=P,
          heals=8.0,
          rescue="the fallback while the primary's breaker is open; back to the primary within one reset interval"),
    Fault("503_fallback_answers", "503 primary whose fallback answers", _set(fail_models={P}, fail_status=503),
          {P: (3, 3), F1: (1, 1)}, lambda t: SLACK, stream=False, expect_model=F1,
          rescue="3 attempts on the primary, then the fallback"),
]


async def _ask(c: openai.AsyncOpenAI, question: list[dict], stream: bool) -> tuple[str, str]:
    """→ (the answer's text, the model named in it)."""
    if stream:
        text, model = [], None
        async for ch in await c.chat.completions.create(model=P, messages=question, stream=True):
            model = model or ch.model
            if ch.choices:
                text.append(ch.choices[0].delta.content or "")
        return "".join(text), model
    r = await c.chat.completions.create(model=P, messages=question)
    return r.choices[0].message.content, r.model


def _retry_after_respected(fake: FakeOpenAI) -> bool:
    """No model was asked again sooner than a Retry-After it stated."""
    stated = [(m, t, float(fake.retry_after)) for m, t, what in fake.attempts if what == "429" and fake.retry_after]
    asked = [(r["body"]["model"], r["t"]) for r in fake.requests]
    return all(not (m2 == m and t < t2 < t + ra - 0.05) for m, t, ra in stated for m2, t2 in asked)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_provider_fault(fault: Fault, aiohttp_server, start_proxy):
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app())
    fake.url = f"http://127.0.0.1:{server.port}"
    name, cfg, t = scaled_config(fake.url)
    p = await start_proxy(cfg, name=name)
    fault.setup(fake)
    c = openai.AsyncOpenAI(base_url=p.url + "/api/v1", api_key="placeholder", max_retries=0)
    start = time.monotonic()
    answered = []
    for i in range(fault.requests):
        if i and fault.every:
            await asyncio.sleep(max(0.0, start + i * fault.every - time.monotonic()))
        question = [{"role": "user", "content": f"{fault.name} {i}"}]
        if fault.answer == "provider_error":
            with pytest.raises(openai.BadRequestError) as ei:
                await _ask(c, question, fault.stream)
            assert ei.value.code == "content_policy_violation"
            continue
        text, model = await _ask(c, question, fault.stream)
        assert text == fake.content({"messages": question}), f"request {i}: not the complete canonical answer"
        answered.append(model)
    wall = time.monotonic() - start
    per_model: dict[str, int] = {}
    for r in fake.requests:
        per_model[r["body"]["model"]] = per_model.get(r["body"]["model"], 0) + 1
    for model, (lo, hi) in fault.attempts.items():
        assert lo <= per_model.get(model, 0) <= hi, f"{model}: {per_model.get(model, 0)} attempts, bounds {lo}-{hi}"
    assert set(per_model) <= set(fault.attempts), f"models asked beyond the expected: {per_model}"
    assert _retry_after_respected(fake)
    if fault.expect_model:
        assert answered[-1] == fault.expect_model
    if fault.heals is not None:
        # traffic is back on the primary within one reset interval of its healing (plus a request gap)
        back = [m for i, m in enumerate(answered) if i * fault.every >= fault.heals + t["reset"] + fault.every]
        assert back and set(back) == {P}, answered
        assert F1 in answered[: int(fault.heals / fault.every)], "the fallback answered while the primary was down"
    assert wall <= fault.budget(t), f"{wall:.1f} s, budget {fault.budget(t):.1f} s"
    # healthy afterwards: ready, the track's breaker closed, a fresh answer from the primary once healed
    async with aiohttp.ClientSession() as s, s.get(p.admin + "/health/ready") as r:
        assert r.status == 200
    assert p.breaker.state == "closed"
    opened = {m for m, b in p.upstream.targets[0].models.items() if b.state != "closed"}
    assert opened == ({P} if fault.stays_down else set()), f"model breakers not closed: {opened}"
    _record(fault, per_model, wall)


def _record(fault: Fault, per_model: dict[str, int], wall: float) -> None:
    out = os.environ.get("LLM_FAULTS_OUT")
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": fault.name, "what": fault.what, "rescue": fault.rescue,
                                "requests": fault.requests, "attempts": per_model, "wall": round(wall, 2),
                                "stream": fault.stream}) + "\n")
