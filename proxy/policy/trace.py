"""The client span of one upstream attempt (`tracing:` on): in the chain between the breaker and the
classifier, so an attempt the open breaker refused has none (no I/O happened) and the span sees the
verdict the one classifier gave. Its context goes upstream as `traceparent`, so the upstream's own spans
are its children; `http.request.resend_count` says which try it was. Only in the chain when tracing is
enabled: off, the fused chain runs with nothing of it (proxy/policy/fused.py).

A streamed answer's span ends at its headers (what the attempt decides); the server span at the
listener lasts until the body is through."""

from __future__ import annotations

from proxy.exchange import Handler, ProxyRequest, ProxyResponse, Verdict
from proxy.obs.tracing import IN_SPAN, inject


def _address(target) -> tuple[str, int | None]:
    """(host, port) of the target's URL — never its user info, which may be credentials."""
    from urllib.parse import urlsplit

    u = urlsplit(target.spec.url)
    try:
        port = u.port
    except ValueError:
        port = None
    return u.hostname or "", port


class AttemptSpan:
    __slots__ = ("tracer", "upstream", "kind", "status_error")

    def __init__(self, tracer, upstream: str) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.tracer, self.upstream, self.kind = tracer, upstream, SpanKind.CLIENT
        self.status_error = (Status, StatusCode.ERROR)

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        if not IN_SPAN.get():  # a request the sampler left out: no span at all
            return await call_next(req)
        target = req.target
        host, port = _address(target)
        attrs = {"http.request.method": req.method, "url.path": req.path, "server.address": host,
                 "resilience.upstream": self.upstream, "resilience.track": target.name,
                 "resilience.breaker.state": target.breaker.state}
        if port is not None:
            attrs["server.port"] = port
        if req.attempts:
            attrs["http.request.resend_count"] = req.attempts
        call = getattr(req, "llm", None)
        if call is not None:
            attrs["gen_ai.operation.name"] = "chat" if req.path.endswith("/chat/completions") else "text_completion"
            model = call.asked
            if isinstance(model, str):
                attrs["gen_ai.request.model"] = model
            attrs["gen_ai.provider.name"] = "openai"
        span = self.tracer.start_span(f"{req.method} {self.upstream}", kind=self.kind, attributes=attrs)
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
            status, error = self.status_error
            span.set_status(status(error, why))
        span.end()
        return resp
