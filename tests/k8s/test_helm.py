"""The Helm chart (charts/resilience-proxy) with the real `helm` (scripts/tools.sh builds it): lint, the
default and a full render validated as the kustomize objects are, the default equal to the kustomize base
where both say the same thing, bad values refused by values.schema.json with their path, and an install,
upgrade and uninstall against the real API server."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest
import yaml

from proxy.k8s.chart import values_schema
from proxy.settings import load
from tests.k8s.conftest import check_objects, dry_run
from tests.support.tools import ROOT, tool

CHART = ROOT / "charts/resilience-proxy"
# Every switch on (the injector with cert-manager); the provided-CA injector is rendered on its own below.
FULL = {
    "alertmanagerConfig": {"enabled": True, "teamWebhookUrl": "https://alerts.example.internal/hooks/shop-team"},
    "rollbackReceiver": {"enabled": True},
    "injector": {"enabled": True},
    "argoRollouts": {"analysisTemplates": True},
    "flagger": {"metricTemplates": True},
    "secrets": {"openrouterApiKey": {"value": "sk-or-test-key"}, "redisPassword": {"value": "hunter2"}},
    "prometheusUrl": "http://prometheus.monitoring.svc:9090",
}


def helm(*args: str, kubeconfig=None) -> subprocess.CompletedProcess:
    env = None
    if kubeconfig is not None:
        import os

        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120, env=env)


def template(values: dict | None = None, *extra: str, namespace: str = "shop") -> list[dict]:
    args = ["template", "rp", str(CHART), "--namespace", namespace, *extra]
    if values:
        args += ["--values", "-"]
    out = subprocess.run([tool("helm"), *args], input=json.dumps(values or {}), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def refused(*extra: str) -> str:
    out = helm("template", "rp", str(CHART), *extra)
    assert out.returncode != 0, f"helm accepted {extra}"
    return out.stderr


def _one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def test_the_committed_values_schema_is_what_the_specs_generate():
    assert json.loads((CHART / "values.schema.json").read_text()) == values_schema(), \
        "run: python -m proxy.k8s.chart"


@pytest.mark.parametrize("values", [None, FULL], ids=["default", "full"])
def test_helm_lint(values, tmp_path):
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values or {}))
    out = helm("lint", str(CHART), "--strict", "--values", str(f))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values", [None, FULL], ids=["default", "full"])
def test_every_rendered_object_is_valid(values):
    check_objects(template(values), "helm")


def test_the_default_render_equals_the_kustomize_base(rendered):
    """What the chart and k8s/base both express: the sidecar ConfigMap, the PodMonitor; and the
    PrometheusRule of k8s/overlays/monitoring."""
    chart = template()
    base = rendered["base"]
    cm, want = _one(chart, "ConfigMap", "resilience-proxy-config"), _one(base, "ConfigMap", "resilience-proxy-config")
    assert yaml.safe_load(cm["data"]["config.yaml"]) == yaml.safe_load(want["data"]["config.yaml"])
    assert _one(chart, "PodMonitor")["spec"] == _one(base, "PodMonitor")["spec"]
    assert _one(chart, "PrometheusRule")["spec"] == _one(rendered["monitoring"], "PrometheusRule")["spec"]
    # the Secrets it makes carry the names and keys the sidecar mounts (the base's placeholders aside)
    base_secrets = {d["metadata"]["name"]: set(d["stringData"]) for d in base if d["kind"] == "Secret"}
    made = {d["metadata"]["name"]: set(d["data"]) for d in chart if d["kind"] == "Secret"}
    assert made == {"resilience-proxy-admin-token": {"token"}}
    assert all(base_secrets[n] == keys for n, keys in made.items())
    token = base64.b64decode(_one(chart, "Secret", "resilience-proxy-admin-token")["data"]["token"])
    assert len(token) == 48 and token.isalnum()  # generated (kept across upgrades: the install test)


def test_the_full_render_equals_the_overlays_where_they_overlap(rendered):
    chart = template(FULL)
    rb = rendered["rollback-receiver"]
    assert _one(chart, "Role")["rules"] == _one(rb, "Role")["rules"]
    got, want = _one(chart, "Deployment", "resilience-proxy-rollback"), _one(rb, "Deployment", "resilience-proxy-rollback")
    assert got["spec"]["template"]["spec"]["containers"][0]["args"] == want["spec"]["template"]["spec"]["containers"][0]["args"]
    hook = _one(chart, "MutatingWebhookConfiguration")["webhooks"][0]
    shipped = _one(rendered["webhook"], "MutatingWebhookConfiguration")["webhooks"][0]
    hook["clientConfig"]["service"]["namespace"] = shipped["clientConfig"]["service"]["namespace"]
    assert hook == shipped
    assert {(d["kind"], d["metadata"]["name"]) for d in chart if d["kind"] in ("Issuer", "Certificate")} == \
        {(d["kind"], d["metadata"]["name"]) for d in rendered["webhook"] if d["kind"] in ("Issuer", "Certificate")}
    cert = _one(chart, "Certificate", "resilience-proxy-webhook")
    assert cert["spec"]["dnsNames"][0] == "resilience-proxy-webhook.shop.svc"  # the release's namespace
    # the analysis templates as shipped, pointed at this Prometheus
    for overlay, kind in (("argo-rollouts", "AnalysisTemplate"), ("flagger", "MetricTemplate")):
        def by_name(docs, kind=kind):
            return sorted((d for d in docs if d["kind"] == kind), key=lambda d: d["metadata"]["name"])

        text = yaml.safe_dump(by_name(rendered[overlay]))
        assert yaml.safe_dump(by_name(chart)) == \
            text.replace("http://prometheus-operated.monitoring.svc:9090", FULL["prometheusUrl"])
    routes = _one(chart, "AlertmanagerConfig")["spec"]
    hook_url = routes["receivers"][0]["webhookConfigs"][0]["url"]
    assert hook_url == "http://resilience-proxy-rollback.shop.svc:9095/alerts"
    assert _one(chart, "Secret", "openrouter-api-key")["data"]["api-key"] == base64.b64encode(b"sk-or-test-key").decode()


def test_a_provided_ca_replaces_cert_manager():
    docs = template({"injector": {"enabled": True, "certManager": False,
                                  "tls": {"cert": "CERT PEM", "key": "KEY PEM", "caBundle": "CA PEM"}}})
    assert not [d for d in docs if d["apiVersion"].startswith("cert-manager.io")]
    hook = _one(docs, "MutatingWebhookConfiguration")
    assert "annotations" not in hook["metadata"]
    assert base64.b64decode(hook["webhooks"][0]["clientConfig"]["caBundle"]) == b"CA PEM"
    assert _one(docs, "Secret", "resilience-proxy-webhook-tls")["type"] == "kubernetes.io/tls"
    assert "injector.tls" in refused("--set", "injector.enabled=true", "--set", "injector.certManager=false")


def test_the_rendered_sidecar_config_loads_in_the_sidecar(tmp_path):
    docs = template({"config": {"upstreams": {"database": {"retry": {"attempts": 5}}, "redis": None}}})
    text = _one(docs, "ConfigMap", "resilience-proxy-config")["data"]["config.yaml"]
    (tmp_path / "config.yaml").write_text(text)
    s = load(str(tmp_path / "config.yaml"), strict_refs=False).settings
    assert s.upstreams["database"].retry.attempts == 5 and set(s.upstreams) == {"openrouter", "database"}


@pytest.mark.parametrize("args,path", [
    (("--set", "config.upstreams.database.retry.attempts=0"), "/config/upstreams/database/retry/attempts"),
    (("--set", "config.upstreams.database.breaker.fail_maks=3"), "/config/upstreams/database/breaker"),
    (("--set", "config.upstreams.database.protocol=ftp"), "/config/upstreams/database/protocol"),
    (("--set", "config.upstreams.database.timeouts.attempt=5parsecs"), "/config/upstreams/database/timeouts/attempt"),
    (("--set", "injector.failurePolicy=Sometimes"), "/injector/failurePolicy"),
    (("--set", "podMonitor.interval=often"), "/podMonitor/interval"),
    (("--set", "colour=blue"), "colour"),
])
def test_bad_values_are_refused_with_their_path(args, path):
    err = refused(*args)
    assert "schema" in err and path in err, err


def test_alertmanager_routes_need_the_teams_receiver():
    assert "teamWebhookUrl" in refused("--set", "alertmanagerConfig.enabled=true")


def test_full_render_passes_a_server_side_dry_run(api):
    assert dry_run(api, template(FULL, namespace="helm-dry"), "helm-dry") == []


def test_install_upgrade_uninstall_on_a_real_api_server(api):
    """helm install into the real API server (no controllers: nothing becomes ready, so no --wait), the
    generated admin token kept across an upgrade (lookup reads the live Secret), then uninstall."""
    from kubernetes import client

    kc = api.kubeconfig()
    ns = "helm-shop"
    values = {**FULL, "injector": {"enabled": False}}  # the cluster-wide webhook stays out of a shared server
    f = api.dir / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    out = helm("install", "rp", str(CHART), "-n", ns, "--create-namespace", "--values", str(f), kubeconfig=kc)
    assert out.returncode == 0, out.stderr
    core = client.CoreV1Api(api.client())
    cm = core.read_namespaced_config_map("resilience-proxy-config", ns)
    assert yaml.safe_load(cm.data["config.yaml"]) == yaml.safe_load((ROOT / "k8s/base/config.yaml").read_text())
    token = core.read_namespaced_secret("resilience-proxy-admin-token", ns).data["token"]
    out = helm("upgrade", "rp", str(CHART), "-n", ns, "--values", str(f), "--set",
               "config.upstreams.database.retry.attempts=4", kubeconfig=kc)
    assert out.returncode == 0, out.stderr
    cm = core.read_namespaced_config_map("resilience-proxy-config", ns)
    assert yaml.safe_load(cm.data["config.yaml"])["upstreams"]["database"]["retry"]["attempts"] == 4
    assert core.read_namespaced_secret("resilience-proxy-admin-token", ns).data["token"] == token
    # a bad value on upgrade is refused before anything changes
    out = helm("upgrade", "rp", str(CHART), "-n", ns, "--values", str(f), "--set",
               "config.upstreams.database.retry.attempts=0", kubeconfig=kc)
    assert out.returncode != 0 and "attempts" in out.stderr
    cm = core.read_namespaced_config_map("resilience-proxy-config", ns)
    assert yaml.safe_load(cm.data["config.yaml"])["upstreams"]["database"]["retry"]["attempts"] == 4
    out = helm("uninstall", "rp", "-n", ns, kubeconfig=kc)
    assert out.returncode == 0, out.stderr
    assert [c.metadata.name for c in core.list_namespaced_config_map(ns).items
            if c.metadata.name.startswith("resilience-proxy")] == []


def test_a_secret_you_made_yourself_is_left_alone(api):
    """The admin token's Secret created out of band before the install: the chart does not try to own it
    (Helm would refuse the install), and the user's token stays."""
    from kubernetes import client

    kc = api.kubeconfig()
    ns = "helm-byo"
    core = client.CoreV1Api(api.client())
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_secret(ns, {"metadata": {"name": "resilience-proxy-admin-token"},
                                       "stringData": {"token": "my-own-long-admin-token"}})
    out = helm("install", "rp", str(CHART), "-n", ns, kubeconfig=kc)
    assert out.returncode == 0, out.stderr
    secret = core.read_namespaced_secret("resilience-proxy-admin-token", ns)
    assert base64.b64decode(secret.data["token"]) == b"my-own-long-admin-token"
    assert "meta.helm.sh/release-name" not in (secret.metadata.annotations or {})
    assert helm("uninstall", "rp", "-n", ns, kubeconfig=kc).returncode == 0
    assert core.read_namespaced_secret("resilience-proxy-admin-token", ns).data == secret.data  # still theirs


def test_values_in_yaml_1_1_need_the_on_key_quoted(tmp_path):
    """Helm reads a values file as YAML 1.1: an unquoted `on:` is the boolean true, refused by the schema
    (unknown key) instead of read as retry.on — the README and values.yaml say to quote it."""
    f = tmp_path / "v.yaml"
    f.write_text("config:\n  upstreams:\n    database:\n      retry: {on: [reset]}\n")
    assert "retry" in refused("--values", str(f))
    f.write_text('config:\n  upstreams:\n    database:\n      retry: {"on": [reset, "503"]}\n')
    cm = next(d for d in yaml.safe_load_all(helm("template", "rp", str(CHART), "--values", str(f)).stdout)
              if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "resilience-proxy-config")
    assert yaml.safe_load(cm["data"]["config.yaml"])["upstreams"]["database"]["retry"]["on"] == ["reset", "503"]
