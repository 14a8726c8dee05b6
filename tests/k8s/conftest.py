"""Tools the Kubernetes checks drive: kustomize (built by scripts/tools.sh with go install), promtool and
amtool (Debian's prometheus and prometheus-alertmanager)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.tools import ROOT, tool

CORE = {"v1", "apps/v1", "policy/v1", "batch/v1", "admissionregistration.k8s.io/v1", "rbac.authorization.k8s.io/v1"}
# CRD kind → (apiVersion, required dotted paths under the object)
CRDS = {
    "PodMonitor": ("monitoring.coreos.com/v1", ["spec.selector", "spec.podMetricsEndpoints"]),
    "PrometheusRule": ("monitoring.coreos.com/v1", ["spec.groups"]),
    "AlertmanagerConfig": ("monitoring.coreos.com/v1alpha1", ["spec.route", "spec.receivers"]),
    "Rollout": ("argoproj.io/v1alpha1", ["spec.selector", "spec.strategy"]),
    "AnalysisTemplate": ("argoproj.io/v1alpha1", ["spec.metrics"]),
    "Canary": ("flagger.app/v1beta1", ["spec.targetRef", "spec.service.port", "spec.analysis"]),
    "MetricTemplate": ("flagger.app/v1beta1", ["spec.provider.type", "spec.query"]),
    "PodChaos": ("chaos-mesh.org/v1alpha1", ["spec.action", "spec.mode", "spec.selector"]),
    "NetworkChaos": ("chaos-mesh.org/v1alpha1", ["spec.action", "spec.mode", "spec.selector"]),
    "StressChaos": ("chaos-mesh.org/v1alpha1", ["spec.mode", "spec.selector", "spec.stressors"]),
    "Certificate": ("cert-manager.io/v1", ["spec.secretName", "spec.issuerRef.name"]),
    "Issuer": ("cert-manager.io/v1", ["spec"]),
}


def _get(obj, dotted):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def check_objects(docs: list[dict], where: str) -> None:
    """Core kinds strictly against the Kubernetes 1.30 schemas; CRD objects: apiVersion, kind, name and the
    fields their controllers need. (The real API server's own check is tests/k8s/test_apiserver.py.)"""
    import kubernetes_validate

    assert docs, f"{where}: nothing rendered"
    for d in docs:
        kind, api = d["kind"], d["apiVersion"]
        if api in CORE:
            kubernetes_validate.validate(d, "1.30.0", strict=True)
        else:
            assert kind in CRDS, f"{where}: unexpected kind {api}/{kind}"
            want_api, required = CRDS[kind]
            assert api == want_api, f"{kind}: apiVersion {api}, want {want_api}"
            assert d.get("metadata", {}).get("name"), f"{kind} without a name"
            for path in required:
                assert _get(d, path) not in (None, [], ""), f"{where}: {kind} {d['metadata']['name']}: {path} missing"


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


class _CrdLoader(yaml.CSafeLoader):
    """libyaml's SafeLoader (the CRDs are megabytes of YAML: the pure-Python parser took 21 s of the
    session fixture's first test, past its timeout on a busy machine), without YAML 1.1's `=` value tag
    (a plain string in YAML 1.2, as the API server reads it)."""


_CrdLoader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:value"]
                                      for k, v in yaml.CSafeLoader.yaml_implicit_resolvers.items()}


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


def dry_run(api, docs: list[dict], namespace: str) -> list[str]:
    """A server-side dry-run apply of each object (the server's own validation, defaulting and the CRDs'
    schemas: what `kubectl apply --server-side --dry-run=server` says) → one line per refusal."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException
    from kubernetes.dynamic import DynamicClient

    admin = api.client()
    dyn = DynamicClient(admin)
    core = client.CoreV1Api(admin)
    namespace = namespace.replace("_", "-")[:60]
    # namespaces are made for real (a dry-run Namespace holds nothing), everything else is a dry run
    for ns in {namespace, *(d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"),
               *(d["metadata"].get("namespace") for d in docs if d["metadata"].get("namespace"))}:
        try:
            core.create_namespace({"metadata": {"name": ns}})
        except ApiException as e:
            assert e.status == 409, e
    failures = []
    for d in docs:
        if d["kind"] == "Namespace":
            continue
        resource = dyn.resources.get(api_version=d["apiVersion"], kind=d["kind"])
        ns = d["metadata"].get("namespace", namespace) if resource.namespaced else None
        try:
            resource.server_side_apply(body=d, name=d["metadata"]["name"], namespace=ns, field_manager="ci",
                                       dry_run="All", force_conflicts=True)
        except ApiException as e:
            failures.append(f"{d['kind']}/{d['metadata']['name']}: {e.status} {e.body[:400] if e.body else e.reason}")
    return failures
