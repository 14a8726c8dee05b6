"""The command policy's rules, CONFIG GET masking and the AUTH throttle, without sockets."""

from __future__ import annotations

import pytest

from proxy.redis import codec
from proxy.redis.guard import AuthThrottle, CommandGuard, masked_config
from proxy.settings.spec import RedisSpec


def guard(**kw) -> CommandGuard:
    return CommandGuard("cache", RedisSpec(**kw))


@pytest.mark.parametrize("args,rule", [
    ([b"CONFIG", b"set", b"x", b"1"], "CONFIG SET"), ([b"CONFIG", b"GET", b"x"], None), ([b"DEBUG", b"SLEEP", b"0"], "DEBUG"),
    ([b"ACL", b"LIST"], "ACL"), ([b"ACL", b"whoami"], None), ([b"ACL"], "ACL"), ([b"CLIENT", b"KILL", b"x"], "CLIENT KILL"),
    ([b"CLIENT", b"LIST"], None), ([b"GET", b"k"], None), ([b"FLUSHALL"], None), ([b"MONITOR"], None)])
def test_default_rules(args, rule):
    assert guard().refusal(args[0].upper(), args) == rule


def test_the_upstreams_rules_beat_the_defaults_and_a_subcommand_beats_its_command():
    g = guard(deny_commands=("acl whoami", "SCRIPT|FLUSH", "keys"), allow_commands=("DEBUG", "CONFIG SET"))
    assert g.refusal(b"ACL", [b"ACL", b"WHOAMI"]) == "ACL WHOAMI"
    assert g.refusal(b"ACL", [b"ACL", b"CAT"]) is None
    assert g.refusal(b"SCRIPT", [b"SCRIPT", b"FLUSH"]) == "SCRIPT FLUSH" and g.refusal(b"SCRIPT", [b"SCRIPT", b"LOAD"]) is None
    assert g.refusal(b"KEYS", [b"KEYS", b"*"]) == "KEYS"
    assert g.refusal(b"DEBUG", [b"DEBUG", b"SLEEP"]) is None and g.refusal(b"CONFIG", [b"CONFIG", b"SET"]) is None
    assert g.refusal(b"CONFIG", [b"CONFIG", b"REWRITE"]) == "CONFIG REWRITE"
    assert g.noperm("KEYS").startswith(b"-NOPERM 'KEYS' is not relayed") and b"upstreams.cache.redis" in g.noperm("KEYS")


@pytest.mark.parametrize("bad", ["CONFIG SET X", "", "1DEBUG", "GET\r\nFLUSHALL"])
def test_a_rule_that_is_not_a_command_is_refused(bad):
    with pytest.raises(ValueError, match="is not a command name"):
        RedisSpec(deny_commands=(bad,))


def test_a_rule_both_denied_and_allowed_is_refused():
    with pytest.raises(ValueError, match="KEYS is also in deny_commands"):
        RedisSpec(deny_commands=("keys",), allow_commands=("KEYS",))


def _pairs(*items: bytes, resp3=False) -> bytes:
    head = b"%%%d\r\n" % (len(items) // 2) if resp3 else b"*%d\r\n" % len(items)
    return head + b"".join(b"$%d\r\n%s\r\n" % (len(i), i) for i in items)


@pytest.mark.parametrize("resp3", [False, True])
def test_config_get_values_of_secret_parameters_are_replaced(resp3):
    raw = _pairs(b"requirepass", b"p\r\nw", b"maxclients", b"10", b"MasterAuth", b"x", resp3=resp3)
    assert masked_config(raw) == _pairs(b"requirepass", b"<redacted>", b"maxclients", b"10", b"MasterAuth",
                                        b"<redacted>", resp3=resp3)
    assert masked_config(_pairs(resp3=resp3)) == _pairs(resp3=resp3)


@pytest.mark.parametrize("raw", [b"*1\r\n:1\r\n", b"*2\r\n$11\r\nrequirepass\r\n$3\r\nabc", b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n",
                                 b"*2\r\n$1\r\na\r\n$9\r\nb\r\n", b"+OK\r\n", b"*2\r\n$1\r\na\r\n*1\r\n$1\r\nb\r\n"])
def test_a_config_get_reply_of_another_shape_fails_closed(raw):
    assert codec.mask_pairs(raw, frozenset({b"a"}), b"x") is None
    assert masked_config(raw).startswith(b"-ERR the CONFIG GET reply could not be checked")


def test_an_error_reply_passes():
    assert masked_config(b"-ERR unknown\r\n") == b"-ERR unknown\r\n"


def test_the_auth_throttle_spaces_checks_after_the_free_failures_and_refuses_a_long_wait():
    t = AuthThrottle()
    now = 100.0
    for _ in range(t.FREE):
        assert t.wait(now) == 0.0
        t.failed(now)
    waits = [t.wait(now) for _ in range(25)]
    checked = [w for w in waits if w is not None]
    assert checked == pytest.approx([i * t.INTERVAL for i in range(len(checked))])
    assert checked[-1] <= t.MAX_WAIT and waits[len(checked):] == [None] * (25 - len(checked))
    assert t.wait(now + t.MAX_WAIT) is not None  # the queue moved on
    assert t.wait(now + t.FORGET + 1) == 0.0  # a minute without a failure: forgotten


def test_the_upstreams_whole_command_rule_replaces_the_defaults_subcommand_rules():
    g = guard(deny_commands=("ACL",), allow_commands=("CONFIG",))
    assert g.refusal(b"ACL", [b"ACL", b"WHOAMI"]) == "ACL"  # the default allowed WHOAMI; the upstream denies all
    assert g.refusal(b"CONFIG", [b"CONFIG", b"SET"]) is None  # as the NOPERM text says: allow_commands lets it
    mixed = guard(deny_commands=("ACL WHOAMI",), allow_commands=("ACL",))
    assert mixed.refusal(b"ACL", [b"ACL", b"WHOAMI"]) == "ACL WHOAMI" and mixed.refusal(b"ACL", [b"ACL", b"LIST"]) is None
