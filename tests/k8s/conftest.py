"""Tools the Kubernetes checks drive: kustomize (built by scripts/test.sh with go install), promtool and
amtool (Debian's prometheus and prometheus-alertmanager)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.name for p in (ROOT / "k8s/overlays").iterdir() if (p / "kustomization.yaml").exists())


def tool(name: str) -> str:
    for c in (shutil.which(name), ROOT / ".tools/bin" / name, Path.home() / "go/bin" / name):
        if c and os.access(c, os.X_OK):
            return str(c)
    raise RuntimeError(f"{name} not found: run `make test` (scripts/test.sh installs it) or .ci/run")


def kustomize_build(path: Path) -> list[dict]:
    out = subprocess.run([tool("kustomize"), "build", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize_build(ROOT / "k8s/overlays" / name) for name in OVERLAYS} | {
        "base": kustomize_build(ROOT / "k8s/base")}
