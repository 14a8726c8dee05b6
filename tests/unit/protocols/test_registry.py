"""The protocol seam: "which protocol is this?" is answered by proxy/protocols alone, and what the
registry holds is what the config accepts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from proxy import protocols
from proxy.settings import ConfigError, load
from tests.support.tools import ROOT

NAMES = frozenset(protocols.PROTOCOLS)


def _is_protocol_value(node: ast.AST) -> bool:
    """`x.protocol`, `x["protocol"]`, `x.get("protocol")`: a protocol name read from somewhere."""
    if isinstance(node, ast.Attribute):
        return node.attr == "protocol"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "protocol"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "protocol"
    return False


def _names_a_protocol(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in NAMES
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_names_a_protocol(e) for e in node.elts)
    return False


def _is_url_scheme(node: ast.AST) -> bool:
    """`u.scheme == "http"` compares a URL's scheme, which shares its spelling with the protocol."""
    return isinstance(node, ast.Attribute) and node.attr == "scheme"


def protocol_comparisons(source: str) -> list[int]:
    """Line numbers of comparisons that branch on a protocol: with a protocol's name, or of a protocol
    value read from a spec or a dict (`== "redis"`, `!= "openai"`, `.get("protocol") ==`, `in ("http", …)`)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_url_scheme(o) for o in operands):
                continue
            if any(_names_a_protocol(o) or _is_protocol_value(o) for o in operands):
                lines.append(node.lineno)
        elif isinstance(node, ast.match_case) and _names_a_protocol(getattr(node.pattern, "value", None) or ast.Pass()):
            lines.append(node.pattern.lineno)
    return lines


@pytest.mark.parametrize("snippet", [
    'if spec.protocol == "redis": pass',
    'if up.protocol != "openai": pass',
    'if data.get("protocol") == "openai": pass',
    'ok = name in ("http", "openai")',
    'ok = spec["protocol"] is not None and spec["protocol"] == other',
    'match kind:\n    case "redis": pass',
])
def test_the_detector_sees_a_protocol_branch(snippet):
    assert protocol_comparisons(snippet), snippet


@pytest.mark.parametrize("snippet", [
    'if u.scheme == "http": pass',
    'for m in ("redis", "tornado"): pass',
    'key = (spec.listen, spec.protocol)',
    'if current.key == key: pass',
])
def test_the_detector_leaves_other_code_alone(snippet):
    assert protocol_comparisons(snippet) == [], snippet


def test_nothing_outside_the_protocols_package_branches_on_a_protocol():
    package = ROOT / "proxy"
    found = []
    for path in sorted(package.rglob("*.py")):
        if (package / "protocols") in path.parents:
            continue
        for line in protocol_comparisons(path.read_text()):
            found.append(f"{path.relative_to(ROOT)}:{line}")
    assert found == [], "branch on the protocol in proxy/protocols instead:\n" + "\n".join(found)


def _write(tmp_path: Path, upstream: dict) -> str:
    import yaml

    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump({"upstreams": {"x": {"listen": "127.0.0.1:9002", **upstream}}}))
    return str(p)


def _errors(tmp_path, upstream) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load(_write(tmp_path, upstream))
    return ei.value.errors


@pytest.mark.parametrize("protocol,section,owner", [
    ("http", {"llm": {"fallback_models": ["m"]}}, "openai"),
    ("redis", {"llm": {"models": ["m"]}}, "openai"),
    ("openai", {"client_auth": {"password_file": "/p"}}, "redis"),
])
def test_another_protocols_section_is_a_field_path_error(tmp_path, protocol, section, owner):
    scheme = protocols.get(protocol).schemes[0]
    errors = _errors(tmp_path, {"protocol": protocol, "targets": [{"name": "s", "url": f"{scheme}://h"}], **section})
    key = next(iter(section))
    assert errors == [f"upstreams.x.{key}: only for protocol {owner} (this upstream is {protocol})"]


def test_a_redis_target_key_on_an_http_target_is_refused(tmp_path):
    errors = _errors(tmp_path, {"targets": [{"name": "s", "url": "http://h", "password_file": "/p"}]})
    assert errors == ["upstreams.x.targets.0.password_file: only for protocol redis (this upstream is http)"]


def test_an_unknown_protocol_names_the_known_ones(tmp_path):
    errors = _errors(tmp_path, {"protocol": "grpc", "targets": [{"name": "s", "url": "http://h"}]})
    assert errors == [f"upstreams.x.protocol: must be one of {', '.join(sorted(NAMES))}, got 'grpc'"]


@pytest.mark.parametrize("name", sorted(NAMES))
def test_each_protocols_defaults_and_schemes_are_what_the_config_gets(tmp_path, name):
    p = protocols.get(name)
    spec = load(_write(tmp_path, {"protocol": name, "targets": [{"name": "s", "url": f"{p.schemes[-1]}://h"}]}
                       )).settings.upstreams["x"]
    for section, values in p.defaults.items():
        for key, value in values.items():
            got = getattr(getattr(spec, section), key)
            assert got == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"
    other = next(s for q in protocols.PROTOCOLS.values() if q is not p for s in q.schemes if s not in p.schemes)
    errors = _errors(tmp_path, {"protocol": name, "targets": [{"name": "s", "url": f"{other}://h"}]})
    assert errors == [f"upstreams.x.targets: s: protocol {name} needs a {' or '.join(p.schemes)} URL"]


def test_a_config_saved_from_the_old_admin_config_still_loads(tmp_path):
    """/admin/config used to show every section on every upstream (defaults, nulls): such a dump loads;
    only a section that says something is refused."""
    from proxy.settings.spec import ClientAuthSpec, LLMSpec

    dump = {"targets": [{"name": "s", "url": "http://h", "password_file": None}],
            "llm": LLMSpec().model_dump(mode="json"), "client_auth": ClientAuthSpec().model_dump(mode="json")}
    spec = load(_write(tmp_path, dump)).settings.upstreams["x"]
    assert spec.llm == LLMSpec() and spec.targets[0].password_file is None


def test_every_misplaced_section_is_reported_at_once(tmp_path):
    errors = _errors(tmp_path, {"targets": [{"name": "s", "url": "http://h", "password_file": "/p"},
                                            {"name": "t", "url": "http://h2", "password_file": "/q"}],
                                "llm": {"models": ["m"]}, "client_auth": {"password_file": "/c"}})
    assert sorted(errors) == sorted([
        "upstreams.x.llm: only for protocol openai (this upstream is http)",
        "upstreams.x.client_auth: only for protocol redis (this upstream is http)",
        "upstreams.x.targets.0.password_file: only for protocol redis (this upstream is http; 1 more target the same)",
    ])
