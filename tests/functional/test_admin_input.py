"""Every mutating admin call validates its body: 400 naming the field, nothing changed — never a 500."""

from __future__ import annotations

import aiohttp
import pytest

from tests.support.proxy import upstream_config


@pytest.fixture
async def admin(upstream, start_proxy, tmp_path):
    token = tmp_path / "token"
    token.write_text("tok\n")
    name, cfg = upstream_config(upstream.url)
    cfg["upstreams"][name]["targets"].append({"name": "canary", "url": upstream.url, "weight": 0})
    cfg["admin"]["token_file"] = str(token)
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer tok"}) as s:
        p.session = s
        yield p


async def _post(p, path, body: bytes):
    async with p.session.post(p.admin + path, data=body, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("body,field", [
    (b'{"stable": 1e999}', "stable"), (b'{"stable": 2.5}', "stable"), (b'{"stable": true}', "stable"),
    (b'{"stable": "50"}', "stable"), (b'{"stable": 101}', "stable"), (b'{"stable": -1}', "stable"),
    (b'{"canary": [1]}', "canary"), (b"[]", "<body>"), (b"{}", "<body>"), (b"", "<body>"), (b"\xff\xfe", "<body>"),
    (b"[" * 100_000, "<body>"), (b'{"nope": 5}', "nope")])
async def test_bad_weights_are_a_400_naming_the_field(admin, body, field):
    status, answer = await _post(admin, f"/admin/upstreams/{admin.name}/weights", body)
    assert status == 400 and answer["error"]["message"].startswith(field + ":"), answer
    assert admin.app.runtime.upstreams[admin.name].weights == {"stable": 100, "canary": 0}  # unchanged


@pytest.mark.parametrize("body,field", [
    (b'{"track": ["stable"], "state": "open"}', "track"), (b'{"track": {"a": 1}, "state": "open"}', "track"),
    (b'{"state": "opened"}', "state"), (b'{"state": 1}', "state"), (b'{"track": "stable"}', "state"),
    (b'{"state": "open", "extra": 1}', "extra"), (b"null", "<body>"), (b"[" * 100_000, "<body>")])
async def test_bad_breaker_bodies_are_a_400_naming_the_field(admin, body, field):
    status, answer = await _post(admin, f"/admin/upstreams/{admin.name}/breaker", body)
    assert status == 400 and answer["error"]["message"].startswith(field + ":"), answer
    assert admin.app.runtime.upstreams[admin.name].targets[0].breaker.state == "closed"


@pytest.mark.parametrize("body,field", [(b'{"level": ["debug"]}', "level"), (b'{"level": "loud"}', "level"),
                                        (b'{"lvl": "debug"}', "level"), (b"7", "<body>")])
async def test_bad_log_level_bodies_are_a_400_naming_the_field(admin, body, field):
    status, answer = await _post(admin, "/admin/log-level", body)
    assert status == 400 and answer["error"]["message"].startswith(field + ":"), answer


async def test_good_bodies_still_work(admin):
    assert (await _post(admin, f"/admin/upstreams/{admin.name}/weights", b'{"canary": 10}'))[0] == 200
    assert admin.app.runtime.upstreams[admin.name].weights == {"stable": 100, "canary": 10}
    status, answer = await _post(admin, f"/admin/upstreams/{admin.name}/breaker", b'{"track": "canary", "state": "open"}')
    assert status == 200 and answer["state"] == "forced_open"
    status, answer = await _post(admin, f"/admin/upstreams/{admin.name}/breaker", b'{"track": "gone", "state": "open"}')
    assert status == 404
    assert (await _post(admin, "/admin/log-level", b'{"level": "WARNING"}')) == (200, {"level": "warning"})
    assert (await _post(admin, "/admin/log-level", b'{"level": "info"}'))[0] == 200
