"""`python -m tests.chaos.llm_faults`: runs the sixteen provider faults (tests/chaos/test_llm_faults.py)
and writes what they measured — attempts per model, wall time — into docs/llm-failover.md, the table the
README's "LLM upstream" section shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHORT = {"anthropic/claude-sonnet-4.5": "primary", "openai/gpt-4.1-mini": "fallback-1",
         "google/gemini-2.5-flash": "fallback-2", "google/gemini-2.5-pro": "long-context"}


def render(rows: list[dict]) -> str:
    out = ["| # | Provider fault | What the proxy does | Attempts | Time |", "|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        attempts = ", ".join(f"{SHORT.get(m, m)}: {n}" for m, n in r["attempts"].items())
        per = f" ({r['requests']} requests)" if r["requests"] > 1 else ""
        mode = "stream" if r["stream"] else "non-streamed"
        out.append(f"| {i} | {r['what']} ({mode}) | {r['rescue']} | {attempts}{per} | {r['wall']:.2f} s |")
    return "\n".join(out)


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        results = Path(d) / "faults.jsonl"
        env = {**os.environ, "LLM_FAULTS_OUT": str(results)}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/chaos/test_llm_faults.py"], cwd=ROOT, env=env)
        rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if rc != 0 or len(rows) != 16:
        print(f"the fault module failed (rc {rc}, {len(rows)} of 16 rows): docs/llm-failover.md not written",
              file=sys.stderr)
        return rc or 1
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    page = (f"# LLM failover: sixteen provider faults\n\nMeasured {day} by `python -m tests.chaos.llm_faults` "
            "through config/openai-failover.yaml with its timeouts divided by ten (first_byte 1.5 s, idle 3 s, "
            "breaker reset 3 s), the real `openai` SDK as the app and the fault-injecting fake provider. Every "
            "row: the complete canonical answer reached the app (row 13: the provider's error), attempts within "
            "the stated bounds, no model asked again sooner than a Retry-After it stated, the proxy healthy "
            "afterwards.\n\n" + render(rows) + "\n")
    (ROOT / "docs" / "llm-failover.md").write_text(page)
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
