"""The rollback receiver against a real API server (tests/k8s/conftest.py `api`: etcd and kube-apiserver,
RBAC on, the CRDs installed from their Go modules), with the shipped overlay's ServiceAccount, Role and
RoleBinding: as that ServiceAccount, the receiver zeroes a dependency canary in the real ConfigMap and
aborts a real Rollout — and can do nothing else."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from proxy.fleet.rollback import Kube, Receiver, app
from tests.support.kube import ApiServer
from tests.support.tools import ROOT, tool

NS = "shop"


def _rendered() -> list[dict]:
    out = subprocess.run([tool("kustomize"), "build", str(ROOT / "k8s/overlays/rollback-receiver")],
                         capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def cluster(api):
    """The namespace, the overlay's RBAC and the sidecar ConfigMap (with a canary track on the database
    gateway, as a team rolling one out has it), and the app's Rollout."""
    from kubernetes import client, utils

    admin = api.client()
    core = client.CoreV1Api(admin)
    core.create_namespace({"metadata": {"name": NS}})
    core.create_namespaced_service_account(NS, {"metadata": {"name": "default"}})  # no controllers here
    docs = _rendered()
    for d in docs:
        if d["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
            utils.create_from_dict(admin, d, namespace=NS)
        elif d["kind"] == "ConfigMap" and d["metadata"]["name"] == "resilience-proxy-config":
            cfg = yaml.safe_load(d["data"]["config.yaml"])
            cfg["upstreams"]["database"]["targets"] = [
                {"name": "stable", "url": "http://db-gateway:8080", "weight": 90},
                {"name": "canary", "url": "http://db-gateway-canary:8080", "weight": 10}]
            d["data"]["config.yaml"] = yaml.safe_dump(cfg, sort_keys=False)
            core.create_namespaced_config_map(NS, d)
        elif d["kind"] == "ConfigMap":
            core.create_namespaced_config_map(NS, d)
    rollout = yaml.safe_load((ROOT / "k8s/overlays/argo-rollouts/rollout.yaml").read_text().split("\n---")[0])
    assert rollout["kind"] == "Rollout"
    client.CustomObjectsApi(admin).create_namespaced_custom_object("argoproj.io", "v1alpha1", NS, "rollouts", rollout)
    token = core.create_namespaced_service_account_token(
        "resilience-proxy-rollback", NS, {"spec": {"expirationSeconds": 3600}}).status.token
    return admin, token, rollout["metadata"]["name"]


def _alert(fingerprint, **labels):
    return {"status": "firing", "fingerprint": fingerprint, "startsAt": "2026-12-03T08:00:00Z",
            "labels": {"alertname": "DependencyCanaryErrors", "action": "rollback", "namespace": NS, **labels},
            "annotations": {"summary": "canary failing"}}


async def test_as_its_service_account_it_zeroes_the_canary_and_aborts_the_rollout(cluster, aiohttp_client):
    from kubernetes import client

    admin, token, rollout = cluster
    receiver = Receiver(Kube(ApiServer.client_for_token(admin, token)), NS, "resilience-proxy-config", "config.yaml")
    http = await aiohttp_client(app(receiver, "hook-token"))
    auth = {"Authorization": "Bearer hook-token"}
    resp = await http.post("/alerts", json={"version": "4", "alerts": [
        _alert("f1", upstream="database", track="canary"), _alert("f2", rollout=rollout)]}, headers=auth)
    body = await resp.json()
    assert resp.status == 200, body
    assert [(a["action"], a["result"]) for a in body["actions"]] == [("track_weight_zero", "done"),
                                                                      ("rollout_abort", "done")], body
    cm = client.CoreV1Api(admin).read_namespaced_config_map("resilience-proxy-config", NS)
    targets = yaml.safe_load(cm.data["config.yaml"])["upstreams"]["database"]["targets"]
    assert [(t["name"], t["weight"]) for t in targets] == [("stable", 100), ("canary", 0)]
    r = client.CustomObjectsApi(admin).get_namespaced_custom_object("argoproj.io", "v1alpha1", NS, "rollouts", rollout)
    assert r["status"]["abort"] is True
    history = await (await http.get("/history", headers=auth)).json()
    assert [h["result"] for h in history["rollbacks"]] == ["done", "done"]


def test_its_role_lets_nothing_else_through(cluster):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    admin, token, _ = cluster
    as_receiver = ApiServer.client_for_token(admin, token)
    core = client.CoreV1Api(as_receiver)
    core.read_namespaced_config_map("resilience-proxy-config", NS)  # its one ConfigMap: allowed
    for attempt in (lambda: core.list_namespaced_secret(NS),
                    lambda: core.read_namespaced_secret("resilience-proxy-admin-token", NS),
                    lambda: core.list_namespaced_config_map(NS),
                    lambda: core.delete_namespaced_config_map("resilience-proxy-config", NS),
                    lambda: core.list_namespaced_pod(NS),
                    lambda: client.CustomObjectsApi(as_receiver).delete_namespaced_custom_object(
                        "argoproj.io", "v1alpha1", NS, "rollouts", "shop-api"),
                    lambda: core.read_namespaced_config_map("resilience-proxy-config", "default")):
        with pytest.raises(ApiException) as e:
            attempt()
        assert e.value.status == 403
