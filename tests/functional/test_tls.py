"""Upstream TLS: verification against a CA (trustme), SNI override, a clear 502 on failure, mTLS."""

from __future__ import annotations

import ssl

import aiohttp
import pytest
import trustme
from aiohttp import web

from tests.support.proxy import upstream_config


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


async def https_upstream(aiohttp_server, ca, hostname="db.internal", require_client_cert=False):
    cert = ca.issue_cert(hostname)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    seen = {"sni": []}

    def sni(sslobj, server_name, _ctx):
        seen["sni"].append(server_name)  # what the client put in its ClientHello

    ctx.sni_callback = sni
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(ctx)

    async def handler(request):
        peer = request.transport.get_extra_info("peercert")
        seen["peer"] = peer
        return web.json_response({"tls": True})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app, ssl=ctx)
    return server, seen


async def test_https_upstream_verifies_with_ca_file_and_server_name(aiohttp_server, start_proxy, ca, tmp_path):
    server, seen = await https_upstream(aiohttp_server, ca)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    name, cfg = upstream_config(f"https://127.0.0.1:{server.port}")
    cfg["upstreams"][name]["targets"][0]["tls"] = {"ca_file": str(ca_file), "server_name": "db.internal"}
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/x") as r:
            assert r.status == 200 and (await r.json()) == {"tls": True}
    assert seen["sni"] == ["db.internal"]  # SNI is the configured server_name, not the target's IP


async def test_wrong_ca_gives_502_naming_the_reason(aiohttp_server, start_proxy, tmp_path):
    ca = trustme.CA()
    other = trustme.CA()
    server, _ = await https_upstream(aiohttp_server, ca)
    ca_file = tmp_path / "other.pem"
    other.cert_pem.write_to_path(str(ca_file))
    name, cfg = upstream_config(f"https://127.0.0.1:{server.port}", retry={"attempts": 1})
    cfg["upstreams"][name]["targets"][0]["tls"] = {"ca_file": str(ca_file), "server_name": "db.internal"}
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/x") as r:
            assert r.status == 502
            err = (await r.json())["error"]
            assert err["type"] == "tls_error"
            assert err["message"] == ("TLS certificate verification failed for target 'stable': "
                                      "certificate verify failed: unable to get local issuer certificate")


async def test_wrong_name_gives_502(aiohttp_server, start_proxy, ca, tmp_path):
    server, _ = await https_upstream(aiohttp_server, ca)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    name, cfg = upstream_config(f"https://127.0.0.1:{server.port}", retry={"attempts": 1})
    cfg["upstreams"][name]["targets"][0]["tls"] = {"ca_file": str(ca_file), "server_name": "not-the-db.internal"}
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/x") as r:
            assert r.status == 502
            err = (await r.json())["error"]
            assert err["type"] == "tls_error"
            assert err["message"] == ("TLS certificate verification failed for target 'stable': certificate verify "
                                      "failed: Hostname mismatch, certificate is not valid for 'not-the-db.internal'.")


async def test_mtls_client_certificate_presented(aiohttp_server, start_proxy, ca, tmp_path):
    server, seen = await https_upstream(aiohttp_server, ca, require_client_cert=True)
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("app.sidecar")
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    name, cfg = upstream_config(f"https://127.0.0.1:{server.port}", retry={"attempts": 1})
    cfg["upstreams"][name]["targets"][0]["tls"] = {"ca_file": str(ca_file), "server_name": "db.internal",
                                                  "cert_file": str(cert_file), "key_file": str(key_file)}
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/x") as r:
            assert r.status == 200
    sans = [v for k, v in seen["peer"]["subjectAltName"] if k == "DNS"]
    assert sans == ["app.sidecar"]  # the upstream saw the sidecar's client certificate


async def test_unreadable_tls_files_are_a_config_error(start_proxy, tmp_path):
    from proxy.settings import ConfigError

    name, cfg = upstream_config("https://127.0.0.1:1")
    cfg["upstreams"][name]["targets"][0]["tls"] = {"ca_file": str(tmp_path / "missing.pem")}
    with pytest.raises(ConfigError, match=rf"upstreams.{name}.targets\[0\].tls"):
        await start_proxy(cfg)
