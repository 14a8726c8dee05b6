"""The injector: golden files for every workload kind, idempotence, comments kept, bad input refused; the
webhook: real AdmissionReview requests over TLS give the same pod as the CLI."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys

import aiohttp
import jsonpatch
import pytest
import trustme
import yaml
from aiohttp import web

from proxy.k8s import webhook
from proxy.k8s.inject import inject_text
from proxy.k8s.sidecar import InjectError, Options
from tests.support.tools import ROOT

GOLDEN = ROOT / "tests/k8s/golden"
KINDS = sorted(p.name.removesuffix(".in.yaml") for p in GOLDEN.glob("*.in.yaml"))
OPTS = Options(app_env=True)


@pytest.mark.parametrize("kind", KINDS)
def test_golden(kind):
    src = (GOLDEN / f"{kind}.in.yaml").read_text()
    out = inject_text(src, OPTS)
    assert out == (GOLDEN / f"{kind}.out.yaml").read_text()
    assert inject_text(out, OPTS) == out  # injecting twice equals once
    docs = [d for d in yaml.safe_load_all(out) if d]
    for d in docs:
        if d["kind"] in ("Service", "ConfigMap"):
            continue
        if d["kind"] == "List":
            d = d["items"][0]
        t = d["spec"] if d["kind"] == "Pod" else (
            d["spec"]["jobTemplate"]["spec"]["template"] if d["kind"] == "CronJob" else d["spec"]["template"])
        spec = t if d["kind"] == "Pod" else t["spec"]
        side = spec["initContainers"][0]
        assert side["name"] == "resilience-proxy" and side["restartPolicy"] == "Always"
        assert sum(c["name"] == "resilience-proxy" for c in spec["initContainers"] + spec["containers"]) == 1


def test_comments_key_order_and_other_documents_kept():
    out = inject_text((GOLDEN / "deployment.in.yaml").read_text(), OPTS)
    assert out.startswith("# The web tier\napiVersion: apps/v1\nkind: Deployment")
    assert "name: web  # keep this comment" in out and "# untouched" in out
    svc = list(yaml.safe_load_all(out))[1]
    assert svc == list(yaml.safe_load_all((GOLDEN / "deployment.in.yaml").read_text()))[1]


def test_app_env_does_not_override_the_apps_own():
    out = yaml.safe_load(inject_text((GOLDEN / "statefulset.in.yaml").read_text(), OPTS))
    env = {e["name"]: e["value"] for e in out["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["REDIS_URL"] == "redis://custom:6379" and env["DATABASE_GATEWAY_URL"] == "http://127.0.0.1:9002"


def test_classic_mode_and_its_refusals():
    out = yaml.safe_load(inject_text((GOLDEN / "daemonset.in.yaml").read_text(), Options(native=False)))
    first = out["spec"]["template"]["spec"]["containers"][0]
    assert first["name"] == "resilience-proxy" and "wait-ready" in first["lifecycle"]["postStart"]["exec"]["command"]
    with pytest.raises(InjectError, match="Job"):
        inject_text((GOLDEN / "job.in.yaml").read_text(), Options(native=False))


@pytest.mark.parametrize("bad,match", [
    ("kind: Deployment\nspec: {template: {spec: {containers: []}}}\n", "no containers"),
    ("kind: Deployment\nmetadata: {name: x}\nspec: {}\n", "spec.template is missing"),
    ("kind: Deployment\n  spec: [\n", "invalid YAML"),
    ("- just\n- a list\n", "mapping"),
])
def test_malformed_documents_are_refused(bad, match):
    with pytest.raises(InjectError, match=match):
        inject_text(bad, OPTS)


def test_cli_exit_codes():
    r = subprocess.run([sys.executable, "-m", "proxy", "inject", "--app-env", "-f", str(GOLDEN / "pod.in.yaml")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout == (GOLDEN / "pod.out.yaml").read_text()
    r = subprocess.run([sys.executable, "-m", "proxy", "inject"], input="kind: Pod\nspec: {}\n", capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 1 and "no containers" in r.stderr


async def test_webhook_over_tls_matches_the_cli(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("resilience-proxy-webhook.resilience-proxy-system.svc")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    runner = web.AppRunner(webhook.app(OPTS))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    pod = yaml.safe_load((GOLDEN / "pod.in.yaml").read_text())
    unlabelled = {**pod, "metadata": {"name": "plain"}}
    try:
        async with aiohttp.ClientSession() as s:
            async def review(obj, uid):
                body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                        "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                                    "namespace": "shop", "operation": "CREATE", "object": obj}}
                async with s.post(f"https://127.0.0.1:{port}/mutate", json=body, ssl=client_ctx,
                                  server_hostname="resilience-proxy-webhook.resilience-proxy-system.svc") as r:
                    assert r.status == 200
                    return (await r.json())["response"]

            resp = await review(pod, "u-1")
            assert resp["uid"] == "u-1" and resp["allowed"] and resp["patchType"] == "JSONPatch"
            patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(resp["patch"])))
            assert patched == yaml.safe_load(inject_text((GOLDEN / "pod.in.yaml").read_text(), OPTS))
            plain = await review(unlabelled, "u-2")
            assert plain == {"uid": "u-2", "allowed": True}
            again = await review(patched, "u-3")  # already injected: nothing to change
            assert "patch" not in again
            async with s.post(f"https://127.0.0.1:{port}/mutate", data=b"nonsense", ssl=client_ctx,
                              server_hostname="resilience-proxy-webhook.resilience-proxy-system.svc") as r:
                assert r.status == 400
    finally:
        await runner.cleanup()


def test_injected_sidecar_can_run_the_shipped_config():
    """Every ${file:} the shipped config reads is under a mount of the injected sidecar, every ${env:} is
    set, and the ConfigMap is mounted where the sidecar's --config points."""
    import re

    cfg_text = (ROOT / "k8s/base/config.yaml").read_text()
    out = yaml.safe_load(inject_text((GOLDEN / "pod.in.yaml").read_text(), Options()))
    side = out["spec"]["initContainers"][0]
    mounts = [m["mountPath"] for m in side["volumeMounts"]]
    for path in re.findall(r"\$\{file:([^}]+)\}", cfg_text) + re.findall(r"password_file: (/\S+?)[,}\s]", cfg_text):
        assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), path
    env = {e["name"] for e in side["env"]}
    for name in re.findall(r"\$\{env:([^}]+)\}", cfg_text):
        assert name in env, name
    config_arg = side["args"][side["args"].index("--config") + 1]
    assert any(config_arg.startswith(m + "/") for m in mounts)
    token_file = yaml.safe_load(cfg_text)["admin"]["token_file"]
    assert any(token_file.startswith(m + "/") for m in mounts)


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "inject", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT)


def test_cli_app_probes_point_the_apps_probes_at_the_sidecar():
    r = _cli("--app-probes", "-f", str(GOLDEN / "deployment.in.yaml"))
    assert r.returncode == 0, r.stderr
    deploy, service = [d for d in yaml.safe_load_all(r.stdout) if d]
    spec = deploy["spec"]["template"]["spec"]
    app, = spec["containers"]
    assert app["readinessProbe"] == {"httpGet": {"path": "/app-health/ready", "port": 9901}}
    assert "livenessProbe" not in app  # only probes the app has are redirected, none are invented
    assert "env" not in app  # --app-env not given
    assert spec["initContainers"][0]["name"] == "resilience-proxy"
    plain = next(yaml.safe_load_all(inject_text((GOLDEN / "deployment.in.yaml").read_text(), Options())))
    assert plain["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] == {
        "httpGet": {"path": "/ready", "port": 8000}}  # without the flag the app's probes stay its own


def test_cli_classic_mode_and_image():
    r = _cli("--classic", "--image", "registry.local/rp:9.9", "-f", str(GOLDEN / "daemonset.in.yaml"))
    assert r.returncode == 0, r.stderr
    spec = yaml.safe_load(r.stdout)["spec"]["template"]["spec"]
    first = spec["containers"][0]
    assert first["name"] == "resilience-proxy" and first["image"] == "registry.local/rp:9.9"
    assert first["lifecycle"]["postStart"]["exec"]["command"][:2] == ["resilience-proxy", "wait-ready"]
    assert "restartPolicy" not in first
    assert all(c["name"] != "resilience-proxy" for c in spec.get("initContainers", []))
    r = _cli("--classic", "-f", str(GOLDEN / "job.in.yaml"))
    assert r.returncode == 1 and "Job" in r.stderr and r.stdout == ""
