"""Results → bench/results/<date>.md (tables), .json (raw numbers and machine info) and PNG plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path


def med(xs):
    xs = [x for x in xs or [] if x is not None]
    return statistics.median(xs) if xs else None


def rng(xs):
    xs = [x for x in xs or [] if x is not None]
    return (min(xs), max(xs)) if xs else (None, None)


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception:
            return None

    from proxy import __version__

    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "resilience-proxy": __version__, "nginx": version(["nginx", "-v"]) or version(["sh", "-c", "nginx -v 2>&1"]),
            "haproxy": version(["haproxy", "-v"]), "redis": version(["redis-server", "--version"]),
            "wrk": version(["sh", "-c", "wrk -v 2>&1"])}


def targets(r: dict) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, ratio text, met)."""
    out = []
    t = r.get("throughput")
    if t:
        rps = {n: med(v) for n, v in t["rps"].items()}
        px = rps["resilience-proxy"]
        naive = px / rps["naive-aiohttp"]
        out.append(("S1 ≥ 2.0× naive aiohttp", f"{px:,.0f} vs {rps['naive-aiohttp']:,.0f} rps", f"{naive:.2f}×", naive >= 2.0))
        if rps.get("caddy"):
            c = px / rps["caddy"]
            out.append(("S1 ahead of Caddy", f"{px:,.0f} vs {rps['caddy']:,.0f} rps", f"{c:.2f}×", c > 1.0))
        d = med(t["p50_1conn"]["direct"])
        added_px = med(t["p50_1conn"]["resilience-proxy"]) - d
        added_ng = med(t["p50_1conn"]["nginx"]) - d
        out.append(("S2 added p50 (1 conn) ≤ 1.5× nginx's", f"+{added_px * 1e6:.0f} µs vs +{added_ng * 1e6:.0f} µs",
                    f"{added_px / added_ng:.2f}×" if added_ng > 0 else "n/a",
                    added_px <= 1.5 * added_ng if added_ng > 0 else None))
        fx = t.get("fixed_1000rps") or {}
        if fx.get("resilience-proxy") and fx.get("direct"):
            a = fx["resilience-proxy"]["p99"] - fx["direct"]["p99"]
            out.append(("S2 added p99 at 1,000 rps < 1 ms", f"+{a * 1e3:.2f} ms", "", a < 0.001))
        ob = med(t.get("open_breaker_rps"))
        if ob:
            out.append(("S3 open breaker ≥ 3× S1", f"{ob:,.0f} vs {px:,.0f} rps", f"{ob / px:.2f}×", ob >= 3 * px))
    s = r.get("sse")
    if s:
        added = med(s["ttfc"]["resilience-proxy"]) - med(s["ttfc"]["direct"])
        out.append(("S4 added time to first chunk < 1 ms (p50)", f"+{added * 1e3:.2f} ms", "", added < 0.001))
    rd = r.get("redis")
    if rd:
        g = med(rd["resilience-proxy"]["GET"]) / med(rd["direct"]["GET"])
        out.append(("S5 GET ≥ 0.6× direct Redis", f"{med(rd['resilience-proxy']['GET']):,.0f} vs {med(rd['direct']['GET']):,.0f}",
                    f"{g:.2f}×", g >= 0.6))
        pp = med(rd["resilience-proxy"]["GET_P16"]) / med(rd["resilience-proxy"]["GET"])
        out.append(("S5 pipelined not below unpipelined", f"{med(rd['resilience-proxy']['GET_P16']):,.0f} vs "
                    f"{med(rd['resilience-proxy']['GET']):,.0f}", f"{pp:.2f}×", pp >= 1.0))
    m = r.get("memory")
    if m:
        out.append(("S7 RSS idle ≤ 50 MB", f"{m['idle_mb']:.1f} MB", "", m["idle_mb"] <= 50))
        out.append(("S7 ≤ 120 MB with 10k entries + 1k conns", f"{m['cache_10k_plus_1k_conns_mb']:.1f} MB", "",
                    m["cache_10k_plus_1k_conns_mb"] <= 120))
    return out


def markdown(r: dict) -> str:
    lines = [f"# Benchmark {r['started']}", "", f"Command: `{r['command']}` — mode: {r['mode']}", "",
             "Machine: " + ", ".join(f"{k}: {v}" for k, v in r["machine"].items() if v), "",
             "The proxy and every peer pinned to core 0; the load generator and the upstream to core 1; rounds "
             "interleaved; medians with min–max. Ratios are from this run only.", "", "## Targets", "",
             "| target | measured | ratio | met |", "|---|---|---|---|"]
    for name, measured, ratio, met in targets(r):
        lines.append(f"| {name} | {measured} | {ratio} | {'yes' if met else 'no' if met is False else '—'} |")
    t = r.get("throughput")
    if t:
        lines += ["", "## 1–2. HTTP (small JSON answer; the full chain on: breaker, retry, timeouts, cache, metrics, two tracks)", "",
                  "| system | rps @64 conns (min–max) | p50 @1 conn | p99 @1 conn |", "|---|---|---|---|"]
        for n in t["rps"]:
            lo, hi = rng(t["rps"][n])
            p50, p99 = med(t["p50_1conn"][n]), med(t["p99_1conn"][n])
            lines.append(f"| {n} | {med(t['rps'][n]):,.0f} ({lo:,.0f}–{hi:,.0f}) | {p50 * 1e6:.0f} µs | {p99 * 1e6:.0f} µs |")
        fx = t.get("fixed_1000rps") or {}
        if fx:
            lines += ["", "Fixed 1,000 requests/s (vegeta):", "", "| system | p50 | p99 | p99.9 |", "|---|---|---|---|"]
            for n, v in fx.items():
                if v:
                    lines.append(f"| {n} | {v['p50'] * 1e3:.2f} ms | {v['p99'] * 1e3:.2f} ms | "
                                 f"{(v['p999'] or 0) * 1e3:.2f} ms |")
        if t.get("invalid"):
            lines += ["", f"**Invalid runs (non-2xx or socket errors):** {t['invalid']}"]
    s = r.get("sse")
    if s:
        lines += ["", "## 4. SSE (50-chunk stream, openai SDK)", "", "| | TTFC p50 | inter-chunk p50 |", "|---|---|---|"]
        for n in s["ttfc"]:
            lines.append(f"| {n} | {med(s['ttfc'][n]) * 1e3:.2f} ms | {med(s['gap'][n]) * 1e3:.2f} ms |")
    rd = r.get("redis")
    if rd:
        lines += ["", "## 5. Redis (redis-benchmark, 50 clients)", "", "| system | GET | SET | GET -P 16 |", "|---|---|---|---|"]
        for n, v in rd.items():
            lines.append(f"| {n} | {med(v['GET']) or 0:,.0f} | {med(v['SET']) or 0:,.0f} | {med(v['GET_P16']) or 0:,.0f} |")
    c = r.get("chaos")
    if c:
        def f(x, unit="s"):
            return "—" if x is None else f"{x:.2f} {unit}"

        lines += ["", "## 6. Chaos (toxiproxy cuts the upstream for the middle third)", "",
                  f"requests {c['requests']:,}, success rate (fallbacks count) {c['success_rate'] * 100:.2f}%, "
                  f"fallbacks {c['fallbacks']:,}, p99 {f(c['p99'])}, cut → breaker open {f(c['cut_to_open'])}, "
                  f"heal → closed {f(c['heal_to_close'])}"]
    m = r.get("memory")
    if m:
        lines += ["", "## 7. Memory (RSS)", "", f"idle {m['idle_mb']:.1f} MB; with {m['cache_entries']:,} cache entries "
                  f"{m['cache_10k_mb']:.1f} MB; plus 1,000 open client connections {m['cache_10k_plus_1k_conns_mb']:.1f} MB"]
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in r.get("plots", []))]
    return "\n".join(lines) + "\n"


def plots(r: dict, out: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    t = r.get("throughput")
    if t:
        names = list(t["rps"])
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(names, [med(t["rps"][n]) for n in names], color="#4477aa")
        ax.set_ylabel("requests/s (64 connections, one core)")
        ax.set_title("Throughput")
        plt.xticks(rotation=20)
        fig.tight_layout()
        p = out / f"{stem}-throughput.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p.name)
        fx = t.get("fixed_1000rps") or {}
        if fx:
            fig, ax = plt.subplots(figsize=(8, 4))
            for n, v in fx.items():
                if v and v.get("latencies"):
                    xs = v["latencies"]
                    ax.plot([x * 1e3 for x in xs], [i / len(xs) for i in range(len(xs))], label=n)
            ax.set_xscale("log")
            ax.set_xlabel("latency (ms)")
            ax.set_ylabel("fraction of requests")
            ax.set_title("Latency CDF at a fixed 1,000 requests/s")
            ax.legend()
            fig.tight_layout()
            p = out / f"{stem}-latency-cdf.png"
            fig.savefig(p, dpi=100)
            plt.close(fig)
            made.append(p.name)
    c = r.get("chaos")
    if c and c.get("timeline"):
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
        buckets: dict[int, list] = {}
        for t0, status, _fb in c["timeline"]:
            buckets.setdefault(int(t0 * 4), []).append(200 <= status < 300)
        xs = sorted(buckets)
        a1.plot([x / 4 for x in xs], [sum(buckets[x]) / len(buckets[x]) * 100 for x in xs])
        a1.set_ylabel("success % (fallbacks count)")
        a1.axvspan(c["cut_at"], c["heal_at"], color="red", alpha=0.1)
        code = {"closed": 0, "half_open": 1, "open": 2}
        a2.step([s[0] for s in c["states"]], [code.get(s[1], -1) for s in c["states"]], where="post")
        a2.set_yticks([0, 1, 2], ["closed", "half-open", "open"])
        a2.axvspan(c["cut_at"], c["heal_at"], color="red", alpha=0.1)
        a2.set_xlabel("seconds")
        fig.suptitle("Chaos: upstream cut (shaded)")
        fig.tight_layout()
        p = out / f"{stem}-chaos.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p.name)
    return made


def write(r: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = r["started"].replace(":", "").replace("-", "")[:15]
    r["plots"] = plots(r, out, stem)
    slim = json.loads(json.dumps(r, default=str))
    for v in ((slim.get("throughput") or {}).get("fixed_1000rps") or {}).values():
        if v:
            v.pop("latencies", None)  # raw latencies stay out of the JSON (the CDF plot has them)
    (out / f"{stem}.json").write_text(json.dumps(slim, indent=1))
    md = out / f"{stem}.md"
    md.write_text(markdown(r))
    return md
