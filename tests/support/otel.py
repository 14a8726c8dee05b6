"""A real OpenTelemetry Collector (scripts/otelcol.sh builds it: the OTLP receiver and the contrib file
exporter) on free loopback ports, writing what it receives as OTLP JSON lines; `spans()` reads them back
as flat records (trace, span, parent, name, kind, attributes) for the tests to walk as a tree."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

from tests.support.net import free_port
from tests.support.tools import start_process, stop_process


def binary() -> str:
    b = os.environ.get("RESILIENCE_PROXY_OTELCOL")
    if not b or not Path(b).exists():
        raise RuntimeError("the OpenTelemetry Collector is not built: run `make test` (scripts/otelcol.sh builds it "
                           "once) or set RESILIENCE_PROXY_OTELCOL to its binary")
    return b


def _value(v: dict):
    for k in ("stringValue", "boolValue", "doubleValue"):
        if k in v:
            return v[k]
    if "intValue" in v:
        return int(v["intValue"])
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values", [])]
    return None


class Collector:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="otelcol-"))
        self.http_port, self.grpc_port = free_port(), free_port()
        self.out = self.dir / "spans.jsonl"
        self.proc = None

    def start(self) -> Collector:
        cfg = self.dir / "config.yaml"
        cfg.write_text(json.dumps({
            "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{self.http_port}"},
                                                 "grpc": {"endpoint": f"127.0.0.1:{self.grpc_port}"}}}},
            "exporters": {"file": {"path": str(self.out), "flush_interval": "100ms"}},
            "service": {"telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
                        "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file"]}}},
        }))

        def answers() -> bool:
            for port in (self.http_port, self.grpc_port):
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
            return True

        self.proc = start_process([binary(), "--config", f"file:{cfg}"], answers, "otelcol")
        return self

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def spans(self) -> list[dict]:
        out = []
        if not self.out.exists():
            return out
        for line in self.out.read_text().splitlines():
            if not line.strip():
                continue
            for rs in json.loads(line).get("resourceSpans", []):
                resource = {a["key"]: _value(a["value"]) for a in rs.get("resource", {}).get("attributes", [])}
                for ss in rs.get("scopeSpans", []):
                    for s in ss.get("spans", []):
                        out.append({"trace": s["traceId"], "span": s["spanId"], "parent": s.get("parentSpanId", ""),
                                    "name": s["name"], "kind": s.get("kind"), "status": s.get("status", {}),
                                    "attributes": {a["key"]: _value(a["value"]) for a in s.get("attributes", [])},
                                    "resource": resource})
        return out

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
