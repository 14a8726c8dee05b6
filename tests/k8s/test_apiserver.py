"""Every rendered overlay (and the base) against a real API server with the CRDs of Argo Rollouts, Flagger,
Chaos Mesh, the Prometheus operator and cert-manager installed (tests/k8s/conftest.py `api`): a
server-side dry-run apply of each object, which runs the server's own validation, defaulting and the
CRDs' schemas — what `kubectl apply --server-side --dry-run=server` would say."""

from __future__ import annotations

import pytest

from tests.k8s.conftest import OVERLAYS, dry_run


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_object_passes_a_server_side_dry_run(api, rendered, overlay):
    docs = rendered[overlay]
    assert docs
    assert dry_run(api, docs, f"dry-{overlay}") == []


async def test_the_api_server_calls_the_shipped_webhook_and_stores_what_inject_writes(api, rendered):
    """The overlay's MutatingWebhookConfiguration, registered as shipped except where it reaches the
    webhook (a URL to this test's server instead of the Service; failurePolicy Fail, so a webhook that
    did not answer fails the test instead of being ignored): a labelled pod created in a labelled
    namespace is stored with the sidecar exactly as `inject` writes it — compared with the inject output
    created through the same API server, since the server applies its defaults to both."""
    import asyncio
    import base64
    import copy
    import ssl

    import trustme
    import yaml
    from aiohttp import web
    from kubernetes import client

    from proxy.k8s import webhook
    from proxy.k8s.inject import inject_text
    from proxy.k8s.sidecar import Options
    from tests.support.tools import ROOT

    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    runner = web.AppRunner(webhook.app(Options()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    admin = api.client()
    core = client.CoreV1Api(admin)
    mwc = copy.deepcopy(next(d for d in rendered["webhook"] if d["kind"] == "MutatingWebhookConfiguration"))
    try:
        hook = mwc["webhooks"][0]
        hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}/mutate",
                                "caBundle": base64.b64encode(ca.cert_pem.bytes()).decode()}
        hook["failurePolicy"] = "Fail"
        client.AdmissionregistrationV1Api(admin).create_mutating_webhook_configuration(mwc)
        await asyncio.to_thread(core.create_namespace, {"metadata": {"name": "injected",
                                                                     "labels": {"resilience-proxy.io/injection": "enabled"}}})
        await asyncio.to_thread(core.create_namespace, {"metadata": {"name": "by-cli"}})
        source = (ROOT / "tests/k8s/golden/pod.in.yaml").read_text()
        pod = yaml.safe_load(source)
        assert pod["metadata"]["labels"]["resilience-proxy.io/inject"] == "true"

        async def create(ns, body):
            # the client is synchronous and the API server calls back into this event loop: a thread
            for _ in range(50):  # a webhook configuration takes a moment to reach the admission chain
                try:
                    return await asyncio.to_thread(core.create_namespaced_pod, ns, body)
                except client.rest.ApiException as e:
                    if e.status != 500 or "webhook" not in (e.body or ""):
                        raise
                    await asyncio.sleep(0.2)
            raise AssertionError("the webhook never answered")

        via_webhook = None
        for _ in range(50):
            via_webhook = await create("injected", pod)
            if any(c.name == "resilience-proxy" for c in (via_webhook.spec.init_containers or [])):
                break
            await asyncio.to_thread(core.delete_namespaced_pod, pod["metadata"]["name"], "injected")
            await asyncio.sleep(0.2)  # created before the configuration reached admission: again
        by_cli = await create("by-cli", yaml.safe_load(inject_text(source, Options())))
        a, b = admin.sanitize_for_serialization(via_webhook.spec), admin.sanitize_for_serialization(by_cli.spec)
        assert a == b
        assert any(c["name"] == "resilience-proxy" for c in a["initContainers"])
        unlabelled = {**pod, "metadata": {"name": "plain", "labels": {"app": "x"}}}
        plain = await create("injected", unlabelled)
        assert not plain.spec.init_containers  # the objectSelector: only labelled pods
    finally:
        # cluster-scoped and failurePolicy Fail: left behind, it would refuse every later labelled pod
        try:
            client.AdmissionregistrationV1Api(admin).delete_mutating_webhook_configuration(mwc["metadata"]["name"])
        except client.rest.ApiException as e:
            assert e.status == 404, e
        await runner.cleanup()
