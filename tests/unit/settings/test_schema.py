"""The JSON Schema of config.yaml (`resilience-proxy config-schema`, the Helm chart's values.schema.json):
every config the loader accepts, in its canonical form, passes it; what it refuses it names by path;
references stand for any value; the chart carries exactly what the specs generate."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from proxy.settings import ConfigError, load
from proxy.settings.schema import config_schema
from tests.support.tools import ROOT
from tests.unit.settings.test_config_fuzz import VALIDISH

SCHEMA = config_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
SHIPPED = [ROOT / "k8s/base/config.yaml", ROOT / "config/demo.yaml", ROOT / "config/openai-failover.yaml",
           ROOT / "proxy/demo.yaml"]


def _errors(doc) -> list[str]:
    return sorted("/".join(str(p) for p in e.absolute_path) for e in VALIDATOR.iter_errors(doc))


def test_the_schema_is_itself_valid_2020_12():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"].endswith("2020-12/schema")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_passes_as_written(path):
    load(str(path), strict_refs=False)  # the loader takes it, so the schema must
    assert _errors(yaml.safe_load(path.read_text())) == []


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=VALIDISH)
def test_whatever_the_loader_accepts_passes_in_canonical_form(tmp_path, doc):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(doc))
    try:
        loaded = load(str(p), strict_refs=False)
    except ConfigError:
        return
    canonical = loaded.settings.model_dump(mode="json")
    assert _errors(canonical) == [], canonical


def _doc(**database) -> dict:
    up = {"protocol": "http", "listen": "127.0.0.1:9002", "targets": [{"name": "stable", "url": "http://db:8080"}]}
    up.update(database)
    return {"upstreams": {"database": up}}


@pytest.mark.parametrize("change,path", [
    ({"retry": {"attempts": 0}}, "upstreams/database/retry/attempts"),
    ({"retry": {"attempts": "three"}}, "upstreams/database/retry/attempts"),
    ({"protocol": "ftp"}, "upstreams/database/protocol"),
    ({"timeouts": {"attempt": "5 parsecs"}}, "upstreams/database/timeouts/attempt"),
    ({"fallback": {"cache_bytes": "64 lots"}}, "upstreams/database/fallback/cache_bytes"),
    ({"breaker": {"fail_maks": 3}}, "upstreams/database/breaker"),  # a typo: unknown keys are refused
    ({"targets": []}, "upstreams/database/targets"),
])
def test_a_bad_value_is_refused_at_its_path_by_both(tmp_path, change, path):
    doc = _doc(**change)
    assert path in _errors(doc)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as exc:
        load(str(p))
    assert any(line.startswith(path.replace("/", ".")) for line in exc.value.errors), exc.value.errors


def test_an_upstream_name_the_loader_refuses_is_refused():
    doc = {"upstreams": {"Bad Name": _doc()["upstreams"]["database"]}}
    assert _errors(doc) != []


def test_a_reference_may_stand_for_a_number_an_enum_or_a_duration():
    doc = _doc(retry={"attempts": "${env:RETRIES}"}, protocol="${env:PROTO}",
               timeouts={"attempt": "${file:/etc/attempt}"}, breaker={"fail_max": 5})
    assert _errors(doc) == []


def test_the_cli_prints_the_same_schema():
    out = subprocess.run([sys.executable, "-m", "proxy", "config-schema"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == SCHEMA
