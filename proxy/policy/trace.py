"""The client span of one upstream attempt (`tracing:` on): in the chain between the breaker and the
classifier, so an attempt the open breaker refused has none (no I/O happened) and the span sees the
verdict the one classifier gave. Its context goes upstream as `traceparent`, so the upstream's own spans
are its children; `http.request.resend_count` says which try it was. Only in the chain when tracing is
enabled: off, the fused chain runs with nothing of it (proxy/policy/fused.py).

A streamed answer's span ends at its headers (what the attempt decides); the server span at the
listener lasts until the body is through."""

from __future__ import annotations

from urllib.parse import urlsplit

from opentelemetry.trace import SpanKind, Status, StatusCode  # imported only with tracing on

from proxy.exchange import Handler, ProxyRequest, ProxyResponse, Verdict
from proxy.llm.policy import operation
from proxy.obs.tracing import IN_SPAN, inject


def _target_attributes(upstream: str, target) -> dict:
    """What every attempt to this target says of where it went — host and port, never the URL's user
    info (it may be credentials). Worked out once per config load."""
    u = urlsplit(target.spec.url)
    attrs = {"server.address": u.hostname or "", "resilience.upstream": upstream, "resilience.track": target.name}
    try:
        if u.port is not None:
            attrs["server.port"] = u.port
    except ValueError:
        pass
    return attrs


class AttemptSpan:
    __slots__ = ("tracer", "upstream", "targets")

    def __init__(self, tracer, upstream: str, targets) -> None:
        self.tracer, self.upstream = tracer, upstream
        self.targets = {t.name: _target_attributes(upstream, t) for t in targets}

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        if not IN_SPAN.get():  # a request the sampler left out: no span at all
            return await call_next(req)
        target = req.target
        attrs = {**self.targets[target.name], "http.request.method": req.method, "url.path": req.path,
                 "resilience.breaker.state": target.breaker.state}
        if req.attempts:
            attrs["http.request.resend_count"] = req.attempts
        call = getattr(req, "llm", None)
        if call is not None:
            attrs["gen_ai.operation.name"] = operation(req.path)
            attrs["gen_ai.provider.name"] = "openai"
            if isinstance(call.asked, str):
                attrs["gen_ai.request.model"] = call.asked
        span = self.tracer.start_span(f"{req.method} {self.upstream}", kind=SpanKind.CLIENT, attributes=attrs)
        inject(span, req.headers)
        try:
            resp = await call_next(req)
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.end()
            raise
        span.set_attribute("http.response.status_code", resp.status)
        if resp.verdict is not Verdict.SUCCESS or resp.failure is not None:
            why = resp.failure.error_type if resp.failure is not None else f"{resp.status}"
            span.set_attribute("error.type", why)
            span.set_status(Status(StatusCode.ERROR, why))
        span.end()
        return resp
