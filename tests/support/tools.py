"""Paths and the command-line tools the tests drive."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    """A tool the tests drive: on PATH, or where scripts/tools.sh built it (the bench looks it up the same)."""
    from bench.peers import tool as find

    found = find(name)
    if found is None:
        raise RuntimeError(f"{name} not found: run `make test` (scripts/tools.sh builds it) or .ci/run")
    return found


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def start_process(argv: list[str], answers, what: str) -> subprocess.Popen:
    """Start a server and return once `answers()` is true (30 s at most); a server that exits or never
    answers is killed and fails the test with `what`."""
    from tests.support.wait import eventually_sync

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            return answers()
        except OSError:
            return False

    try:
        eventually_sync(up, interval=0.05, what=f"{what} answers")
    except BaseException:
        proc.kill()
        raise
    return proc
