"""The benchmark's parsers on outputs recorded from the real tools (tests/unit/bench/recorded/): wrk
with and without --latency, with non-2xx answers, socket errors and a refused connection; vegeta's
JSON report and CSV; redis-benchmark's CSV and its refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.load import ParseError, parse_redis_benchmark, parse_vegeta, parse_wrk

REC = Path(__file__).parent / "recorded"


def rec(name: str) -> str:
    return (REC / name).read_text()


def test_wrk_throughput():
    r = parse_wrk(rec("wrk.txt"))
    assert r == {"rps": 198662.17, "requests": 218407, "non2xx": 0, "socket_errors": 0, "valid": True}


def test_wrk_latency_distribution():
    r = parse_wrk(rec("wrk-latency.txt"), latency=True)
    assert (r["rps"], r["valid"]) == (14374.66, True)
    assert r["p50"] == pytest.approx(71e-6) and r["p99"] == pytest.approx(315e-6)


def test_wrk_non_2xx_answers_make_the_run_invalid():
    r = parse_wrk(rec("wrk-non2xx.txt"))
    assert (r["non2xx"], r["valid"]) == (216882, False)


def test_wrk_socket_errors_make_the_run_invalid():
    r = parse_wrk(rec("wrk-socket-errors.txt"))
    assert (r["socket_errors"], r["requests"], r["valid"]) == (34085, 0, False)


def test_wrk_that_could_not_connect_is_a_parse_error():
    with pytest.raises(ParseError, match="unable to connect"):
        parse_wrk(rec("wrk-refused.txt"))


def test_wrk_latency_asked_but_missing_is_a_parse_error():
    with pytest.raises(ParseError, match="50%"):
        parse_wrk(rec("wrk.txt"), latency=True)


def test_vegeta_report_and_csv():
    r = parse_vegeta(rec("vegeta-report.json"), rec("vegeta.csv"))
    assert r["valid"] is True and r["requests"] == 200 and r["success"] == 1
    assert r["p50"] == pytest.approx(256513e-9) and r["p99"] == pytest.approx(480563e-9)
    assert len(r["latencies"]) == 50 and r["latencies"] == sorted(r["latencies"])  # the recorded 50 lines
    assert r["latencies"][-1] == pytest.approx(756624e-9) and r["p999"] == r["latencies"][48]


def test_vegeta_non_200_answers_make_the_run_invalid():
    r = parse_vegeta(rec("vegeta-report-503.json"), "")
    assert r["valid"] is False and r["errors"] == ["503 Service Temporarily Unavailable"] and r["p999"] is None


@pytest.mark.parametrize("report", ["", "{}", "not json", '{"latencies": {}}'])
def test_vegeta_garbage_is_a_parse_error(report):
    with pytest.raises(ParseError):
        parse_vegeta(report, "")


def test_redis_benchmark_csv():
    assert parse_redis_benchmark(rec("redis-benchmark.csv"), "get,set") == {"SET": 124999.99, "GET": 111111.12}


def test_redis_benchmark_missing_a_test_is_a_parse_error():
    with pytest.raises(ParseError, match="GET"):
        parse_redis_benchmark(rec("redis-benchmark-refused.csv"), "get")
    with pytest.raises(ParseError, match="SET"):
        parse_redis_benchmark('"GET","10.0"\n', "get,set")
