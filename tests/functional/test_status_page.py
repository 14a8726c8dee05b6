"""The status page (/admin/ui) in a real headless Chromium (Debian's chromium and chromedriver, driven by
Selenium): a proxy with one upstream whose breaker opened on real failures and another whose canary the
local watchdog aborted; the page asks for the admin token (the admin listener is not on loopback, so
reads need it), keeps it for the tab, and shows the open breaker, the abort, rates and sparklines. A
screenshot is written (UPDATE_SCREENSHOT=1 writes docs/status-page.png, the README's)."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil

import aiohttp
import pytest
from aiohttp import web

from tests.support.net import free_port
from tests.support.tools import ROOT

TOKEN = "status-page-token-0123456789"


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise RuntimeError("chromium and chromedriver are needed (apt-get install chromium chromium-driver; "
                           ".ci/run does it)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,900", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    b = webdriver.Chrome(options=opts, service=Service(driver))
    b.set_page_load_timeout(60)
    yield b
    b.quit()


_runs = itertools.count(1)


async def _scenario(make_upstream, start_proxy, tmp_path):
    """→ (the proxy, its admin URL, (orders, payments): this run's upstream names; the counters are
    process-wide, so each run has its own)."""
    n = next(_runs)
    orders_name, payments_name = f"orders{n}", f"payments{n}"
    async def fails(request):
        return web.Response(status=500, text="canary broke")

    stable, canary = await make_upstream(), await make_upstream(fails)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connect failures
    cfg = {
        "admin": {"listen": f"0.0.0.0:{free_port()}", "token_file": str(token)},
        "upstreams": {
            orders_name: {"listen": f"127.0.0.1:{free_port()}", "retry": {"attempts": 1}, "breaker": {"fail_max": 1000},
                       "targets": [{"name": "stable", "url": stable.url, "weight": 50},
                                   {"name": "canary", "url": canary.url, "weight": 50}],
                       "canary": {"rollback": {"min_requests": 10}}},
            payments_name: {"listen": f"127.0.0.1:{free_port()}", "retry": {"attempts": 1},
                         "breaker": {"fail_max": 3, "reset_timeout": "10m"},
                         "targets": [{"name": "stable", "url": dead}],
                         "fallback": {"static": {"status": 200, "body": '{"degraded": true}'}}},
        },
    }
    p = await start_proxy(cfg, orders_name)
    page = p.app._admin.status_page
    page.samples.clear()

    def sample():  # the page's own 5-second sampler, stepped by the test: history without waiting
        page.sample()
    orders = "http://" + cfg["upstreams"][orders_name]["listen"]
    payments = "http://" + cfg["upstreams"][payments_name]["listen"]
    async with aiohttp.ClientSession() as s:
        sample()
        for burst in (10, 30, 20, 40):
            for _ in range(burst):
                async with s.get(orders + "/o", headers={"X-Canary": "never"}) as r:
                    assert r.status == 200
            sample()
        n = 0
        while p.app.runtime.upstreams[orders_name].weights["canary"] and n < 500:
            async with s.get(orders + "/o", headers={"X-Canary": "always"}) as r:
                await r.read()
            n += 1
        sample()
        for _ in range(40):
            async with s.get(orders + "/o") as r:
                assert r.status == 200
        for _ in range(5):
            async with s.get(payments + "/pay") as r:
                assert r.headers["X-Fallback"] == "static"
        sample()
    ups = p.app.runtime.upstreams
    assert ups[orders_name].weights["canary"] == 0 and ups[payments_name].targets[0].breaker.state == "open"
    port = int(cfg["admin"]["listen"].rsplit(":", 1)[1])
    return p, f"http://127.0.0.1:{port}", (orders_name, payments_name)


async def test_the_page_asks_for_the_token_and_shows_the_open_breaker_and_the_abort(
        make_upstream, start_proxy, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    p, admin, (orders, payments) = await _scenario(make_upstream, start_proxy, tmp_path)
    # reads need the token here (not loopback): the data endpoint refuses without it, the page does not
    async with aiohttp.ClientSession() as s:
        async with s.get(admin + "/admin/status") as r:
            assert r.status == 401
        async with s.get(admin + "/admin/ui") as r:
            assert r.status == 200 and "script-src 'self'" in r.headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]

    def drive() -> dict:
        wait = WebDriverWait(browser, 30)
        browser.get(admin + "/admin/ui")
        wait.until(ec.visibility_of_element_located((By.ID, "login")))
        browser.find_element(By.ID, "token").send_keys("not-the-token")
        browser.find_element(By.ID, "login-button").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "login-error"), "refused"))
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "login-button").click()
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true")

        def cell(upstream, track, field):
            return browser.find_element(
                By.CSS_SELECTOR, f'tr[data-upstream="{upstream}"][data-track="{track}"] td[data-field="{field}"]')

        seen = {
            "login_hidden": not browser.find_element(By.ID, "login").is_displayed(),
            "payments_breaker": cell(payments, "stable", "breaker").find_element(By.CLASS_NAME, "badge").text,
            "payments_transitions": cell(payments, "stable", "breaker").text,
            "payments_fallbacks": browser.find_element(
                By.CSS_SELECTOR, f'section[data-upstream="{payments}"] [data-field="fallbacks"]').text,
            "canary": cell(orders, "canary", "canary").text,
            "canary_weight": cell(orders, "canary", "weight").text,
            "stable_weight": cell(orders, "stable", "weight").text,
            "stable_breaker": cell(orders, "stable", "breaker").find_element(By.CLASS_NAME, "badge").text,
            "sparklines": len(cell(orders, "stable", "sparklines").find_elements(By.TAG_NAME, "svg")),
            "points": cell(orders, "stable", "sparklines").find_element(
                By.TAG_NAME, "polyline").get_attribute("points"),
            "stored": browser.execute_script("return sessionStorage.getItem('resilience-proxy-admin-token')"),
        }
        shot = tmp_path / "status-page.png"
        browser.save_screenshot(str(shot))
        seen["png"] = shot.read_bytes()
        browser.refresh()  # the token is kept for the tab: no second prompt
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true")
        seen["login_after_reload"] = browser.find_element(By.ID, "login").is_displayed()
        return seen

    seen = await asyncio.to_thread(drive)
    assert seen["login_hidden"] and seen["stored"] == TOKEN and seen["login_after_reload"] is False
    assert seen["payments_breaker"] == "open"
    assert "closed → open" in seen["payments_transitions"] and "connect" in seen["payments_transitions"]
    # three connect failures (upstream_error), then the open breaker answered (circuit_breaker_open)
    assert "upstream_error" in seen["payments_fallbacks"] and "circuit_breaker_open" in seen["payments_fallbacks"]
    assert "aborted" in seen["canary"] and seen["canary_weight"].startswith("0")
    assert "configured 50" in seen["canary_weight"] and seen["stable_weight"] == "50"
    assert seen["stable_breaker"] == "closed"
    # the test took 7 samples (6 intervals, and now); the page's own 5 s timer may have added its own
    assert seen["sparklines"] == 3 and len(seen["points"].split()) >= 7
    assert seen["png"][:8] == b"\x89PNG\r\n\x1a\n" and len(seen["png"]) > 10_000
    if os.environ.get("UPDATE_SCREENSHOT"):
        (ROOT / "docs/status-page.png").write_bytes(seen["png"])


async def test_the_status_json_matches_the_proxys_own_state(make_upstream, start_proxy, tmp_path):
    p, admin, (orders, payments) = await _scenario(make_upstream, start_proxy, tmp_path)
    async with aiohttp.ClientSession() as s:
        async with s.get(admin + "/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            body = await r.json()
    ups = {u["name"]: u for u in body["upstreams"]}
    tracks = {t["name"]: t for t in ups[orders]["tracks"]}
    assert tracks["canary"]["aborted"] is True and tracks["canary"]["effective_weight"] == 0
    assert tracks["canary"]["aborts"] == 1 and tracks["stable"]["effective_weight"] == 50
    pay = ups[payments]["tracks"][0]
    assert pay["breaker"] == "open" and pay["health"] == "down" and ups[payments]["health"] == "degraded"
    assert [(t["from"], t["to"]) for t in pay["transitions"]] == [("closed", "open")]
    assert pay["error_ratio"] == 1.0  # every call failed (answered by the static fallback)
    assert tracks["stable"]["rate"] > 0 and tracks["stable"]["error_ratio"] == 0.0
