"""A real Prometheus scrapes a running proxy (inbound and egress traffic driven here); the Argo Rollouts
analysis queries, the Flagger metric templates and the alert expressions, evaluated through its HTTP API,
return what the traffic implies."""

from __future__ import annotations

import asyncio
import subprocess
import time

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.k8s.conftest import kustomize_build
from tests.support.net import free_port
from tests.support.proxy import upstream_config
from tests.support.tools import ROOT, tool


@pytest.fixture
async def scraped_proxy(start_proxy, make_upstream, upstream, tmp_path):
    async def app_handler(request):  # every tenth request fails
        return web.Response(status=500 if app.hits % 10 == 0 else 200, text="app")

    app = await make_upstream(app_handler)
    name, cfg = upstream_config(upstream.url)
    cfg["inbound"] = {"listen": f"127.0.0.1:{free_port()}", "app_url": app.url, "track": "canary"}
    p = await start_proxy(cfg)
    prom_port = free_port()
    admin = cfg["admin"]["listen"]
    prom_cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "sidecar", "static_configs": [{
                    "targets": [admin],
                    "labels": {"namespace": "shop", "rollouts_pod_template_hash": "abc123", "app": "shop-api"}}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))
    proc = subprocess.Popen([tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield p, f"http://{cfg['inbound']['listen']}", f"http://127.0.0.1:{prom_port}", name
    proc.terminate()
    proc.wait(10)


async def query(s, prom, q):
    async with s.get(prom + "/api/v1/query", params={"query": q}) as r:
        body = await r.json()
        assert body["status"] == "success", body
        return body["data"]["result"]


@pytest.mark.timeout(150)  # Prometheus must start, scrape for a minute's worth of rate() and evaluate
async def test_analysis_and_alert_queries_on_real_traffic(scraped_proxy):
    p, inbound, prom, name = scraped_proxy
    docs = kustomize_build(ROOT / "k8s/overlays/argo-rollouts")
    templates = {d["metadata"]["name"]: d["spec"]["metrics"][0]["provider"]["prometheus"]["query"]
                 for d in docs if d["kind"] == "AnalysisTemplate"}
    flagger = {d["metadata"]["name"]: d["spec"]["query"] for d in kustomize_build(ROOT / "k8s/overlays/flagger")
               if d["kind"] == "MetricTemplate"}
    rules = {r["alert"]: r["expr"] for g in yaml.safe_load((ROOT / "k8s/monitoring/rules.yaml").read_text())["groups"]
             for r in g["rules"]}

    def args(q):
        return q.replace("{{args.namespace}}", "shop").replace("{{args.canary-hash}}", "abc123")

    deadline = time.monotonic() + 120
    async with aiohttp.ClientSession() as s:
        async def traffic():
            while time.monotonic() < deadline:
                for _ in range(20):
                    async with s.get(inbound + "/buy") as r:
                        await r.read()
                    async with s.get(p.url + "/item") as r:
                        await r.read()
                await asyncio.sleep(0.05)

        driver = asyncio.create_task(traffic())
        try:
            result = None
            while time.monotonic() < deadline:
                await asyncio.sleep(1)
                result = await query(s, prom, args(templates["success-rate"]))
                if result and abs(float(result[0]["value"][1]) - 0.9) < 0.03:
                    break
            assert result and abs(float(result[0]["value"][1]) - 0.9) < 0.03, result
            err = await query(s, prom, args(templates["error-rate"]))
            assert abs(float(err[0]["value"][1]) - 0.1) < 0.03
            p99 = await query(s, prom, args(templates["latency-p99"]))
            assert 0 < float(p99[0]["value"][1]) < 5000
            fl = await query(s, prom, flagger["success-rate"].replace("{{ namespace }}", "shop")
                             .replace("{{ target }}", "shop-api").replace("{{ interval }}", "1m"))
            assert abs(float(fl[0]["value"][1]) - 90) < 3
            high = await query(s, prom, rules["HighErrorRate"])
            assert [(r["metric"]["namespace"], r["metric"]["track"]) for r in high] == [("shop", "canary")]
            low = await query(s, prom, rules["LowSuccessRate"])
            assert low and abs(float(low[0]["value"][1]) - 0.9) < 0.03
            assert await query(s, prom, rules["HighLatency"]) == []
            up = await query(s, prom, f'sum(rate(upstream_requests_total{{name="{name}",outcome="upstream"}}[1m]))')
            assert float(up[0]["value"][1]) > 0
        finally:
            driver.cancel()
