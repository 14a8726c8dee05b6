"""`resilience-proxy inject [-f FILE|-]`: reads multi-document YAML and writes it back with the sidecar,
its volumes and (optionally) the app's env and probes. Comments and key order are kept (ruamel.yaml
round-trip), documents that hold no pod are left untouched, and injecting twice equals injecting once."""

from __future__ import annotations

import io
import sys

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from proxy.k8s.sidecar import InjectError, Options, inject_object


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    y.explicit_start = False
    return y


def inject_text(text: str, opts: Options) -> str:
    y = _yaml()
    try:
        docs = list(y.load_all(text))
    except YAMLError as exc:
        raise InjectError(f"invalid YAML: {exc}") from None
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        try:
            inject_object(doc, opts)
        except InjectError as exc:
            raise InjectError(f"document {i + 1}: {exc}") from None
    out = io.StringIO()
    y.dump_all(docs, out)
    return out.getvalue()


def main(path: str, opts: Options) -> int:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as exc:
        print(f"resilience-proxy inject: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(inject_text(text, opts))
    except InjectError as exc:
        print(f"resilience-proxy inject: {exc}", file=sys.stderr)
        return 1
    return 0
