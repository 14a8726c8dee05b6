"""The demo's port base applied to any demo config (its one upstream, whatever its name)."""

from __future__ import annotations

import pytest
import yaml

from proxy.demo import _with_port_base
from proxy.settings import load


def test_port_base_moves_listener_admin_and_gateway_of_a_custom_config(tmp_path):
    src = tmp_path / "mine.yaml"
    src.write_text(yaml.safe_dump({"upstreams": {"shop": {"listen": "127.0.0.1:9002",
                                                          "targets": [{"name": "stable", "url": "http://127.0.0.1:18002"}]}}}))
    path, gateway = _with_port_base(str(src), 30000, str(tmp_path))
    s = load(path).settings
    assert (s.upstreams["shop"].listen, s.admin.listen, gateway) == ("127.0.0.1:30000", "127.0.0.1:30001", 30002)
    assert s.upstreams["shop"].targets[0].url == "http://127.0.0.1:30002"


def test_port_base_needs_an_upstream(tmp_path):
    src = tmp_path / "empty.yaml"
    src.write_text("admin: {listen: '127.0.0.1:1'}\n")
    with pytest.raises(ValueError, match="needs an upstream"):
        _with_port_base(str(src), 30000, str(tmp_path))


def test_port_base_moves_every_listener_and_built_in_upstream_of_the_shipped_demo(tmp_path):
    from proxy.demo import OFFSETS, _targets, demo_config_path

    path, gateway = _with_port_base(demo_config_path(), 40000, str(tmp_path))
    s = load(path).settings
    assert list(s.upstreams) == ["database", "llm", "cache"]  # the order is kept: the first is the database
    assert {n: u.listen for n, u in s.upstreams.items()} == {
        "database": "127.0.0.1:40000", "llm": "127.0.0.1:40003", "cache": "127.0.0.1:40005"}
    cfg = yaml.safe_load(open(path))
    assert _targets(cfg) == {"gateway": 40002, "canary": 40007, "provider": 40004, "server": 40006}
    assert s.upstreams["cache"].targets[0].url == "redis://127.0.0.1:40006/0"  # scheme and db kept
    assert gateway == 40002 and s.admin.listen == "127.0.0.1:40001" and max(OFFSETS.values()) == 7
