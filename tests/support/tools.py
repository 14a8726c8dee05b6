"""Paths and the command-line tools the tests drive."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tool_dirs() -> list[Path]:
    """Where scripts/tools.sh puts the tools it builds (outside the clone, keyed by version)."""
    cache = os.environ.get("RESILIENCE_PROXY_TOOLS")
    if cache:
        return [Path(cache) / "bin"]
    return [Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "resilience-proxy/tools/bin"]


def tool(name: str) -> str:
    """A tool the tests drive: on PATH, or where scripts/tools.sh built it."""
    for c in (shutil.which(name), *(d / name for d in tool_dirs())):
        if c and os.access(c, os.X_OK):
            return str(c)
    raise RuntimeError(f"{name} not found: run `make test` (scripts/tools.sh builds it) or .ci/run")


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
