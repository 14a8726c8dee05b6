"""Load generators, pinned to the load core: wrk (throughput and latency at fixed concurrency), vegeta
(fixed-rate latency), redis-benchmark. Each returns plain numbers; a run with non-2xx answers is invalid."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from bench.peers import LOAD_CORE, ROOT

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _dur(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, conns: int, seconds: float, latency: bool = False) -> dict:
    cmd = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conns}", f"-d{max(1, int(seconds))}s", "--timeout", "5s"]
    if latency:
        cmd.append("--latency")
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)) else 0
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    res = {"rps": rps, "non2xx": non2xx, "socket_errors": errors, "valid": non2xx == 0 and errors == 0}
    if latency:
        for q in ("50", "99"):
            m = re.search(rf"\s{q}%\s+([\d.]+(?:us|ms|s))", out)
            res[f"p{q}"] = _dur(m.group(1)) if m else None
    return res


def vegeta_bin() -> str | None:
    for c in (shutil.which("vegeta"), ROOT / ".tools/bin/vegeta"):
        if c and Path(c).exists():
            return str(c)
    return None


def vegeta(url: str, rate: int, seconds: float) -> dict | None:
    binary = vegeta_bin()
    if binary is None:
        return None
    attack = subprocess.run(["taskset", "-c", LOAD_CORE, binary, "attack", f"-rate={rate}", f"-duration={int(seconds)}s",
                             "-keepalive=true", "-workers=8"], input=f"GET {url}\n".encode(), capture_output=True,
                            timeout=seconds + 60)
    rep = subprocess.run([binary, "report", "-type=json"], input=attack.stdout, capture_output=True, timeout=60)
    data = json.loads(rep.stdout)
    enc = subprocess.run([binary, "encode", "--to", "csv"], input=attack.stdout, capture_output=True, timeout=60)
    raw = sorted(int(line.split(",")[2]) / 1e9 for line in enc.stdout.decode().splitlines() if line.count(",") >= 2)
    lat = data["latencies"]
    codes = data.get("status_codes", {})
    p999 = raw[int(0.999 * (len(raw) - 1))] if raw else None
    return {"p50": lat["50th"] / 1e9, "p99": lat["99th"] / 1e9, "p999": p999, "success": data["success"],
            "valid": set(codes) <= {"200"},
            "rate": data["rate"], "latencies": raw}


def redis_benchmark(port: int, tests: str, requests: int, clients: int = 50, pipeline: int = 1) -> dict:
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "redis-benchmark", "-p", str(port), "-t", tests, "-n", str(requests),
                          "-c", str(clients), "-P", str(pipeline), "-q", "--csv"], capture_output=True, text=True,
                         timeout=300).stdout
    res = {}
    for line in out.splitlines():
        parts = [p.strip('"') for p in line.split(",")]
        if len(parts) >= 2 and parts[0] in ("GET", "SET"):
            res[parts[0]] = float(parts[1])
    return res
