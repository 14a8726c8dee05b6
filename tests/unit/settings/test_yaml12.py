"""The config file is read as YAML 1.2, within bounds: each malformed or hostile input is one error line
with where it is, never a traceback, a hang or gigabytes."""

from __future__ import annotations

import pytest

from proxy.settings import ConfigError, load, yaml12

GOOD = b"""upstreams:
  db:
    listen: 127.0.0.1:9002
    targets: [{name: stable, url: "http://db:8080"}]
    retry: {on: [reset, 503]}
"""


def errors(tmp_path, data: bytes) -> list[str]:
    p = tmp_path / "c.yaml"
    p.write_bytes(data)
    with pytest.raises(ConfigError) as ei:
        load(str(p))
    return [e.replace(str(p), "<path>") for e in ei.value.errors]


def test_on_off_yes_no_are_strings_and_numbers_are_yaml_12():
    doc = yaml12.load(b"a: {on: 1, off: 2, yes: 3, no: 4}\nb: [true, False, yes, on]\nc: 012\nd: 0x1f\ne: 1:30\n")
    assert doc == {"a": {"on": 1, "off": 2, "yes": 3, "no": 4}, "b": [True, False, "yes", "on"], "c": 12, "d": 31,
                   "e": "1:30"}


def test_the_readmes_unquoted_retry_on_loads(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(GOOD)
    assert load(str(p)).settings.upstreams["db"].retry.on == ("reset", "503")


@pytest.mark.parametrize("data,error", [
    (GOOD + b"upstreams: {}\n", "<file>: <path>: invalid YAML (line 6, column 1): the key 'upstreams' is given twice"),
    (b"a: " + b"[" * 100 + b"]" * 100, "<file>: <path>: invalid YAML (line 1, column 67): nested deeper than 64 levels"),
    (b"a: " + b"[" * 10_000 + b"]" * 10_000, "<file>: <path>: invalid YAML (line 1, column 1003): exceeded maximum nesting depth"),
    (b"a: &a [" + b",".join([b"x"] * 100) + b"]\nb: [" + b",".join([b"*a"] * 11) + b"]\n",
     "<file>: <path>: invalid YAML (line 1, column 4): aliases of this node expand to more than 1000 nodes"),
    (b"log: {level: \xff}\n", "<file>: <path>: not UTF-8 text (byte 13)"),
    (b"#" * (1024 * 1024 + 1), "<file>: <path>: larger than 1024 KiB (1048577 bytes)"),
    (b"[1, 2]\n", "<root>: <path>: must be a mapping, got list"),
])
def test_malformed_input_is_one_error_line(tmp_path, data, error):
    assert errors(tmp_path, data) == [error]


def test_a_billion_laughs_is_refused_before_it_expands(tmp_path):
    lines = [b"l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(b"l%d: &l%d [" % (i, i) + b", ".join([b"*l%d" % (i - 1)] * 10) + b"]")
    (e,) = errors(tmp_path, b"\n".join(lines) + b"\n")
    assert "aliases of this node expand to more than 1000 nodes" in e


def test_a_credential_in_a_mistyped_url_is_not_shown_back(tmp_path):
    e = errors(tmp_path, b"upstreams:\n  db:\n    listen: 127.0.0.1:9002\n"
                         b"    targets: [{name: s, url: 'htp://app:s3cr3t@db:8080'}]\n")
    assert e[0] == ("upstreams.db.targets.0.url: must be an absolute URL (http://, https://, redis://, rediss://), "
                    "got 'htp://<redacted>@db:8080'")
    assert "s3cr3t" not in str(e)


def test_admin_config_redacts_app_urls_and_literal_header_values(tmp_path):
    from proxy.settings import redacted

    p = tmp_path / "c.yaml"
    p.write_bytes(b"app: {ready_url: 'http://u:pw1234@127.0.0.1:8000/ready'}\n" + GOOD.replace(
        b"    retry:", b"    request_headers: {X-Tenant: acme-9, Accept: application/json}\n    retry:"))
    dump = redacted(load(str(p)))
    assert dump["app"]["ready_url"] == "http://<redacted>@127.0.0.1:8000/ready"
    assert dump["upstreams"]["db"]["request_headers"] == {"X-Tenant": "<redacted>", "Accept": "application/json"}


def test_a_config_error_raised_after_validation_is_redacted_too():
    from proxy.settings import ConfigError

    # the runtime build and the transports raise their own lines (a bad target URL, an unreadable CA)
    err = ConfigError(["upstreams.db.targets[0].url: bad port in 'redis://app:s3cr3t@db:99999'"])
    assert err.errors == ["upstreams.db.targets[0].url: bad port in 'redis://<redacted>@db:99999'"]
    assert "s3cr3t" not in str(err)
