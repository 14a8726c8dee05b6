"""The rollback receiver (`resilience-proxy rollback-receiver`): an Alertmanager webhook receiver (payload
v4) that rolls a bad canary back for the whole fleet, where each sidecar's own watchdog can only abort it
for its own pod.

Not on the data path: a Deployment of its own (k8s/overlays/rollback-receiver) in the workload's
namespace, with a Role that can read and patch one ConfigMap and abort Rollouts there, nothing else.
For a firing alert labelled `action=rollback` and this `namespace`:
- with `upstream` and `track` (a dependency canary): the sidecar ConfigMap gets that track's weight set
  to 0 and its share handed to the remaining weighted tracks (in proportion), validated with the
  sidecar's own schema before it is written (optimistic concurrency on the resourceVersion); zeroing
  the only weighted track is refused — every sidecar would refuse that config;
- with `rollout` (an app canary under Argo Rollouts): that Rollout is aborted, by the same patch of the
  `rollouts/status` subresource `kubectl argo rollouts abort` makes.
Each (fingerprint, startsAt) acts once: Alertmanager's repeats of one firing do nothing more, a new firing
of the same alert acts again. Actions are rate-limited; `--dry-run` decides and records without writing;
resolved alerts undo nothing. Every decision is a JSON log line, a metric and an entry of `GET /history`.

Uses the official Kubernetes Python client (its calls run in threads: it is synchronous).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import io
import json
import os
import tempfile
import time
from typing import Any

from proxy.obs import log

_MAX_BODY = 1024 * 1024
_SEEN = 10_000      # (fingerprint, startsAt) pairs remembered
_HISTORY = 500
_CONFLICTS = 3      # a ConfigMap changed under us: read and try again this often
_AGAIN = frozenset({"failed", "rate_limited"})  # not acted on: a later delivery of the firing tries again


class Refusal(Exception):
    """This alert asks for something the receiver will not do (a reason, recorded)."""


# -- the ConfigMap edit --------------------------------------------------------------------------------
def zero_track(text: str, upstream: str, track: str) -> tuple[str, dict[str, int], dict[str, int]]:
    """The sidecar config with `track`'s weight at 0 and its share given to the other weighted tracks of
    `upstream` (in proportion to their weights, each at most 100, the total kept where it can be) →
    (the new YAML, the new weights, the weights before). Comments and layout are kept (ruamel's round trip)."""
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    doc = y.load(text)
    ups = doc.get("upstreams") if isinstance(doc, dict) else None
    up = ups.get(upstream) if isinstance(ups, dict) else None
    if not isinstance(up, dict) or not isinstance(up.get("targets"), list):
        raise Refusal(f"no upstream {upstream!r} with targets in the config")
    targets = [t for t in up["targets"] if isinstance(t, dict)]
    bad = next((t for t in targets if t.get("name") == track), None)
    if bad is None:
        raise Refusal(f"upstream {upstream!r} has no track {track!r}")
    weight = lambda t: int(t.get("weight", 100))  # noqa: E731 — the spec's default
    before = {t["name"]: weight(t) for t in targets}
    others = [t for t in targets if t is not bad and weight(t) > 0]
    if weight(bad) == 0:
        return text, before, before  # already rolled back: nothing to write
    if not others:
        raise Refusal(f"track {track!r} is the only weighted track of {upstream!r}: every sidecar would refuse "
                      "a config without one")
    total = sum(weight(t) for t in targets)
    share = sum(weight(t) for t in others)
    # largest remainder: integers in proportion to the current weights, summing to the old total
    exact = [(t, min(100.0, weight(t) * total / share)) for t in others]
    new = {id(t): int(w) for t, w in exact}
    left = min(total, 100 * len(others)) - sum(new.values())
    for t, _ in sorted(exact, key=lambda tw: tw[1] - int(tw[1]), reverse=True):
        if left <= 0:
            break
        if new[id(t)] < 100:
            new[id(t)] += 1
            left -= 1
    bad["weight"] = 0
    for t in others:
        t["weight"] = new[id(t)]
    out = io.StringIO()
    y.dump(doc, out)
    return out.getvalue(), {t["name"]: weight(t) for t in targets}, before


def validate(text: str) -> None:
    """The sidecars' own schema: a config they would refuse is never written. References to env and
    files are the sidecars' to resolve (they are not here): only their shape is checked."""
    from proxy.settings.loader import ConfigError, load

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        load(f.name, strict_refs=False)
    except ConfigError as exc:
        raise Refusal("the rolled-back config would not load: " + "; ".join(exc.errors[:3])) from None
    finally:
        os.unlink(f.name)


# -- Kubernetes ----------------------------------------------------------------------------------------
class Kube:
    """The receiver's few calls, over the official client."""

    def __init__(self, api_client) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> Kube:
        from kubernetes import client, config

        if kubeconfig:
            return cls(config.new_client_from_config(config_file=kubeconfig))
        config.load_incluster_config()
        return cls(client.ApiClient())

    def read_config(self, namespace: str, name: str, key: str) -> tuple[str, str]:
        cm = self.core.read_namespaced_config_map(name, namespace)
        data = cm.data or {}
        if key not in data:
            raise Refusal(f"ConfigMap {namespace}/{name} has no key {key!r}")
        return data[key], cm.metadata.resource_version

    def write_config(self, namespace: str, name: str, key: str, text: str, version: str) -> None:
        body = {"metadata": {"resourceVersion": version}, "data": {key: text}}  # 409 if it changed since
        self.core.patch_namespaced_config_map(name, namespace, body)

    def abort_rollout(self, namespace: str, name: str) -> None:
        self.custom.patch_namespaced_custom_object_status(
            "argoproj.io", "v1alpha1", namespace, "rollouts", name, {"status": {"abort": True}})


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


# -- the receiver --------------------------------------------------------------------------------------
class Receiver:
    def __init__(self, kube: Kube, namespace: str, configmap: str, key: str, *, dry_run: bool = False,
                 max_actions: int = 5, per: float = 600.0, events=None, clock=time.monotonic) -> None:
        self.kube, self.namespace, self.configmap, self.key = kube, namespace, configmap, key
        self.dry_run, self.max_actions, self.per, self.clock = dry_run, max_actions, per, clock
        self.events = events
        self.seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self.history: collections.deque[dict] = collections.deque(maxlen=_HISTORY)
        self._acted: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()  # one action at a time: two alerts for one ConfigMap must not race

    async def receive(self, payload: Any) -> list[dict]:
        """One webhook delivery → the entries it added to the history."""
        if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
            raise ValueError("not an Alertmanager webhook payload: no `alerts` list")
        if str(payload.get("version", "4")) != "4":
            raise ValueError(f"webhook payload version {payload.get('version')!r}: version 4 is understood")
        entries = []
        for alert in payload["alerts"]:
            entry = await self._alert(alert)
            if entry is not None:
                entries.append(entry)
        return entries

    async def _alert(self, alert: Any) -> dict | None:
        if not isinstance(alert, dict):
            return None
        labels = alert.get("labels") if isinstance(alert.get("labels"), dict) else {}
        if alert.get("status") != "firing" or labels.get("action") != "rollback":
            return None  # resolved alerts undo nothing; other actions are not ours
        key = (str(alert.get("fingerprint", "")), str(alert.get("startsAt", "")))
        if key in self.seen:
            self._count("duplicate", "none")
            return None  # Alertmanager repeating one firing
        self.seen[key] = None  # taken now, so a delivery racing this one is a duplicate, not a second act
        while len(self.seen) > _SEEN:
            self.seen.popitem(last=False)
        annotations = alert.get("annotations") if isinstance(alert.get("annotations"), dict) else {}
        entry = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "alertname": labels.get("alertname"),
                 "fingerprint": key[0], "startsAt": key[1], "namespace": labels.get("namespace"),
                 "reason": annotations.get("summary") or annotations.get("description") or labels.get("alertname"),
                 "dry_run": self.dry_run}
        async with self._lock:
            try:
                entry.update(await self._act(labels))
            except Refusal as r:
                entry.update(result="refused", detail=str(r))
            except Exception as exc:  # noqa: BLE001 — the API server's errors: recorded, the next alert goes on
                entry.update(result="failed", detail=f"{type(exc).__name__}: {_status(exc) or ''} "
                                                     f"{getattr(exc, 'reason', '') or ''}".strip())
        entry.setdefault("action", "none")
        if entry["result"] in _AGAIN:
            # not acted on: Alertmanager's next delivery of this firing (its retry after our 5xx, or the
            # repeat_interval) must get another go, or the rollback would wait for the alert to resolve
            self.seen.pop(key, None)
        self.history.append(entry)
        self._count(entry["result"], entry["action"])
        log.warning("rollback_action", **{k: v for k, v in entry.items() if k != "timestamp"})
        return entry

    async def _act(self, labels: dict) -> dict:
        if labels.get("namespace") != self.namespace:
            raise Refusal(f"namespace {labels.get('namespace')!r} is not this receiver's ({self.namespace})")
        if labels.get("rollout"):
            what = {"action": "rollout_abort", "rollout": labels["rollout"]}
        elif labels.get("upstream") and labels.get("track"):
            what = {"action": "track_weight_zero", "upstream": labels["upstream"], "track": labels["track"],
                    "configmap": self.configmap}
        else:
            raise Refusal("a rollback alert needs a `rollout` label, or `upstream` and `track`")
        now = self.clock()
        while self._acted and now - self._acted[0] >= self.per:
            self._acted.popleft()
        if len(self._acted) >= self.max_actions:
            return {**what, "result": "rate_limited",
                    "detail": f"{self.max_actions} actions in the last {int(self.per)} s already"}
        if what["action"] == "rollout_abort":
            if not self.dry_run:
                await asyncio.to_thread(self.kube.abort_rollout, self.namespace, what["rollout"])
            self._acted.append(now)
            return {**what, "result": "dry_run" if self.dry_run else "done"}
        for _ in range(_CONFLICTS):
            text, version = await asyncio.to_thread(self.kube.read_config, self.namespace, self.configmap, self.key)
            new, weights, what["previous_weights"] = zero_track(text, what["upstream"], what["track"])
            if new == text:
                return {**what, "result": "unchanged", "weights": weights, "detail": "the track's weight is 0 already"}
            validate(new)
            if self.dry_run:
                self._acted.append(now)
                return {**what, "result": "dry_run", "weights": weights}
            try:
                await asyncio.to_thread(self.kube.write_config, self.namespace, self.configmap, self.key, new, version)
            except Exception as exc:
                if _status(exc) == 409:
                    continue  # changed under us: read it again
                raise
            self._acted.append(now)
            return {**what, "result": "done", "weights": weights}
        raise Refusal(f"ConfigMap {self.configmap} kept changing ({_CONFLICTS} conflicts in a row)")

    def _count(self, result: str, action: str) -> None:
        if self.events is not None:
            self.events.rollback(action, result)


# -- the HTTP side -------------------------------------------------------------------------------------
def app(receiver: Receiver, token: str | None, registry=None):
    from aiohttp import web

    def _denied(request: web.Request) -> web.Response | None:
        if token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return web.json_response({"error": "a bearer token is needed"}, status=401)
        return None

    async def alerts(request: web.Request) -> web.Response:
        denied = _denied(request)
        if denied is not None:
            return denied
        if request.content_length is not None and request.content_length > _MAX_BODY:
            return web.json_response({"error": f"payload over {_MAX_BODY} bytes"}, status=413)
        try:
            # the whole body, however many segments it came in (client_max_size bounds it: a 413)
            raw = await request.read()
            payload = json.loads(raw)
            entries = await receiver.receive(payload)
        except (ValueError, RecursionError) as exc:
            return web.json_response({"error": f"invalid payload: {str(exc)[:200]}"}, status=400)
        # a failed action is a 5xx, so Alertmanager delivers it again (with its own backoff)
        failed = any(e["result"] == "failed" for e in entries)
        return web.json_response({"status": "failed" if failed else "ok", "actions": entries},
                                 status=503 if failed else 200)

    async def history(request: web.Request) -> web.Response:
        denied = _denied(request)  # what it did and why: alert summaries, ConfigMap names, weights
        if denied is not None:
            return denied
        return web.json_response({"rollbacks": list(receiver.history)})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    a = web.Application(client_max_size=_MAX_BODY)
    a.router.add_post("/alerts", alerts)
    a.router.add_get("/history", history)
    a.router.add_get("/healthz", healthz)
    if registry is not None:
        a.router.add_get("/metrics", metrics)
    return a
