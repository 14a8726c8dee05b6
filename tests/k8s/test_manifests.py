"""Every overlay renders with kustomize; core kinds validate strictly against the Kubernetes 1.30 schemas
(kubernetes-validate); CRD objects carry their apiVersion, kind and required fields; rules and Alertmanager
config pass promtool/amtool; the sidecar is wired as the issue asks."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.k8s.conftest import OVERLAYS, check_objects
from tests.support.tools import ROOT, tool


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_object_is_valid(rendered, overlay):
    check_objects(rendered[overlay], overlay)


def _pod_spec(docs, kind="Deployment", name="shop-api"):
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d["spec"]["template"]["spec"]
    raise AssertionError(f"no {kind} {name}")


def test_native_sidecar_wiring(rendered):
    spec = _pod_spec(rendered["base"])
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == "resilience-proxy" and sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/health/startup"
    assert (sidecar["startupProbe"]["periodSeconds"], sidecar["startupProbe"]["failureThreshold"]) == (10, 30)
    assert (sidecar["livenessProbe"]["periodSeconds"], sidecar["livenessProbe"]["failureThreshold"]) == (10, 3)
    assert (sidecar["readinessProbe"]["periodSeconds"], sidecar["readinessProbe"]["failureThreshold"]) == (5, 3)
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault" and isinstance(sc["runAsUser"], int)
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert "subPath" not in mounts["resilience-proxy-config"]  # a directory: hot reload works
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["resilience-proxy-config"]["configMap"]["name"] == "resilience-proxy-config"
    assert vols["resilience-proxy-openrouter"]["secret"]["secretName"] == "openrouter-api-key"
    cms = [d for d in rendered["base"] if d["kind"] == "ConfigMap"]
    assert cms[0]["metadata"]["name"] == "resilience-proxy-config"  # no hash suffix: updated in place
    assert yaml.safe_load(cms[0]["data"]["config.yaml"])["upstreams"]["openrouter"]["protocol"] == "openai"
    assert {d["kind"] for d in rendered["base"]} >= {"Service", "PodMonitor", "PodDisruptionBudget", "Secret"}
    pm = next(d for d in rendered["base"] if d["kind"] == "PodMonitor")
    assert "rollouts-pod-template-hash" in pm["spec"]["podTargetLabels"]


def test_classic_overlay_gates_the_app(rendered):
    spec = _pod_spec(rendered["classic"])
    assert "initContainers" not in spec
    first = spec["containers"][0]
    assert first["name"] == "resilience-proxy" and "restartPolicy" not in first
    assert first["lifecycle"]["postStart"]["exec"]["command"][:2] == ["resilience-proxy", "wait-ready"]


def test_shipped_config_in_the_configmap_validates():
    r = subprocess.run([str(ROOT / ".venv/bin/resilience-proxy") if (ROOT / ".venv/bin/resilience-proxy").exists()
                        else "resilience-proxy", "check-config", str(ROOT / "k8s/base/config.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_rollout_steps_and_analysis(rendered):
    ro = next(d for d in rendered["argo-rollouts"] if d["kind"] == "Rollout")
    steps = ro["spec"]["strategy"]["canary"]["steps"]
    assert [s.get("setWeight") for s in steps if "setWeight" in s] == [5, 20, 50, 100]
    assert [s["pause"]["duration"] for s in steps if "pause" in s] == ["10m", "20m", "30m"]
    templates = {d["metadata"]["name"]: d for d in rendered["argo-rollouts"] if d["kind"] == "AnalysisTemplate"}
    assert set(templates) == {"success-rate", "error-rate", "latency-p99"}
    assert templates["success-rate"]["spec"]["metrics"][0]["successCondition"] == "result[0] >= 0.99"
    assert templates["error-rate"]["spec"]["metrics"][0]["successCondition"] == "result[0] <= 0.01"
    assert templates["latency-p99"]["spec"]["metrics"][0]["successCondition"] == "result[0] <= 5000"
    for t in templates.values():
        assert "rollouts_pod_template_hash" in t["spec"]["metrics"][0]["provider"]["prometheus"]["query"]
    bg = next(d for d in rendered["argo-rollouts-bluegreen"] if d["kind"] == "Rollout")
    assert bg["spec"]["strategy"]["blueGreen"]["prePromotionAnalysis"]["templates"]
    canary = next(d for d in rendered["flagger"] if d["kind"] == "Canary")
    assert canary["spec"]["analysis"]["stepWeights"] == [5, 20, 50]


def test_webhook_configuration(rendered):
    mwc = next(d for d in rendered["webhook"] if d["kind"] == "MutatingWebhookConfiguration")
    hook = mwc["webhooks"][0]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["namespaceSelector"]["matchLabels"] == {"resilience-proxy.io/injection": "enabled"}
    assert hook["objectSelector"]["matchLabels"] == {"resilience-proxy.io/inject": "true"}


def test_chaos_experiments_state_their_expected_outcome(rendered):
    chaos = [d for d in rendered["chaos"] if d["apiVersion"] == "chaos-mesh.org/v1alpha1"]
    assert {d["kind"] for d in chaos} == {"PodChaos", "NetworkChaos", "StressChaos"} and len(chaos) == 4
    for d in chaos:
        assert "resilience-proxy.io/expected" in d["metadata"]["annotations"]
    delay = next(d for d in chaos if d["spec"].get("action") == "delay")
    assert (delay["spec"]["delay"]["latency"], delay["spec"]["delay"]["jitter"]) == ("200ms", "50ms")


def test_prometheusrule_carries_the_checked_rules(rendered):
    pr = next(d for d in rendered["monitoring"] if d["kind"] == "PrometheusRule")
    plain = yaml.safe_load((ROOT / "k8s/monitoring/rules.yaml").read_text())
    assert pr["spec"]["groups"] == plain["groups"]
    alerts = {r["alert"]: r for g in plain["groups"] for r in g["rules"]}
    for name in ("HighErrorRate", "HighLatency", "LowSuccessRate"):
        assert alerts[name]["labels"]["action"] == "rollback" and "sum by (namespace, track" in alerts[name]["expr"]
    for name in ("HighCPUUsage", "HighMemoryUsage"):
        assert alerts[name]["labels"]["action"] == "investigate"
        assert "kube_pod_container_resource_limits" in alerts[name]["expr"] and alerts[name]["for"] == "5m"
    assert {"CircuitBreakerOpen", "FallbackServing", "RetryBudgetExhausted", "CanaryAborted"} <= set(alerts)


def test_promtool_checks_and_unit_tests_the_rules():
    r = subprocess.run([tool("promtool"), "check", "rules", str(ROOT / "k8s/monitoring/rules.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([tool("promtool"), "test", "rules", "rules_test.yaml"], capture_output=True, text=True,
                       cwd=ROOT / "k8s/monitoring")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_amtool_accepts_the_alertmanager_config():
    cfg = ROOT / "k8s/monitoring/alertmanager.yaml"
    r = subprocess.run([tool("amtool"), "check-config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    am = yaml.safe_load(cfg.read_text())
    routes = {tuple(x["matchers"]): x["receiver"] for x in am["route"]["routes"]}
    assert routes[('action="rollback"',)] == "rollback-webhook" and routes[('action="investigate"',)] == "team"
    def seconds(v):
        return int(v[:-1]) * {"s": 1, "m": 60, "h": 3600}[v[-1]]

    assert all(seconds(x.get("group_interval", am["route"]["group_interval"])) >= 10 for x in am["route"]["routes"])


def test_grafana_dashboard_covers_the_signals():
    dash = json.loads((ROOT / "k8s/grafana/dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for series in ("circuit_breaker_state", "circuit_breaker_opened_total", "upstream_requests_total",
                   "fallback_responses_total", "upstream_retries_total", "upstream_retry_budget_exhausted_total",
                   "upstream_request_duration_seconds_bucket", "canary_weight", "canary_aborts_total", "upstream_health"):
        assert series in exprs, series
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"]


def test_dockerfile_structure():
    text = (ROOT / "Dockerfile").read_text()
    stages = text.split("\nFROM ")
    final = stages[-1]
    assert "AS final" in final.splitlines()[0]
    import re

    image = re.search(r"ARG PYTHON_IMAGE=(\S+)", text).group(1)
    assert re.match(r"python:3\.11\.\d+-slim", image) and ":latest" not in image  # exact tag
    user = re.search(r"^USER (\S+)", final, re.M).group(1)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    for compiler in ("gcc", "build-essential", "g++", "clang", "apt-get install"):
        assert compiler not in final, compiler
    assert 'ENTRYPOINT ["resilience-proxy"]' in final and 'CMD ["run"]' in final and "EXPOSE 9901" in final
    assert "--require-hashes" in text
    assert (ROOT / ".dockerignore").exists()
    lock = (ROOT / "requirements.lock").read_text()
    pins = [ln for ln in lock.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert pins and all("==" in p and p.rstrip().endswith("\\") for p in pins)
