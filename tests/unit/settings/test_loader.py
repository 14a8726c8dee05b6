"""Config: every documented key round-trips, env overrides, units, errors with full field paths, exit codes."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from proxy.cli import main
from proxy.settings import ConfigError, load, redacted
from proxy.settings.units import parse_duration, parse_size

# Every key the spec has, each set to a value other than its default (the test below checks both: a key
# added to the spec and missing here fails it, and so does a key here that loading ignores).
FULL = {
    "admin": {"listen": "127.0.0.1:9911", "token_file": "/tmp/token"},
    "shutdown": {"drain_timeout": "21s", "quiet_period": "3s"},
    "log": {"level": "debug", "access": True},
    "tracing": {"enabled": True, "endpoint": "http://otel-collector:4317", "protocol": "grpc", "sample_ratio": 0.25,
                "service_name": "shop-sidecar", "capture_content": True, "max_queue": 99, "timeout": "3s"},
    "reload": {"interval": "6s"},
    "liveness": {"max_loop_lag": "3s"},
    "app": {"ready_url": "http://127.0.0.1:8000/ready", "live_url": "http://127.0.0.1:8000/live",
            "interval": "7s", "timeout": "3s"},
    "inbound": {"listen": "0.0.0.0:8081", "app_url": "http://127.0.0.1:8001", "track": "canary",
                "max_header_bytes": "32KiB", "max_request_body": "2MiB", "idle_timeout": "6m",
                "buckets": [0.01, 0.1, 1]},
    "upstreams": {
        "database": {
            "protocol": "http",
            "listen": "127.0.0.1:9002",
            "targets": [{"name": "stable", "url": "https://db:8443", "weight": 90,
                         "tls": {"ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem", "server_name": "db.svc"}},
                        {"name": "canary", "url": "http://db2:8080", "weight": 10}],
            "timeouts": {"connect": "250ms", "attempt": "11s", "total": "1m", "idle": "1h", "first_byte": "61s"},
            "pool": {"max_connections": 50, "idle_timeout": "31s", "max_lifetime": "6m"},
            "limits": {"max_header_bytes": "17KiB", "max_request_body": "1MiB", "max_in_flight": 10,
                       "max_pending": 5, "pending_timeout": "2s", "client_idle_timeout": "1h",
                       "client_header_timeout": "10s"},
            "request_headers": {"X-Team": "core"},
            "retry": {"attempts": 2, "backoff_base": "150ms", "backoff_max": "3s", "on": ["reset", "503"],
                      "non_idempotent": True, "max_replay_body": "512KiB", "budget_ratio": 0.3, "budget_min": 4},
            "breaker": {"mode": "ratio", "fail_max": 3, "reset_timeout": "30s", "success_threshold": 2,
                        "half_open_max_calls": 2, "failure_statuses": ["5xx", 429],
                        "ratio": {"failure_ratio": 0.4, "window": "10s", "min_requests": 10},
                        "slow_call": {"duration": "2s", "ratio": 0.5}},
            "fallback": {"methods": ["GET"], "cache_entries": 10, "cache_bytes": "1MiB", "cache_ttl": "2m",
                         "stale_ttl": "2h", "max_body": "64KiB", "vary": ["Accept"],
                         "static": {"status": 203, "content_type": "text/plain", "body": "{}", "headers": {"X-A": "b"}},
                         "shared": {"url": "rediss://cache.example:6380/2", "cluster": True, "key_prefix": "shop:",
                                    "cache_ttl": "30s", "stale_ttl": "30m", "max_body": "256KiB", "timeout": "50ms",
                                    "write_queue": 10, "max_connections": 7,
                                    "tls": {"ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem"}}},
            "routes": [{"name": "reports", "match": {"methods": ["GET"], "path_prefix": "/reports"},
                        "timeouts": {"total": "2m"}, "retry": {"attempts": 1}, "fallback": {"cache_ttl": "5m"}}],
            "metrics": {"buckets": [0.1, 1, 10]},
            "health": {"enabled": False, "path": "/healthz", "interval": "11s", "timeout": "3s",
                       "healthy_threshold": 2, "unhealthy_threshold": 4, "critical": True},
            "canary": {"override_header": "X-Track", "sticky_header": "X-Session", "sticky_cookie": "uid",
                       "track_header": "X-Served-By",
                       "rollback": {"enabled": False, "window": "2m", "min_requests": 50, "max_error_rate": 0.05,
                                    "min_success_rate": 0.9, "max_p99": "2s"}},
        },
        "openrouter": {
            "protocol": "openai",
            "listen": "127.0.0.1:9001",
            "targets": [{"name": "stable", "url": "https://openrouter.ai"}],
            "llm": {"cache_key_fields": ["model", "messages"], "fallback_models": ["openai/gpt-4o-mini"],
                    "models": ["anthropic/claude-3.5-sonnet"],
                    "context_fallback_models": ["google/gemini-2.0-flash"], "failover_on_timeout": False,
                    "continuation": {"enabled": False, "max": 1, "no_prefill_models": ["openai/o1"]},
                    "limits": {"requests_per_minute": 500, "tokens_per_minute": 200000, "max_wait": "2s",
                               "models": {"openai/o1": {"requests_per_minute": 20, "tokens_per_minute": 30000}},
                               "shared": {"url": "rediss://limits.example:6380/1", "cluster": True,
                                          "key_prefix": "shop:", "timeout": "100ms", "max_connections": 9,
                                          "tls": {"ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem"}},
                               "expected_replicas": 4},
                    "prices": {"openai/o1": {"prompt": 15.0, "completion": 60.0}},
                    "degraded": {"enabled": False, "message": "try later", "status": 503}},
        },
        "cache": {
            "protocol": "redis",
            "listen": "127.0.0.1:6380",
            "targets": [{"name": "stable", "url": "redis://redis:6379/0", "password_file": "/run/redis-password"}],
            "client_auth": {"password_file": "/run/client-password"},
            "redis": {"deny_commands": ["EVAL", "KEYS"], "allow_commands": ["DEBUG"],
                      "client_output_limit": "8MiB", "max_client_memory": "64MiB"},
        },
    },
}
# Keys that name a thing rather than tune it: required, so there is no default to differ from.
IDENTITY = {"protocol", "listen", "name", "url"}


def write(tmp_path, data) -> str:
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def errors_of(tmp_path, data) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load(write(tmp_path, data))
    return ei.value.errors


def _spec_keys(model: type, prefix: tuple = ()) -> set[tuple]:
    """Every leaf key path of the config, walked from the spec itself: ("upstreams", "*", "targets", "[]",
    "tls", "ca_file"), ... A sub-section (a Spec) is walked into; anything else is a leaf."""
    import typing

    from proxy.settings.spec import Spec

    out = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if isinstance(ann, type) and issubclass(ann, Spec):
            out |= _spec_keys(ann, (*prefix, name))
        elif typing.get_origin(ann) is dict and args and isinstance(args[-1], type) and issubclass(args[-1], Spec):
            out |= _spec_keys(args[-1], (*prefix, name, "*"))  # upstreams.<name>
        elif typing.get_origin(ann) is tuple and args and isinstance(args[0], type) and issubclass(args[0], Spec):
            out |= _spec_keys(args[0], (*prefix, name, "[]"))  # targets[], routes[]
        elif len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], Spec):
            out |= _spec_keys(args[0], (*prefix, name))  # an optional section (inbound, static)
        else:
            out.add((*prefix, name))
    return out


def _given(node: dict, spec: set[tuple], prefix: tuple = (), concrete: tuple = ()) -> dict[tuple, tuple]:
    """The key paths a config dict sets: concrete path ("upstreams", "database", "targets", 0, "weight")
    → its generic form in the spec's terms."""
    out = {}
    for k, v in node.items():
        # a map of sections (upstreams.<name>, llm.prices.<model>): its keys are the spec's "*"
        generic = (*prefix, "*") if any(p[:len(prefix) + 1] == (*prefix, "*") for p in spec) else (*prefix, k)
        here = (*concrete, k)
        if generic in spec or not isinstance(v, dict | list):
            out[here] = generic
        elif isinstance(v, dict):
            out |= _given(v, spec, generic, here)
        else:  # a list of sections: targets, routes
            for i, item in enumerate(v):
                out |= _given(item, spec, (*generic, "[]"), (*here, i))
    return out


_ABSENT = object()


def _at(obj, path: tuple):
    for part in path:
        if obj is None or (isinstance(obj, dict) and part not in obj):
            return _ABSENT  # an optional section the config leaves out (inbound, fallback.static, a map's key)
        obj = obj[part] if isinstance(obj, dict | list | tuple) else getattr(obj, part)
    return obj


def test_every_key_of_the_spec_is_set_read_and_documented(tmp_path):
    """Generated from the spec: every key is in FULL (a key added to the spec cannot be forgotten here),
    loading FULL gives each one a value other than the one the same config without it gets (so no key
    is silently ignored), and every key is named in the README's reference block."""
    from proxy.settings.loader import Settings

    spec = _spec_keys(Settings)
    given = _given(FULL, spec)
    assert spec - set(given.values()) == set(), "keys of the spec that FULL does not set"
    assert set(given.values()) - spec == set(), "keys in FULL the spec does not have"
    full = load(write(tmp_path, FULL)).settings
    minimal = {"inbound": {}, "upstreams": {
        name: {"protocol": up["protocol"], "listen": up["listen"],
               "targets": [{"name": t["name"], "url": t["url"]} for t in up["targets"]],
               **({"routes": [{"name": r["name"]} for r in up["routes"]]} if "routes" in up else {}),
               # an optional section, present with its defaults: its keys are compared with those
               **({"fallback": {k: {"url": up["fallback"][k]["url"]} if k == "shared" else {}
                                for k in ("static", "shared") if k in up["fallback"]}}
                  if {"static", "shared"} & set(up.get("fallback", {})) else {})}
        for name, up in FULL["upstreams"].items()}}
    bare = load(write(tmp_path, minimal)).settings
    for concrete in given:
        got = _at(full, concrete)
        if concrete[-1] in IDENTITY:
            assert got == _at(FULL, concrete), concrete
        else:
            assert got != _at(bare, concrete), f"{'.'.join(map(str, concrete))}: set in FULL, but loads as the default"
    assert _undocumented(spec) == [], "keys the README's reference block does not document"


class _Yaml12Bools(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true and false."""


_Yaml12Bools.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Bools.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def _undocumented(spec: set[tuple]) -> list[str]:
    """Spec keys missing from the README's "Every key with its default" block, read as YAML: each key path
    must be there, except under a section whose default is null or empty (inbound, fallback.static,
    routes), whose keys must be named in the comment on that section's line."""
    from tests.support.tools import ROOT

    text = (ROOT / "README.md").read_text()
    start = text.index("```yaml", text.index("Every key with its default:")) + len("```yaml")
    block = text[start:text.index("```", start)]
    doc = yaml.load(block, Loader=_Yaml12Bools)  # `on:` is the key retry.on, not the boolean YAML 1.1 makes it
    missing = []
    for path in sorted(spec):
        node, rest = doc, list(path)
        while rest:
            part = rest.pop(0)
            key = "<name>" if part == "*" else part
            if part == "[]" and isinstance(node, list) and node:
                node = node[0]
                continue
            if not isinstance(node, dict) or key not in node:
                missing.append(".".join(path))
                break
            node = node[key]
            if rest and node in (None, [], {}):  # a section absent by default: its keys in the line's comment
                line = next(ln for ln in block.splitlines() if re.match(rf"\s*{re.escape(key)}:", ln) and "#" in ln)
                comment = line.split("#", 1)[1]
                if any(r not in ("[]", "*") and not re.search(rf"\b{re.escape(r)}\b", comment) for r in rest):
                    missing.append(".".join(path))
                break
    return missing


def test_key_values_are_converted(tmp_path):
    s = load(write(tmp_path, FULL)).settings
    up = s.upstreams["database"]
    assert s.admin.token_file == "/tmp/token" and s.log.level == "debug" and s.log.access
    assert s.shutdown.drain_timeout == 21 and s.shutdown.quiet_period == 3 and s.reload.interval == 6
    assert [t.weight for t in up.targets] == [90, 10]
    assert up.targets[0].tls.server_name == "db.svc"
    assert (up.timeouts.connect, up.timeouts.total, up.timeouts.idle) == (0.25, 60, 3600)
    assert (up.pool.max_connections, up.pool.max_lifetime) == (50, 360)
    assert (up.limits.max_header_bytes, up.limits.max_request_body) == (17408, 1048576)
    assert (up.limits.max_in_flight, up.limits.max_pending, up.limits.pending_timeout) == (10, 5, 2)
    assert up.retry.on == ("reset", "503") and up.retry.max_replay_body == 512 * 1024 and up.retry.budget_min == 4
    assert up.breaker.mode == "ratio" and up.breaker.failure_statuses == ("5xx", "429")
    assert up.breaker.ratio.min_requests == 10 and up.breaker.slow_call.duration == 2
    assert up.fallback.vary == ("accept",) and up.fallback.static.headers == {"X-A": "b"}
    timeouts, retry, fallback = up.route_sections(up.routes[0])
    assert timeouts.total == 120 and timeouts.attempt == 11 and retry.attempts == 1 and retry.budget_min == 4
    assert fallback.cache_ttl == 300 and fallback.stale_ttl == 7200
    assert up.metrics.buckets == (0.1, 1, 10)
    assert s.inbound.buckets == (0.01, 0.1, 1) and s.inbound.idle_timeout == 360
    assert s.upstreams["openrouter"].llm.degraded.status == 503
    # the effective config re-validates to the same settings
    dump = redacted(load(write(tmp_path, FULL)))
    # a literal header value is shown redacted unless its name is on the harmless list: put it back
    assert dump["upstreams"]["database"]["request_headers"] == {"X-Team": "<redacted>"}
    dump["upstreams"]["database"]["request_headers"] = FULL["upstreams"]["database"]["request_headers"]
    again = load(write(tmp_path, {**dump, "admin": FULL["admin"]})).settings
    assert again.upstreams == s.upstreams and again.inbound == s.inbound and again.app == s.app


def test_defaults(tmp_path):
    s = load(write(tmp_path, {"upstreams": {"db": {"listen": "127.0.0.1:9002",
                                                     "targets": [{"name": "stable", "url": "http://x"}]}}})).settings
    up = s.upstreams["db"]
    assert s.admin.listen == "0.0.0.0:9901" and s.shutdown.drain_timeout == 20
    assert (up.timeouts.connect, up.timeouts.attempt, up.timeouts.total, up.timeouts.idle) == (5, 10, 30, 60)
    assert up.retry.attempts == 3 and up.retry.budget_ratio == 0.2 and up.breaker.fail_max == 5
    assert up.fallback.methods == ("GET", "HEAD") and up.fallback.cache_ttl == 60


def test_env_overrides_nested_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("PROXY_UPSTREAMS__DATABASE__BREAKER__FAIL_MAX", "10")
    monkeypatch.setenv("PROXY_LOG__LEVEL", "warning")
    s = load(write(tmp_path, FULL)).settings
    assert s.upstreams["database"].breaker.fail_max == 10
    assert s.upstreams["database"].breaker.reset_timeout == 30  # the rest of the section stays
    assert s.log.level == "warning"


def test_env_override_is_validated(tmp_path, monkeypatch):
    monkeypatch.setenv("PROXY_UPSTREAMS__DATABASE__RETRY__ATTEMPTS", "0")
    assert "upstreams.database.retry.attempts: must be >= 1" in errors_of(tmp_path, FULL)


@pytest.mark.parametrize("text,seconds", [("250ms", 0.25), ("5s", 5), ("1m", 60), ("1h", 3600), (3, 3.0), ("1.5s", 1.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text,n", [("512KiB", 524288), ("1MiB", 1048576), (100, 100), ("2GiB", 2 * 1024**3)])
def test_sizes(text, n):
    assert parse_size(text) == n


def test_errors_name_full_paths_all_at_once(tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(FULL))
    up = bad["upstreams"]["database"]
    up["retry"]["attempts"] = 0
    up["timeouts"]["connect"] = "5 parsecs"
    up["pool"]["max_connections"] = "many"
    up["limits"]["max_request_body"] = "1 lot"
    up["surprise"] = True
    up["breaker"]["mode"] = "sometimes"
    errs = errors_of(tmp_path, bad)
    joined = "\n".join(errs)
    assert "upstreams.database.retry.attempts: must be >= 1" in errs
    assert "upstreams.database.timeouts.connect: invalid duration '5 parsecs'" in joined
    assert "upstreams.database.pool.max_connections:" in joined
    assert "upstreams.database.limits.max_request_body: invalid size '1 lot'" in joined
    assert "upstreams.database.surprise: unknown key" in errs
    assert "upstreams.database.breaker.mode:" in joined
    assert len(errs) == 6


def test_semantic_errors(tmp_path):
    base = {"listen": "127.0.0.1:9002", "targets": [{"name": "stable", "url": "http://x"}]}
    assert any("loopback" in e for e in errors_of(tmp_path, {"upstreams": {"db": {**base, "listen": "0.0.0.0:9002"}}}))
    assert any("already used" in e for e in errors_of(tmp_path, {"upstreams": {"db": base, "db2": base}}))
    dup = {**base, "targets": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]}
    assert any("unique" in e for e in errors_of(tmp_path, {"upstreams": {"db": dup}}))
    assert any("URL" in e for e in errors_of(tmp_path, {"upstreams": {"db": {**base, "targets": [{"name": "a", "url": "db:80"}]}}}))
    assert any("stale_ttl" in e for e in errors_of(tmp_path, {"upstreams": {"db": {**base, "fallback": {"cache_ttl": "2h"}}}}))
    assert any("retry.on" in e for e in errors_of(tmp_path, {"upstreams": {"db": {**base, "retry": {"on": ["sometimes"]}}}}))
    shared = {"url": "rediss://cache:6380/0"}
    errs = errors_of(tmp_path, {"upstreams": {"db": {**base, "fallback": {"cache_entries": 0, "shared": shared}}}})
    assert any(e.startswith("upstreams.db.fallback") and "cache_entries > 0" in e for e in errs), errs
    errs = errors_of(tmp_path, {"upstreams": {"db": {**base, "fallback": {
        "shared": {**shared, "tls": {"server_name": "cache.internal"}}}}}})
    assert any(e.startswith("upstreams.db.fallback.shared.tls.server_name") for e in errs), errs
    errs = errors_of(tmp_path, {"upstreams": {"db": {**base, "routes": [{"name": "r", "retry": {"attempts": 99}}]}}})
    assert any(e.startswith("upstreams.db.routes") and "r.retry" in e for e in errs), errs


def test_invalid_yaml_and_missing_file(tmp_path):
    errs = errors_of(tmp_path, "upstreams: [unclosed")
    assert "invalid YAML" in errs[0] and "line" in errs[0]
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "nope.yaml"))


def test_references_resolve_strip_and_fail_clearly(tmp_path, monkeypatch):
    key = tmp_path / "key"
    key.write_text("sk-secret-value\n")
    monkeypatch.setenv("TEAM", "core")
    data = {"upstreams": {"db": {"listen": "127.0.0.1:9002", "targets": [{"name": "stable", "url": "http://x"}],
                                 "request_headers": {"Authorization": f"Bearer ${{file:{key}}}", "X-Team": "${env:TEAM}"}}}}
    loaded = load(write(tmp_path, data))
    assert loaded.settings.upstreams["db"].request_headers == {"Authorization": "Bearer sk-secret-value", "X-Team": "core"}
    assert str(key) in loaded.files
    shown = str(redacted(loaded))
    assert "sk-secret-value" not in shown and f"${{file:{key}}}" in shown
    data["upstreams"]["db"]["request_headers"] = {"A": "${env:NOT_SET_ANYWHERE}", "B": "${file:/no/such/file}"}
    errs = errors_of(tmp_path, data)
    assert "upstreams.db.request_headers.A: environment variable NOT_SET_ANYWHERE is not set" in errs
    assert any(e.startswith("upstreams.db.request_headers.B: cannot read /no/such/file") for e in errs)


def test_literal_secrets_redacted_in_admin_config(tmp_path):
    data = {"upstreams": {"db": {"listen": "127.0.0.1:9002", "targets": [{"name": "stable", "url": "http://u:pw123@x"}],
                                 "request_headers": {"Authorization": "Bearer literal-key"}}}}
    shown = str(redacted(load(write(tmp_path, data))))
    assert "literal-key" not in shown and "pw123" not in shown


def test_check_config_exit_codes(tmp_path, capsys):
    good = write(tmp_path, FULL)
    assert main(["check-config", good]) == 0
    assert "database" in capsys.readouterr().out
    bad = yaml.safe_load(yaml.safe_dump(FULL))
    bad["upstreams"]["database"]["retry"]["attempts"] = 0
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    assert main(["check-config", str(p)]) == 1
    assert "upstreams.database.retry.attempts: must be >= 1" in capsys.readouterr().err
    refs = yaml.safe_load(yaml.safe_dump(FULL))
    refs["upstreams"]["database"]["request_headers"] = {"X": "${env:NOT_SET_ANYWHERE}"}
    p.write_text(yaml.safe_dump(refs))
    assert main(["check-config", str(p)]) == 0
    assert "warning: upstreams.database.request_headers.X" in capsys.readouterr().out
    assert main(["check-config", "--strict", str(p)]) == 1
    assert main(["run", "--config", str(p)]) == 1


def test_usage_error_exit_code():
    r = subprocess.run([sys.executable, "-m", "proxy", "frobnicate"], capture_output=True)
    assert r.returncode == 2
    r = subprocess.run([sys.executable, "-m", "proxy", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "resilience-proxy" in r.stdout


@pytest.mark.parametrize("shipped", ["config/proxy.yaml", "config/demo.yaml"])
def test_shipped_configs_are_valid(shipped):
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    loaded = load(os.path.join(root, shipped), strict_refs=False)
    assert loaded.settings.upstreams
