"""The JSON Schema of `config.yaml`, derived from the specs themselves (never kept by hand): what
`resilience-proxy config-schema` prints for editors and CI, and what the Helm chart's values.schema.json
holds under `config`, so `helm install` refuses a bad value before anything reaches a pod.

Not on the data path. The schema says what JSON Schema can: types, bounds, enums, patterns, required
keys and unknown keys refused. Rules across fields (two listeners on one port, a shared cache inside the
dependency it stands in for) stay with the loader: `check-config` and a reload still have the last word.
"""

from __future__ import annotations

import copy
import json

from proxy.settings.spec import NAME

# `${env:NAME}` and `${file:/path}` may stand for any value: the loader resolves them before validation,
# so a number or an enum may be written as a reference and is checked once resolved.
REFERENCE_SCHEMA = {"type": "string", "pattern": r"\$\{(env|file):[^}]+\}",
                    "description": "a ${env:NAME} or ${file:/path} reference, resolved when the config loads"}
REFERENCE = {"$ref": "#/$defs/Reference"}
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _constrained(node: dict) -> bool:
    """A leaf a reference could not satisfy as it stands."""
    t = node.get("type")
    if t in ("number", "integer", "boolean"):
        return True
    return t == "string" and any(k in node for k in ("pattern", "enum", "const", "minLength", "maxLength"))


def _walk(node: object, key: str = "") -> object:
    if isinstance(node, list):
        return [_walk(x, key) for x in node]
    if not isinstance(node, dict):
        return node
    if key in ("properties", "$defs", "patternProperties"):  # a map of names to schemas
        return {k: _walk(v) for k, v in node.items()}
    # pydantic's titles repeat the key names: noise in an editor's hover
    out = {k: _walk(v, k) for k, v in node.items() if k != "title"}
    if key == "anyOf":  # a branch of a union: the union as a whole takes the reference (below)
        return out
    if "anyOf" in out:
        if any(isinstance(x, dict) and _constrained(x) for x in out["anyOf"]):
            out["anyOf"] = [*out["anyOf"], REFERENCE]
        return out
    if _constrained(out):
        lifted = {k: out.pop(k) for k in ("default", "description") if k in out}
        return {"anyOf": [out, REFERENCE], **lifted}
    return out


def config_schema() -> dict:
    """The schema of config.yaml: a document whose definitions sit under `$defs` at its root."""
    from proxy.protocols import PROTOCOLS
    from proxy.settings.loader import Settings

    raw = Settings.model_json_schema(mode="validation")
    # a str checked against the protocol table by a validator: the table's names are the enum
    raw["$defs"]["UpstreamSpec"]["properties"]["protocol"]["enum"] = sorted(PROTOCOLS)
    schema = _walk(raw)
    # upstream names are keys, which no reference replaces
    schema["properties"]["upstreams"]["propertyNames"] = {"pattern": NAME}
    schema["$defs"]["Reference"] = REFERENCE_SCHEMA
    schema["$schema"] = DRAFT
    schema["description"] = ("resilience-proxy config.yaml (generated from the specs by "
                             "`resilience-proxy config-schema`)")
    return schema


def embedded(schema: dict) -> tuple[dict, dict]:
    """(the schema without its definitions, the definitions): for a document that nests the config under
    a key, with the definitions hoisted to its own root (so `#/$defs/...` still resolves)."""
    body = copy.deepcopy(schema)
    defs = body.pop("$defs", {})
    body.pop("$schema", None)
    return body, defs


def dumps(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"
