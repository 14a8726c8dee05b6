"""`resilience-proxy webhook --tls-cert F --tls-key F`: a mutating admission webhook (AdmissionReview v1)
that adds the sidecar to pods labelled `resilience-proxy.io/inject: "true"` (the shipped
MutatingWebhookConfiguration also selects namespaces labelled `resilience-proxy.io/injection: enabled`
and uses `failurePolicy: Ignore`, so an unavailable webhook never blocks pod creation). The patch is the
JSONPatch from the pod to exactly what `resilience-proxy inject` writes for it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl

from aiohttp import web

from proxy.k8s.sidecar import InjectError, Options, injected_pod
from proxy.obs import log

LABEL = "resilience-proxy.io/inject"


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def patch_for(pod: dict, opts: Options) -> list[dict]:
    new = injected_pod(pod, opts)
    ops: list[dict] = []
    spec, nspec = pod.get("spec", {}), new["spec"]
    for key in ("initContainers", "containers", "volumes"):
        if key in nspec and nspec.get(key) != spec.get(key):
            ops.append({"op": "replace" if key in spec else "add", "path": f"/spec/{key}", "value": nspec[key]})
        elif key not in nspec and key in spec:
            ops.append({"op": "remove", "path": f"/spec/{key}"})
    meta, nmeta = pod.get("metadata", {}), new["metadata"]
    if "annotations" not in meta:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": nmeta["annotations"]})
    else:
        for k, v in nmeta["annotations"].items():
            if meta["annotations"].get(k) != v:
                ops.append({"op": "add", "path": f"/metadata/annotations/{_escape(k)}", "value": v})
    return ops


def review(body: dict, opts: Options) -> dict:
    req = body.get("request") or {}
    uid = req.get("uid", "")
    resp: dict = {"uid": uid, "allowed": True}
    obj = req.get("object") or {}
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if req.get("kind", {}).get("kind") == "Pod" and labels.get(LABEL) == "true":
        try:
            ops = patch_for(obj, opts)
        except InjectError as exc:
            resp["warnings"] = [f"resilience-proxy: not injected: {exc}"]
            ops = []
        if ops:
            resp["patchType"] = "JSONPatch"
            resp["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": resp}


def app(opts: Options) -> web.Application:
    async def mutate(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if body.get("kind") != "AdmissionReview" or "request" not in body:
                raise ValueError
        except ValueError:
            return web.json_response({"error": "expected an admission.k8s.io/v1 AdmissionReview"}, status=400)
        out = review(body, opts)
        log.info("admission", uid=out["response"]["uid"], patched="patch" in out["response"])
        return web.json_response(out)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    a = web.Application(client_max_size=8 * 1024 * 1024)
    a.router.add_post("/mutate", mutate)
    a.router.add_get("/healthz", healthz)
    return a


def _stamp(*paths: str) -> tuple:
    return tuple(os.stat(p).st_mtime_ns if os.path.exists(p) else 0 for p in paths)


async def watch_certificate(ctx: ssl.SSLContext, cert: str, key: str, interval: float = 30.0) -> None:
    """cert-manager renews the certificate in place (a Secret volume swap): load it again, so new TLS
    handshakes use it. Without this the API server rejects the expired one and, with failurePolicy
    Ignore, injection silently stops."""
    seen = _stamp(cert, key)
    while True:
        await asyncio.sleep(interval)
        now = _stamp(cert, key)
        if now != seen:
            try:
                ctx.load_cert_chain(cert, key)
                seen = now
                log.info("webhook_certificate_reloaded")
            except (OSError, ssl.SSLError) as exc:
                log.error("webhook_certificate_reload_failed", error=str(exc))


async def serve(host: str, port: int, cert: str, key: str, opts: Options) -> int:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    runner = web.AppRunner(app(opts), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ctx).start()
    log.info("webhook_started", listen=f"{host}:{port}")
    watcher = asyncio.get_running_loop().create_task(watch_certificate(ctx, cert, key))
    try:
        await asyncio.Event().wait()
    finally:
        watcher.cancel()
        await runner.cleanup()
    return 0
