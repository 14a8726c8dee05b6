"""The rollback receiver's decisions without an API server (a recording stand-in for the Kubernetes
calls): the weight edit, what is refused, idempotency per (fingerprint, startsAt), the rate limit, the
dry run, a ConfigMap that changed under it, and the webhook's own input checks. The same receiver against
a real API server is in tests/k8s/test_rollback_receiver.py."""

from __future__ import annotations

import pytest
import yaml

from proxy.fleet.rollback import Receiver, Refusal, app, zero_track

CONFIG = """# the sidecar config (comments survive the edit)
admin: {listen: "0.0.0.0:9901"}
upstreams:
  db:
    listen: "127.0.0.1:9002"
    targets:
      - {name: stable, url: "http://db-stable:8080", weight: 60}   # the stable track
      - {name: green, url: "http://db-green:8080", weight: 30}
      - {name: canary, url: "http://db-canary:8080", weight: 10}
  solo:
    listen: "127.0.0.1:9003"
    targets:
      - {name: only, url: "http://solo:8080"}
"""


def test_the_track_is_zeroed_and_its_share_goes_to_the_others_in_proportion():
    text, weights, _ = zero_track(CONFIG, "db", "canary")
    assert weights == {"stable": 67, "green": 33, "canary": 0}  # 60:30 of 100, summing to 100 again
    assert "# the stable track" in text and "# the sidecar config" in text
    doc = yaml.safe_load(text)
    assert [t["weight"] for t in doc["upstreams"]["db"]["targets"]] == [67, 33, 0]
    again, _, _ = zero_track(text, "db", "canary")
    assert again == text  # already rolled back: nothing to write


@pytest.mark.parametrize("upstream,track,why", [
    ("solo", "only", "the only weighted track"),
    ("db", "blue", "has no track 'blue'"),
    ("nope", "canary", "no upstream 'nope'"),
])
def test_what_is_refused(upstream, track, why):
    with pytest.raises(Refusal, match=why):
        zero_track(CONFIG, upstream, track)


class FakeKube:
    def __init__(self, text=CONFIG, conflicts=0):
        self.text, self.version, self.conflicts = text, "1", conflicts
        self.writes, self.aborts = [], []

    def read_config(self, namespace, name, key):
        return self.text, self.version

    def write_config(self, namespace, name, key, text, version):
        if self.conflicts:
            self.conflicts -= 1
            self.version = str(int(self.version) + 1)

            class Conflict(Exception):
                status = 409
            raise Conflict()
        assert version == self.version
        self.text = text
        self.writes.append(text)

    def abort_rollout(self, namespace, name):
        self.aborts.append((namespace, name))


def alert(fingerprint="f1", starts="2026-12-03T08:00:00Z", status="firing", **labels):
    return {"status": status, "fingerprint": fingerprint, "startsAt": starts,
            "labels": {"alertname": "HighErrorRate", "action": "rollback", "namespace": "shop", **labels},
            "annotations": {"summary": "shop/canary: error rate above 1%"}}


def payload(*alerts):
    return {"version": "4", "status": "firing", "alerts": list(alerts)}


class Events:
    def __init__(self):
        self.seen = []

    def rollback(self, action, result):
        self.seen.append((action, result))


async def test_a_dependency_canary_is_zeroed_once_per_firing_and_again_for_a_new_one():
    kube, events = FakeKube(), Events()
    r = Receiver(kube, "shop", "resilience-proxy-config", "config.yaml", events=events)
    (entry,) = await r.receive(payload(alert(upstream="db", track="canary")))
    assert (entry["result"], entry["action"], entry["weights"]) == ("done", "track_weight_zero",
                                                                   {"stable": 67, "green": 33, "canary": 0})
    assert entry["reason"] == "shop/canary: error rate above 1%" and len(kube.writes) == 1
    assert await r.receive(payload(alert(upstream="db", track="canary"))) == []  # a repeat of that firing
    assert events.seen[-1] == ("none", "duplicate") and len(kube.writes) == 1
    (again,) = await r.receive(payload(alert(starts="2026-12-03T09:00:00Z", upstream="db", track="canary")))
    assert again["result"] == "unchanged"  # a new firing acts again: the weight is 0 already
    assert await r.receive(payload(alert(fingerprint="f9", status="resolved", upstream="db", track="canary"))) == []
    assert [h["result"] for h in r.history] == ["done", "unchanged"]  # resolved undoes nothing


async def test_an_app_canary_rollout_is_aborted_and_other_namespaces_are_not_touched():
    kube = FakeKube()
    r = Receiver(kube, "shop", "cm", "config.yaml")
    (entry,) = await r.receive(payload(alert(rollout="shop-api")))
    assert entry["result"] == "done" and kube.aborts == [("shop", "shop-api")]
    (entry,) = await r.receive(payload(alert(fingerprint="f2", namespace="billing", rollout="x")))
    assert entry["result"] == "refused" and "not this receiver's" in entry["detail"] and len(kube.aborts) == 1
    (entry,) = await r.receive(payload(alert(fingerprint="f3")))
    assert entry["result"] == "refused" and "needs a `rollout` label" in entry["detail"]


async def test_rate_limited_dry_run_and_a_conflict_read_again():
    clock = [0.0]
    kube = FakeKube()
    r = Receiver(kube, "shop", "cm", "config.yaml", max_actions=2, per=600, clock=lambda: clock[0])
    results = [(await r.receive(payload(alert(fingerprint=f"r{i}", rollout="a"))))[0]["result"] for i in range(3)]
    assert results == ["done", "done", "rate_limited"] and len(kube.aborts) == 2
    clock[0] = 601
    assert (await r.receive(payload(alert(fingerprint="r9", rollout="a"))))[0]["result"] == "done"

    dry = Receiver(FakeKube(), "shop", "cm", "config.yaml", dry_run=True)
    (entry,) = await dry.receive(payload(alert(upstream="db", track="canary")))
    assert entry["result"] == "dry_run" and entry["dry_run"] is True and dry.kube.writes == []

    racing = FakeKube(conflicts=2)
    r = Receiver(racing, "shop", "cm", "config.yaml")
    (entry,) = await r.receive(payload(alert(upstream="db", track="canary")))
    assert entry["result"] == "done" and len(racing.writes) == 1


async def test_a_rolled_back_config_the_sidecars_would_refuse_is_not_written():
    broken = CONFIG.replace('listen: "127.0.0.1:9002"', 'listen: "0.0.0.0:9002"')  # egress off loopback
    kube = FakeKube(broken)
    r = Receiver(kube, "shop", "cm", "config.yaml")
    (entry,) = await r.receive(payload(alert(upstream="db", track="canary")))
    assert entry["result"] == "refused" and "would not load" in entry["detail"] and kube.writes == []


async def test_the_webhook_wants_its_token_and_a_real_payload(aiohttp_client):
    r = Receiver(FakeKube(), "shop", "cm", "config.yaml")
    client = await aiohttp_client(app(r, "s3cret"))
    assert (await client.post("/alerts", json=payload())).status == 401
    assert (await client.post("/alerts", json=payload(), headers={"Authorization": "Bearer nope"})).status == 401
    auth = {"Authorization": "Bearer s3cret"}
    for bad in (b"not json", b"[]", b'{"alerts": 3}', b'{"version": "3", "alerts": []}'):
        resp = await client.post("/alerts", data=bad, headers=auth)
        assert resp.status == 400, bad
    assert (await client.post("/alerts", data=b"x" * (2 << 20), headers=auth)).status == 413
    resp = await client.post("/alerts", json=payload(alert(rollout="shop-api")), headers=auth)
    assert resp.status == 200 and (await resp.json())["actions"][0]["result"] == "done"
    history = await (await client.get("/history", headers=auth)).json()
    assert [h["rollout"] for h in history["rollbacks"]] == ["shop-api"]


async def test_a_failed_or_rate_limited_firing_is_acted_on_when_delivered_again(aiohttp_client):
    class Flaky(FakeKube):
        fail = 1

        def abort_rollout(self, namespace, name):
            if self.fail:
                self.fail -= 1

                class ServerError(Exception):
                    status = 500
                raise ServerError()
            super().abort_rollout(namespace, name)

    kube = Flaky()
    r = Receiver(kube, "shop", "cm", "config.yaml")
    client = await aiohttp_client(app(r, None))
    resp = await client.post("/alerts", json=payload(alert(rollout="shop-api")))
    assert resp.status == 503 and (await resp.json())["actions"][0]["result"] == "failed"  # Alertmanager retries
    resp = await client.post("/alerts", json=payload(alert(rollout="shop-api")))  # the same firing, again
    assert resp.status == 200 and (await resp.json())["actions"][0]["result"] == "done"
    assert kube.aborts == [("shop", "shop-api")]

    clock = [0.0]
    limited = Receiver(FakeKube(), "shop", "cm", "config.yaml", max_actions=1, per=600, clock=lambda: clock[0])
    assert (await limited.receive(payload(alert(fingerprint="a", rollout="x"))))[0]["result"] == "done"
    assert (await limited.receive(payload(alert(fingerprint="b", rollout="x"))))[0]["result"] == "rate_limited"
    clock[0] = 601  # the window passed; Alertmanager's repeat_interval sends firing b again
    assert (await limited.receive(payload(alert(fingerprint="b", rollout="x"))))[0]["result"] == "done"
    assert limited.kube.aborts == [("shop", "x"), ("shop", "x")]


async def test_a_payload_arriving_in_pieces_is_read_whole(aiohttp_server):
    import asyncio
    import json

    r = Receiver(FakeKube(), "shop", "cm", "config.yaml")
    server = await aiohttp_server(app(r, None))
    body = json.dumps(payload(alert(fingerprint="p1", rollout="a"), alert(fingerprint="p2", rollout="b"))).encode()

    async def send(head: bytes, parts: list[bytes]) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(head)
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.05)  # separate segments: the body is not all there when the handler runs
        answer = await reader.read()
        writer.close()
        return answer

    head = b"POST /alerts HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
    half = len(body) // 2
    answer = await send(head + b"Content-Length: %d\r\n\r\n" % len(body), [body[:half], body[half:]])
    assert answer.startswith(b"HTTP/1.1 200") and b'"done"' in answer, answer[:300]
    chunked = [b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:])] + [b"0\r\n\r\n"]
    answer = await send(head + b"Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]  # the same alerts: duplicates, still a 200
    assert r.kube.aborts == [("shop", "a"), ("shop", "b")]


async def test_history_needs_the_token_and_records_the_weights_before_and_after(aiohttp_client):
    r = Receiver(FakeKube(), "shop", "cm", "config.yaml")
    client = await aiohttp_client(app(r, "s3cret"))
    auth = {"Authorization": "Bearer s3cret"}
    assert (await client.post("/alerts", json=payload(alert(upstream="db", track="canary")), headers=auth)).status == 200
    assert (await client.get("/history")).status == 401
    (entry,) = (await (await client.get("/history", headers=auth)).json())["rollbacks"]
    assert entry["previous_weights"] == {"stable": 60, "green": 30, "canary": 10}
    assert entry["weights"] == {"stable": 67, "green": 33, "canary": 0} and entry["timestamp"].endswith("Z")


@pytest.mark.parametrize("token", ["REPLACE-ME-with-a-long-random-token", "short"])
def test_the_cli_refuses_the_shipped_placeholder_token(tmp_path, token):
    import subprocess
    import sys

    f = tmp_path / "token"
    f.write_text(token + "\n")
    out = subprocess.run([sys.executable, "-m", "proxy", "rollback-receiver", "--namespace", "shop", "--token-file",
                          str(f)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "placeholder" in out.stderr, out.stderr
