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


# The CRDs the overlays use, from their projects' Go modules (pinned), installed with server-side apply
# (several are over the 256 KiB a client-side apply's annotation may hold).
CRD_SOURCES = {
    "github.com/argoproj/argo-rollouts@v1.10.1": ["manifests/crds/*-crd.yaml"],
    "github.com/fluxcd/flagger@v1.36.1": ["artifacts/flagger/crd.yaml"],
    "github.com/chaos-mesh/chaos-mesh@v0.9.1-0.20260902003049-47411975a8cb": ["config/crd/bases/*.yaml"],
    "github.com/prometheus-operator/prometheus-operator@v0.85.0": ["example/prometheus-operator-crd-full/*.yaml"],
    "github.com/cert-manager/cert-manager@v1.21.2": ["deploy/crds/*.yaml"],
}


class _CrdLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's `=` value tag (a plain string in YAML 1.2, as the API server reads it)."""


_CrdLoader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:value"]
                                      for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def crd_documents() -> list[dict]:
    import json

    docs = []
    for module, globs in CRD_SOURCES.items():
        out = subprocess.run(["go", "mod", "download", "-json", module], capture_output=True, text=True,
                             timeout=900, cwd=str(ROOT / "scripts/kube/etcd"))
        assert out.returncode == 0, f"{module}: {out.stderr[-500:]}"
        root = Path(json.loads(out.stdout)["Dir"])
        for pattern in globs:
            files = sorted(root.glob(pattern))
            assert files, f"{module}: nothing matches {pattern}"
            for f in files:
                # a Chaos Mesh CRD holds `- =`, which YAML 1.1 loaders read as the `value` tag
                docs += [d for d in yaml.load_all(f.read_text(), Loader=_CrdLoader)
                         if d and d.get("kind") == "CustomResourceDefinition"]
    return docs


@pytest.fixture(scope="session")
def api():
    """A real API server (tests/support/kube.py) with every CRD above installed and established."""
    import time

    from kubernetes import client
    from kubernetes.dynamic import DynamicClient

    from tests.support.kube import ApiServer

    server = ApiServer().start()
    try:
        admin = server.client()
        crds = DynamicClient(admin).resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
        docs = crd_documents()
        for d in docs:
            crds.server_side_apply(body=d, name=d["metadata"]["name"], field_manager="tests", force_conflicts=True)
        ext = client.ApiextensionsV1Api(admin)
        deadline = time.monotonic() + 120
        for d in docs:
            while True:
                c = ext.read_custom_resource_definition(d["metadata"]["name"])
                if any(x.type == "Established" and x.status == "True" for x in (c.status.conditions or [])):
                    break
                assert time.monotonic() < deadline, f"{d['metadata']['name']} never established"
                time.sleep(0.1)
        server.crds = [d["metadata"]["name"] for d in docs]
        yield server
    finally:
        server.stop()
