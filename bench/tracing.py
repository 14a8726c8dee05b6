"""`python -m bench tracing [--seconds N] [--rounds N]`: what OpenTelemetry tracing costs — the same proxy
(the full HTTP chain of bench/peers.py) with tracing off, on at 1% sampling and on at 100%, exporting to a
real OpenTelemetry Collector (scripts/otelcol.sh, on the load core), side by side in one run with
interleaved rounds (A B C A B C …). Reports requests/s at 64 connections, CPU per request, p50/p99 at
one connection, the spans the Collector received and any the proxy dropped; ratios against tracing off.
Writes bench/results/<date>-tracing.md and .json."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import load, peers
from bench.peers import LOAD_CORE, ROOT, Proc, free_port


def collector(tmp: Path) -> tuple[Proc, int, Path]:
    binary = subprocess.run(["bash", str(ROOT / "scripts/otelcol.sh")], check=True, capture_output=True,
                            text=True).stdout.strip()
    port, out = free_port(), tmp / "spans.jsonl"
    cfg = tmp / "otelcol.json"
    cfg.write_text(json.dumps({
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}"}}}},
        "exporters": {"file": {"path": str(out), "flush_interval": "1s"}},
        "service": {"telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
                    "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file"]}}}}))
    return Proc("otelcol", [binary, "--config", f"file:{cfg}"], port, LOAD_CORE), port, out


def spans_received(path: Path) -> int:
    n = 0
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                for rs in json.loads(line).get("resourceSpans", []):
                    for ss in rs.get("scopeSpans", []):
                        n += len(ss.get("spans", []))
    return n


def dropped(admin: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        return sum(float(line.split()[-1]) for line in r.read().decode().splitlines()
                   if line.startswith("tracing_spans_dropped_total"))


def run(seconds: float, rounds: int, out_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as d:
        tmp = Path(d)
        up, ports = peers.nginx_upstream(tmp)
        col, col_port, spans_file = collector(tmp)
        systems: dict[str, tuple[Proc, dict]] = {}
        try:
            endpoint = f"http://127.0.0.1:{col_port}"
            for name, tracing in (("off", None), ("1%", 0.01), ("100%", 1.0)):
                sub = tmp / name.replace("%", "pct")
                sub.mkdir()
                p, info = peers.proxy(sub, ports, name=f"proxy-tracing-{name.replace('%', 'pct')}",
                                      tracing=None if tracing is None else {
                                          "enabled": True, "endpoint": endpoint, "sample_ratio": tracing})
                systems[name] = (p, info)
            urls = {n: f"http://127.0.0.1:{info['port']}/item" for n, (_, info) in systems.items()}
            res: dict = {"rps": {n: [] for n in urls}, "cpu_us": {n: [] for n in urls},
                         "p50_1conn": {n: [] for n in urls}, "p99_1conn": {n: [] for n in urls}, "invalid": []}
            for n in urls:
                load.wrk(urls[n], 8, 1)
            for r in range(rounds):
                for n, url in urls.items():
                    print(f"tracing round {r + 1}/{rounds}: {n}", flush=True)
                    pid = systems[n][0].pid
                    before = peers.cpu_seconds(pid)
                    o = load.wrk(url, 64, seconds)
                    if o["requests"]:
                        res["cpu_us"][n].append((peers.cpu_seconds(pid) - before) / o["requests"] * 1e6)
                    res["rps"][n].append(o["rps"])
                    if not o["valid"]:
                        res["invalid"].append((n, "64conn", o))
                    o = load.wrk(url, 1, seconds, latency=True)
                    res["p50_1conn"][n].append(o["p50"])
                    res["p99_1conn"][n].append(o["p99"])
            time.sleep(3)  # the exporters' last batches (1 s schedule) and the Collector's flush
            res["spans_received"] = spans_received(spans_file)
            res["spans_dropped"] = {n: dropped(info["admin"]) for n, (_, info) in systems.items()}
        finally:
            for p, _ in systems.values():
                p.stop()
            col.stop()
            up.stop()
    return res


def report(res: dict, seconds: float, rounds: int, out_dir: Path) -> Path:
    med = {k: {n: statistics.median(v) for n, v in res[k].items() if v} for k in ("rps", "cpu_us", "p50_1conn", "p99_1conn")}
    stamp = time.strftime("%Y%m%dT%H%M%S")
    lines = [f"# Tracing cost ({stamp})", "",
             f"`python -m bench tracing --seconds {seconds:g} --rounds {rounds}`: the full HTTP chain, tracing off / on "
             "at 1% / on at 100%, exporting over OTLP http/protobuf to a real OpenTelemetry Collector v0.161.0 on the "
             "load core; wrk at 64 connections and at 1; rounds interleaved; medians, ratios against off.", "",
             "| tracing | requests/s (64 conns) | vs off | CPU µs/request | vs off | p50 1 conn (ms) | p99 1 conn (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for n in ("off", "1%", "100%"):
        rps, cpu = med["rps"].get(n), med["cpu_us"].get(n)
        lines.append(f"| {n} | {rps:,.0f} | {rps / med['rps']['off']:.2f}× | {cpu:.1f} | {cpu / med['cpu_us']['off']:.2f}× | "
                     f"{med['p50_1conn'][n] * 1000:.2f} | {med['p99_1conn'][n] * 1000:.2f} |")
    lines += ["", f"Spans the Collector received: {res['spans_received']:,}; dropped by the proxies "
                  f"(tracing_spans_dropped_total): {res['spans_dropped']}.",
              f"Per round: {json.dumps({k: res[k] for k in ('rps', 'cpu_us')})}",
              "", "Invalid runs: " + (json.dumps(res["invalid"]) if res["invalid"] else "none")]
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stamp}-tracing.md"
    md.write_text("\n".join(lines) + "\n")
    (out_dir / f"{stamp}-tracing.json").write_text(json.dumps(res, indent=1, default=str))
    return md


def main(argv: list[str]) -> int:
    import os

    ap = argparse.ArgumentParser(prog="python -m bench tracing")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    res = run(args.seconds, args.rounds, Path(args.out))
    md = report(res, args.seconds, args.rounds, Path(args.out))
    print(md.read_text())
    return 1 if res["invalid"] or not res["spans_received"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
