"""OpenTelemetry traces (`tracing:`), beside the data path: the OpenTelemetry SDK and its OTLP exporter,
imported only when tracing is enabled (so the idle RSS of a proxy without it holds).

Spans, and where they start:
* server span — one per request the app makes, at the HTTP listener (proxy/listen/http.py): the app's W3C
  `traceparent` continued, the route, the track chosen, the status, the fallback taken and why; on an
  openai upstream the GenAI attributes of the whole answer (proxy/listen/openai.py);
* client span — one per upstream attempt, the innermost policy of the chain (proxy/policy/trace.py): its
  context injected upstream as `traceparent`, `http.request.resend_count`, the breaker's state, the track,
  and on openai upstreams the model this attempt asks;
* a Redis command batch (one read of a client's commands) — at the RESP listener (proxy/redis/listener.py),
  with `db.system.name=redis` and the command names only, never their arguments.

Exporting never waits on the data path: ended spans go into a bounded queue that a background thread
exports in batches; a full queue drops the span and counts it (`tracing_spans_dropped_total`).
"""

from __future__ import annotations

import contextvars
import logging
import random

from proxy.obs import log

# Set while a request runs inside its (sampled) server span: the chain's attempt spans are made only
# then. The sampling decision is taken once, before any span exists, so an unsampled request costs a
# coin toss and nothing of the SDK.
IN_SPAN: contextvars.ContextVar[bool] = contextvars.ContextVar("resilience_proxy_in_span", default=False)

# the SDK logs one warning per span dropped from a full queue: counted instead (below)
logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
logging.getLogger("opentelemetry.exporter").setLevel(logging.ERROR)


def _grpc(spec):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=spec.endpoint, insecure=spec.endpoint.startswith("http://"), timeout=spec.timeout)


def _http(spec):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=spec.endpoint.rstrip("/") + "/v1/traces", timeout=spec.timeout)


_EXPORTERS = {"grpc": _grpc, "http/protobuf": _http}


class Tracing:
    """State per `tracing` spec: the tracer provider and its exporter. A pool to the StateStore: a reload
    that keeps the spec keeps it; one that changes or drops it flushes and shuts the old one down."""

    busy = 0  # the drain waits for nothing here: close() flushes

    def __init__(self, spec, metrics) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        from proxy import __version__

        self.spec = spec
        exporter = _EXPORTERS[spec.protocol](spec)  # OTLP's transport, not one of the proxy's protocols
        full, failed = metrics.tracing_dropped.labels("queue_full"), metrics.tracing_dropped.labels("export_failed")

        class Bounded(BatchSpanProcessor):
            def on_end(self, span) -> None:
                queue = getattr(self._batch_processor, "_queue", None)
                if queue is not None and len(queue) >= queue.maxlen:
                    full.inc()  # the oldest waiting span goes: the data path never waits for the exporter
                super().on_end(span)

        class Counted:
            """The exporter, with the spans it could not deliver counted (a Collector away or refusing)."""

            def __init__(self, inner) -> None:
                self.inner = inner

            def export(self, spans):
                from opentelemetry.sdk.trace.export import SpanExportResult

                try:
                    result = self.inner.export(spans)
                except Exception:  # noqa: BLE001 — an exporter that raises: the batch is lost all the same
                    result = SpanExportResult.FAILURE
                if result is not SpanExportResult.SUCCESS:
                    failed.inc(len(spans))
                return result

            def shutdown(self):
                return self.inner.shutdown()

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return self.inner.force_flush(timeout_millis)

        exporter = Counted(exporter)

        self.provider = TracerProvider(
            resource=Resource.create({"service.name": spec.service_name, "service.version": __version__}),
            sampler=ALWAYS_ON)  # sampled() decided before the span was made
        self.processor = Bounded(exporter, max_queue_size=spec.max_queue, schedule_delay_millis=1000,
                                 max_export_batch_size=min(128, spec.max_queue))  # shorter GIL holds: p99
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("resilience-proxy", __version__)
        log.info("tracing_started", protocol=spec.protocol, sample_ratio=spec.sample_ratio)

    def sampled(self, headers, rand=None) -> bool:
        """Trace this request? The app's decision when it sent a traceparent (its sampled flag), else
        tracing.sample_ratio — what ParentBased(TraceIdRatioBased) decides, without making a span first."""
        tp = headers.get("traceparent")
        if tp is not None and len(tp) == 55 and tp[2] == "-" and tp[52] == "-":
            try:
                return bool(int(tp[53:55], 16) & 1)
            except ValueError:
                pass
        return self.coin(rand)

    def coin(self, rand=None) -> bool:
        """A root span's sampling (a request without a parent, a Redis batch): tracing.sample_ratio."""
        return (rand or random.random)() < self.spec.sample_ratio

    async def close(self) -> None:
        import asyncio

        # a flush waits for the exporter (a thread): never on the event loop
        await asyncio.to_thread(self.provider.shutdown)


def tracing_for(settings, store, metrics) -> Tracing | None:
    """The live Tracing for this config (None when off), kept across reloads that leave `tracing` alone."""
    spec = settings.tracing
    if not spec.enabled:
        return None
    from proxy.upstream.state import spec_key

    return store.pool(("tracing", spec_key(spec)), lambda: Tracing(spec, metrics))


# -- helpers the data path calls (only when a tracer is configured) -------------------------------------
def extract(headers):
    """The app's trace context (W3C traceparent/tracestate), or None."""
    from opentelemetry.propagate import extract as _extract

    if "traceparent" not in headers:
        return None
    return _extract({"traceparent": headers.get("traceparent", ""), "tracestate": headers.get("tracestate", "")})


def inject(span, headers) -> None:
    """The attempt's own context upstream: the upstream's spans are children of the attempt."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        headers.popall("traceparent", None)
        return
    headers["traceparent"] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    state = ctx.trace_state.to_header() if ctx.trace_state else ""
    if state:
        headers["tracestate"] = state
    else:
        headers.popall("tracestate", None)


def gen_ai_response(span, completion: dict, capture_content: bool) -> None:
    """GenAI attributes of a whole answer (a JSON completion, or a stream assembled)."""
    if not isinstance(completion, dict):
        return
    model = completion.get("model")
    if isinstance(model, str):
        span.set_attribute("gen_ai.response.model", model)
    rid = completion.get("id")
    if isinstance(rid, str):
        span.set_attribute("gen_ai.response.id", rid)
    usage = completion.get("usage")
    if isinstance(usage, dict):
        for key, attr in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                          ("completion_tokens", "gen_ai.usage.output_tokens")):
            if isinstance(usage.get(key), int):
                span.set_attribute(attr, usage[key])
    choices = completion.get("choices")
    if isinstance(choices, list):
        reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict)]
        reasons = [r for r in reasons if isinstance(r, str)]
        if reasons:
            span.set_attribute("gen_ai.response.finish_reasons", reasons)
        if capture_content:
            texts = [str((c.get("message") or {}).get("content") or "") for c in choices if isinstance(c, dict)]
            span.set_attribute("gen_ai.output.messages", texts)


def redis_batch(tracing, upstream: str, track: str, cmds: list[list[bytes]]):
    """A client span for one read of Redis commands (the caller has sampled it: a root span)."""
    from opentelemetry.trace import SpanKind

    names = [bytes(c[0]).upper().decode("ascii", "replace") for c in cmds[:64] if c]
    op = names[0] if len(cmds) == 1 and names else "PIPELINE"
    attrs = {"db.system.name": "redis", "db.operation.name": op, "resilience.upstream": upstream,
             "resilience.track": track}
    if len(cmds) > 1:
        attrs["db.operation.batch.size"] = len(cmds)
        attrs["resilience.redis.commands"] = names  # the names only, never an argument
    return tracing.tracer.start_span(f"{op} {upstream}", kind=SpanKind.CLIENT, attributes=attrs)


def end_unanswered(spans) -> None:
    """The client went away with traced batches still owed: they end as errors."""
    from opentelemetry.trace import Status, StatusCode

    while spans:
        _, span = spans.popleft()
        span.set_status(Status(StatusCode.ERROR, "client connection closed"))
        span.end()
