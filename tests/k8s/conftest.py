"""Tools the Kubernetes checks drive: kustomize (built by scripts/tools.sh with go install), promtool and
amtool (Debian's prometheus and prometheus-alertmanager)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.tools import ROOT, tool

OVERLAYS = sorted(p.name for p in (ROOT / "k8s/overlays").iterdir() if (p / "kustomization.yaml").exists())


def kustomize_build(path: Path) -> list[dict]:
    out = subprocess.run([tool("kustomize"), "build", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize_build(ROOT / "k8s/overlays" / name) for name in OVERLAYS} | {
        "base": kustomize_build(ROOT / "k8s/base")}
