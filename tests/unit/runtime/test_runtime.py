"""A Runtime built per load, by each upstream's protocol; the state it points at survives an unchanged
reload and a build that fails changes nothing."""

from __future__ import annotations

import pytest
import yaml

from proxy.clock import ManualClock
from proxy.obs.metrics import METRICS
from proxy.protocols import PROTOCOLS
from proxy.runtime import Runtime
from proxy.settings import ConfigError, load
from proxy.upstream.state import StateStore

_n = iter(range(10**6))


def config(tmp_path, **upstreams) -> str:
    p = tmp_path / f"c{next(_n)}.yaml"
    p.write_text(yaml.safe_dump({"upstreams": upstreams}))
    return str(p)


_QUIET = {"health": {"enabled": False}}  # no background checks against hosts that do not exist


def three(suffix: str, **http) -> dict:
    return {
        f"db{suffix}": {"listen": "127.0.0.1:19002", "targets": [{"name": "stable", "url": "http://db:8080"}],
                        **_QUIET, **http},
        f"llm{suffix}": {"protocol": "openai", "listen": "127.0.0.1:19001",
                         "targets": [{"name": "stable", "url": "https://openrouter.ai"}], **_QUIET},
        f"kv{suffix}": {"protocol": "redis", "listen": "127.0.0.1:16380",
                        "targets": [{"name": "stable", "url": "redis://redis:6379/0"}], **_QUIET},
    }


async def test_each_upstream_is_built_by_its_protocol(tmp_path):
    s = f"r{next(_n)}"
    store = StateStore(ManualClock(), METRICS)
    rt = Runtime(load(config(tmp_path, **three(s))), store, ManualClock())
    store.commit()
    db, llm, kv = rt.upstreams[f"db{s}"], rt.upstreams[f"llm{s}"], rt.upstreams[f"kv{s}"]
    assert (db.protocol, llm.protocol, kv.protocol) == (PROTOCOLS["http"], PROTOCOLS["openai"], PROTOCOLS["redis"])
    assert db.default_route.stream_chain is None and llm.default_route.stream_chain is not None
    assert kv.routes == [] and kv.wire.chain is not None and kv.caches() == [kv.cache]


async def test_unchanged_upstreams_keep_their_state_and_a_failed_build_changes_nothing(tmp_path):
    s = f"r{next(_n)}"
    store, clock = StateStore(ManualClock(), METRICS), ManualClock()
    first = Runtime(load(config(tmp_path, **three(s))), store, clock)
    store.commit()
    again = Runtime(load(config(tmp_path, **three(s, retry={"attempts": 2}))), store, clock)
    store.commit()
    for name in first.upstreams:
        assert again.upstreams[name].targets[0].breaker is first.upstreams[name].targets[0].breaker
        assert again.upstreams[name].counters is first.upstreams[name].counters
    assert again.upstreams[f"kv{s}"].cache is first.upstreams[f"kv{s}"].cache
    live = dict(store.live)
    bad = three(s, client_auth={"password_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"upstreams.db\w+.client_auth: only for protocol redis"):
        Runtime(load(config(tmp_path, **bad)), store, clock)
    unreadable = three(s)
    unreadable[f"kv{s}"]["client_auth"] = {"password_file": str(tmp_path / "missing")}
    with pytest.raises(ConfigError, match="client_auth.password_file: cannot read"):
        Runtime(load(config(tmp_path, **unreadable)), store, clock)
    store.abort()
    assert store.live == live
