"""The sidecar as it is added to a pod: one function over plain dicts, used by both `resilience-proxy
inject` and the admission webhook, so both produce the same pod."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from proxy import __version__

NAME = "resilience-proxy"
INJECTED = "resilience-proxy.io/injected"
ADMIN_PORT = 9901
APP_ENV = {
    "OPENROUTER_BASE_URL": "http://127.0.0.1:9001/api/v1",
    "DATABASE_GATEWAY_URL": "http://127.0.0.1:9002",
    "REDIS_URL": "redis://127.0.0.1:6380",
}


class InjectError(Exception):
    pass


@dataclass(frozen=True)
class Options:
    image: str = f"ghcr.io/resilience-proxy/resilience-proxy:{__version__}"
    native: bool = True                     # an initContainer with restartPolicy: Always (Kubernetes ≥ 1.29)
    app_env: bool = False
    app_probes: bool = False
    config_map: str = "resilience-proxy-config"
    openrouter_secret: str = "openrouter-api-key"
    admin_secret: str = "resilience-proxy-admin-token"
    redis_secret: str = "redis-password"


def _probe(path: str, period: int, failures: int, initial: int = 0) -> dict:
    p = {"httpGet": {"path": path, "port": ADMIN_PORT}, "periodSeconds": period, "failureThreshold": failures,
         "timeoutSeconds": 2}
    if initial:
        p["initialDelaySeconds"] = initial
    return p


def container(opts: Options) -> dict:
    c = {
        "name": NAME,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["run", "--config", "/etc/resilience-proxy/config.yaml"],
        "ports": [{"name": "proxy-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        "env": [{"name": "PROXY_CONFIG", "value": "/etc/resilience-proxy/config.yaml"},
                # the inbound listener's track label (empty when the pod has no track label)
                {"name": "ROLLOUT_TRACK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['track']"}}}],
        "startupProbe": _probe("/health/startup", 10, 30),
        "livenessProbe": _probe("/health/live", 10, 3),
        "readinessProbe": _probe("/health/ready", 5, 3),
        # sized from the benchmark: ~40 MB idle, ~100 MB with 10k cache entries and 1k connections
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "resilience-proxy-config", "mountPath": "/etc/resilience-proxy", "readOnly": True},
            {"name": "resilience-proxy-openrouter", "mountPath": "/var/run/secrets/openrouter", "readOnly": True},
            {"name": "resilience-proxy-admin-token", "mountPath": "/var/run/secrets/resilience-proxy/admin-token",
             "readOnly": True},
            {"name": "resilience-proxy-redis", "mountPath": "/var/run/secrets/redis", "readOnly": True},
            {"name": "resilience-proxy-tmp", "mountPath": "/tmp"},
        ],
    }
    if opts.native:
        c["restartPolicy"] = "Always"
    else:
        # A classic sidecar: the kubelet starts containers in order and waits for this hook before
        # starting the next one, so the app starts only once the proxy is up.
        c["lifecycle"] = {"postStart": {"exec": {"command": ["resilience-proxy", "wait-ready", "--timeout", "60s"]}}}
    return c


def volumes(opts: Options) -> list[dict]:
    return [
        {"name": "resilience-proxy-config", "configMap": {"name": opts.config_map}},  # a directory, never subPath
        {"name": "resilience-proxy-openrouter", "secret": {"secretName": opts.openrouter_secret, "optional": True}},
        {"name": "resilience-proxy-admin-token", "secret": {"secretName": opts.admin_secret, "optional": True}},
        {"name": "resilience-proxy-redis", "secret": {"secretName": opts.redis_secret, "optional": True}},
        {"name": "resilience-proxy-tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]


def inject_pod_spec(spec: dict, meta: dict, opts: Options, kind: str = "Pod") -> None:
    """Mutates `spec` (a PodSpec) and `meta` (the pod's metadata) in place. Idempotent."""
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list) or not spec["containers"]:
        raise InjectError(f"{kind}: the pod template has no containers")
    if not opts.native and kind in ("Job", "CronJob"):
        raise InjectError(f"{kind}: a classic sidecar would keep the Job from completing; use a native sidecar")
    init = spec.get("initContainers") or []
    apps = [c for c in spec["containers"] if c.get("name") != NAME]
    init = [c for c in init if c.get("name") != NAME]
    sidecar = container(opts)
    if opts.native:
        spec["initContainers"] = [sidecar, *init]
        spec["containers"] = apps
    else:
        if init:
            spec["initContainers"] = init
        elif "initContainers" in spec:
            del spec["initContainers"]
        spec["containers"] = [sidecar, *apps]
    vols = [v for v in (spec.get("volumes") or []) if not str(v.get("name", "")).startswith("resilience-proxy-")]
    spec["volumes"] = vols + volumes(opts)
    for app in apps:
        if opts.app_env:
            env = app.setdefault("env", [])
            have = {e.get("name") for e in env}
            for k, v in APP_ENV.items():
                if k not in have:
                    env.append({"name": k, "value": v})
        if opts.app_probes:
            for probe, path in (("livenessProbe", "/app-health/live"), ("readinessProbe", "/app-health/ready")):
                if isinstance(app.get(probe), dict) and "httpGet" in app[probe]:
                    app[probe]["httpGet"] = {"path": path, "port": ADMIN_PORT}
    ann = meta.setdefault("annotations", {}) if meta is not None else {}
    ann[INJECTED] = "true"
    ann.setdefault("prometheus.io/scrape", "true")
    ann.setdefault("prometheus.io/port", str(ADMIN_PORT))
    ann.setdefault("prometheus.io/path", "/metrics")


def pod_template(doc: dict) -> tuple[dict, dict] | None:
    """(pod spec, pod metadata) of a workload, or None for a kind that holds no pod."""
    kind = doc.get("kind")
    spec = doc.get("spec")
    if kind == "Pod":
        return spec, doc.setdefault("metadata", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Rollout"):
        t = (spec or {}).get("template")
        if not isinstance(t, dict):
            if kind == "Rollout" and isinstance((spec or {}).get("workloadRef"), dict):
                raise InjectError("Rollout with workloadRef: inject the referenced Deployment instead")
            raise InjectError(f"{kind} {doc.get('metadata', {}).get('name', '?')}: spec.template is missing")
        return t.get("spec"), t.setdefault("metadata", {})
    if kind == "CronJob":
        t = (((spec or {}).get("jobTemplate") or {}).get("spec") or {}).get("template")
        if not isinstance(t, dict):
            raise InjectError(f"CronJob {doc.get('metadata', {}).get('name', '?')}: spec.jobTemplate.spec.template is missing")
        return t.get("spec"), t.setdefault("metadata", {})
    return None


def inject_object(doc: dict, opts: Options) -> bool:
    """→ True when the object held a pod and was injected. Lists are walked."""
    if not isinstance(doc, dict):
        raise InjectError(f"expected a Kubernetes object (a mapping), got {type(doc).__name__}")
    if doc.get("kind") == "List" or (doc.get("kind", "").endswith("List") and isinstance(doc.get("items"), list)):
        return any([inject_object(item, opts) for item in doc.get("items") or []])
    found = pod_template(doc)
    if found is None:
        return False
    spec, meta = found
    inject_pod_spec(spec, meta, opts, doc.get("kind", "Pod"))
    return True


def injected_pod(pod: dict, opts: Options) -> dict:
    out = copy.deepcopy(pod)
    inject_pod_spec(out["spec"], out.setdefault("metadata", {}), opts, "Pod")
    return out
