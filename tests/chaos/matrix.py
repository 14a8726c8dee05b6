"""The chaos matrix: every toxiproxy fault against every kind of upstream, each cell with its steady-state
hypothesis written down before the fault is run (STEADY_STATE), and the same table rendered into
docs/reliability.md from what the last run observed (`python -m tests.chaos.matrix` runs it and writes
the page). tests/chaos/test_matrix.py drives the cells.

What every cell holds, whatever the fault:
* every client request ends within the total timeout plus slack, with an answer of the kind the cell
  allows (fresh, the documented fallback, the documented error) — never a hang, a 500 or a crash;
* the client's count of answers equals the proxy's `upstream_requests_total`, and so do the fallbacks;
* writes acknowledged to the client are present upstream after healing; writes answered with an error
  were applied at most once;
* after healing, fresh answers again, and the process's fds, asyncio tasks and upstream connections
  are back at their baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TOTAL = 2.0   # seconds: the total timeout of every cell
ATTEMPT = 0.5
SLACK = 5.0   # a loaded machine answers late; no fault below ends on its own within TOTAL + SLACK

# toxic → (toxiproxy toxics to add: (type, attributes); None = the link disabled), what it models
TOXICS: dict[str, tuple[list[tuple[str, dict]] | None, str]] = {
    "latency": ([("latency", {"latency": 200, "jitter": 50})], "200 ms ± 50 on every answer"),
    "latency_over_attempt": ([("latency", {"latency": 3000})], "3 s: above the attempt timeout"),
    "down": (None, "the link disabled: connections refused"),
    "reset_peer": ([("reset_peer", {"timeout": 0})], "TCP RST as data arrives"),
    "timeout": ([("timeout", {"timeout": 0})], "black hole: data dropped, the connection held"),
    "slicer": ([("slicer", {"average_size": 8, "size_variation": 4, "delay": 200})], "answers in 8-byte slices"),
    "bandwidth": ([("bandwidth", {"rate": 1})], "1 KB/s"),
    "limit_data": ([("limit_data", {"bytes": 0})], "the connection closed mid-answer"),  # bytes set per kind
    "slow_close": ([("slow_close", {"delay": 1000})], "the close delayed by 1 s"),
}

KINDS = ("http", "openai", "openai_stream", "redis")

# Where limit_data cuts, per kind: inside the first answer's body, past its head.
LIMIT_BYTES = {"http": 190, "openai": 260, "openai_stream": 400, "redis": 80}

# The steady-state hypothesis, per (toxic, kind): the answers a read and a write may get while the fault
# lasts. ok = a fresh answer; fallback = the documented stale/cached answer; error = the documented error
# (HTTP 502/503/504 with X-Proxy-Error, `-UNAVAILABLE … (<reason>)` on Redis, an SSE error event after
# the first byte). The LLM path has no writes.
ANY_FAILURE = {"read": {"fallback", "error"}, "write": {"error"}}
FRESH = {"read": {"ok"}, "write": {"ok"}}
STEADY_STATE: dict[str, dict[str, dict[str, set[str]]]] = {
    "latency": {k: FRESH for k in KINDS},
    "latency_over_attempt": {k: {"read": {"fallback"}, "write": {"error"}} for k in KINDS},
    "down": {k: {"read": {"fallback"}, "write": {"error"}} for k in KINDS},
    "reset_peer": {k: {"read": {"fallback"}, "write": {"error"}} for k in KINDS},
    "timeout": {k: {"read": {"fallback"}, "write": {"error"}} for k in KINDS},
    "slicer": {k: FRESH for k in KINDS},
    # 1 KB/s: a small answer (~300 B) is late but within the attempt timeout; a larger one is not
    "bandwidth": {"http": {"read": {"ok", "fallback"}, "write": {"ok", "error"}},
                  "openai": {"read": {"ok", "fallback"}, "write": set()},
                  "openai_stream": {"read": {"ok", "fallback", "error"}, "write": set()},
                  "redis": {"read": {"ok", "fallback"}, "write": {"ok", "error"}}},
    # cut mid-body: a body not yet sent to the client is retried or falls back; once the client has the
    # first bytes the cut is an error (truncated body, SSE error event)
    # what fits under the limit on a connection is answered fresh; a read whose answer is cut on the proxy's
    # side of the wire is retried or served stale (Redis) or a 502 `upstream_reset` (HTTP: the upstream's
    # head had arrived), a write an error
    "limit_data": {"http": {"read": {"ok", "fallback", "error"}, "write": {"ok", "error"}},
                   "openai": {"read": {"ok", "fallback", "error"}, "write": set()},
                   "openai_stream": {"read": {"ok", "fallback", "error"}, "write": set()},
                   "redis": {"read": {"ok", "fallback"}, "write": {"ok", "error"}}},
    "slow_close": {k: FRESH for k in KINDS},
}

for _cells in STEADY_STATE.values():  # the LLM path has no writes
    for _k in ("openai", "openai_stream"):
        _cells[_k] = {"read": _cells[_k]["read"], "write": set()}

RESULTS_ENV = "RELIABILITY_JSON"


def record(cell: dict) -> None:
    """Append one cell's observations to the results file, when a run asked for one."""
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(cell) + "\n")


def _fmt(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "—"


def render(cells: list[dict]) -> str:
    by = {(c["toxic"], c["kind"]): c for c in cells}
    out = ["# Reliability: the chaos matrix", "",
           "Generated by `python -m tests.chaos.matrix` from a run of `tests/chaos/test_matrix.py` (a real "
           "toxiproxy between the proxy and a real upstream: an aiohttp server, the fake OpenAI-compatible "
           "server, a redis-server). Do not edit by hand.", "",
           f"Every cell: total timeout {TOTAL:g} s, attempt {ATTEMPT:g} s. A cell passes when every request "
           f"ended within {TOTAL:g} s + {SLACK:g} s of slack with an answer its hypothesis allows, the client's "
           "counts equal the proxy's counters, acknowledged writes are present upstream after healing and "
           "failed writes were applied at most once, and fds, asyncio tasks and upstream connections are back "
           "at their baseline after healing.", "",
           "| fault | upstream | hypothesis (read / write) | observed reads | observed writes | slowest answer | result |",
           "|---|---|---|---|---|---|---|"]
    for toxic, (_, what) in TOXICS.items():
        for kind in KINDS:
            hyp = STEADY_STATE[toxic][kind]
            h = " / ".join("\u2205" if not hyp[w] else "|".join(sorted(hyp[w])) for w in ("read", "write"))
            c = by.get((toxic, kind))
            if c is None:
                out.append(f"| {toxic} ({what}) | {kind} | {h} | not run | | | |")
                continue
            out.append(f"| {toxic} ({what}) | {kind} | {h} | {_fmt(c['reads'])} | {_fmt(c['writes'])} | "
                       f"{c['slowest']:.2f} s | {'pass' if c['passed'] else 'FAIL'} |")
    out += ["", "Regenerate: `python -m tests.chaos.matrix` (about three minutes; needs the tools `make test` "
            "needs)."]
    return "\n".join(out) + "\n"


def main() -> int:
    root = Path(__file__).resolve().parents[2]
    results = root / ".reliability.jsonl"
    results.unlink(missing_ok=True)
    env = {**os.environ, RESULTS_ENV: str(results)}
    tools = subprocess.run(["bash", "scripts/tools.sh"], cwd=root, capture_output=True, text=True, check=True)
    env["PATH"] = tools.stdout.strip() + os.pathsep + env.get("PATH", "")
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/chaos/test_matrix.py"], cwd=root, env=env)
    cells = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    (root / "docs" / "reliability.md").write_text(render(cells))
    results.unlink(missing_ok=True)
    print(f"docs/reliability.md: {len(cells)} cells, pytest exit {rc}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
