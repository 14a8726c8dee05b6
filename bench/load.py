"""Load generators, pinned to the load core: wrk (throughput and latency at fixed concurrency), vegeta
(fixed-rate latency), redis-benchmark. Each returns plain numbers; a run with non-2xx answers is invalid."""

from __future__ import annotations

import json
import re
import subprocess

from bench import peers
from bench.peers import LOAD_CORE

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


class ParseError(RuntimeError):
    """A load generator's output that is not what its parser knows: the run proves nothing."""


def _dur(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ParseError(f"not a duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str, latency: bool = False) -> dict:
    """wrk's report → rps, non-2xx answers, socket errors, validity (and p50/p99 with --latency)."""
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise ParseError(f"wrk printed no Requests/sec: {out.strip()[:200]!r}")
    rps = float(m.group(1))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)) else 0
    errors = 0
    if (m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)):
        errors = sum(int(x) for x in m.groups())
    requests = int(m.group(1)) if (m := re.search(r"(\d+) requests in", out)) else 0
    res = {"rps": rps, "requests": requests, "non2xx": non2xx, "socket_errors": errors,
           "valid": non2xx == 0 and errors == 0 and requests > 0}
    if latency:
        for q in ("50", "99"):
            m = re.search(rf"\s{q}%\s+([\d.]+(?:us|ms|s))", out)
            if m is None:
                raise ParseError(f"wrk --latency printed no {q}% line")
            res[f"p{q}"] = _dur(m.group(1))
    return res


def wrk(url: str, conns: int, seconds: float, latency: bool = False) -> dict:
    cmd = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conns}", f"-d{max(1, int(seconds))}s", "--timeout", "5s"]
    if latency:
        cmd.append("--latency")
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 30)
    return parse_wrk(out.stdout + out.stderr, latency)


def vegeta_bin() -> str | None:
    return peers.tool("vegeta")


def parse_vegeta(report: str | bytes, csv: str) -> dict:
    """`vegeta report -type=json` and `vegeta encode --to csv` → latencies (seconds), validity."""
    try:
        data = json.loads(report)
        lat = data["latencies"]
        raw = sorted(int(line.split(",")[2]) / 1e9 for line in csv.splitlines() if line.count(",") >= 2)
        codes = data.get("status_codes") or {}
        out = {"p50": lat["50th"] / 1e9, "p99": lat["99th"] / 1e9, "success": data["success"],
               "requests": data["requests"], "rate": data["rate"], "errors": data.get("errors") or [],
               "latencies": raw}
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ParseError(f"vegeta's report: {type(exc).__name__}: {exc}") from None
    out["p999"] = raw[int(0.999 * (len(raw) - 1))] if raw else None
    out["valid"] = bool(codes) and set(codes) <= {"200"} and not out["errors"] and out["requests"] > 0
    return out


def vegeta(url: str, rate: int, seconds: float) -> dict | None:
    binary = vegeta_bin()
    if binary is None:
        return None
    attack = subprocess.run(["taskset", "-c", LOAD_CORE, binary, "attack", f"-rate={rate}", f"-duration={int(seconds)}s",
                             "-keepalive=true", "-workers=8"], input=f"GET {url}\n".encode(), capture_output=True,
                            timeout=seconds + 60)
    rep = subprocess.run([binary, "report", "-type=json"], input=attack.stdout, capture_output=True, timeout=60)
    enc = subprocess.run([binary, "encode", "--to", "csv"], input=attack.stdout, capture_output=True, timeout=60)
    return parse_vegeta(rep.stdout, enc.stdout.decode())


def parse_redis_benchmark(out: str, tests: str) -> dict:
    """`redis-benchmark --csv` → requests/s per test; every test asked for must be there."""
    res = {}
    for line in out.splitlines():
        parts = [p.strip('"') for p in line.split(",")]
        if len(parts) >= 2 and parts[0] in ("GET", "SET"):
            try:
                res[parts[0]] = float(parts[1])
            except ValueError:
                raise ParseError(f"redis-benchmark: {line!r}") from None
    missing = [t.upper() for t in tests.split(",") if t.upper() not in res]
    if missing:
        raise ParseError(f"redis-benchmark printed no result for {', '.join(missing)}: {out.strip()[:200]!r}")
    return res


def redis_benchmark(port: int, tests: str, requests: int, clients: int = 50, pipeline: int = 1) -> dict:
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "redis-benchmark", "-p", str(port), "-t", tests, "-n", str(requests),
                          "-c", str(clients), "-P", str(pipeline), "-q", "--csv"], capture_output=True, text=True,
                         timeout=300)
    return parse_redis_benchmark(out.stdout + out.stderr, tests)
