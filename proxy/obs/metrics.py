"""Every Prometheus collector the proxy exports, defined once, here.

Policies and state report events (`retry(reason)`, `shed()`, `breaker.changed(state)`, `fallback(source,
reason)`, `canary_aborted(...)`); this module turns them into samples. Nothing else touches the registry.

Per-upstream children are created when the runtime is built (`UpstreamMetrics`), so the request path
only calls `inc()`/`observe()` on objects it already holds. No label takes an unbounded value: `status`
is an HTTP status code or a fixed word, `route` a configured name or `default`, `name`/`track` come
from config.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from proxy import __version__

disable_created_metrics()  # *_created series double the scrape size and no rule here reads them


class _Histogram:
    """One histogram series with its own buckets: `observe` is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


def bucket_p99(now: dict, then: dict | None) -> float | None:
    """The bound of the bucket holding the 99th percentile of what a cumulative histogram ({le: count})
    added since `then` (inf: past the last bound; None: nothing added). `resilience-proxy status` and the status page read it."""
    base = then or {}
    deltas = [(le, now[le] - base.get(le, 0.0)) for le in sorted(now)]
    total = deltas[-1][1] if deltas else 0
    if total <= 0:
        return None
    return next((le for le, n in deltas if n >= 0.99 * total), None)


class PerSeriesHistogram(Collector):
    """A histogram family whose buckets are chosen per series (LLM calls need minutes, a DB gateway
    milliseconds); prometheus-client fixes buckets per family and walks them in Python."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], registry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._series: dict[tuple[str, ...], _Histogram] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str, buckets: tuple[float, ...]) -> _Histogram:
        """The series for these labels. With other buckets than the live one, a new series is returned
        detached; `install` makes it live (at the swap of a reload), so a failed build changes nothing."""
        h = self._series.get(values)
        if h is None:
            h = self._series[values] = _Histogram(tuple(buckets))
        elif h.bounds != tuple(buckets):
            h = _Histogram(tuple(buckets))
        return h

    def install(self, values: tuple[str, ...], h: _Histogram) -> None:
        self._series[values] = h

    def remove(self, *values: str) -> None:
        self._series.pop(values, None)

    def collect(self) -> Iterable[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, h in list(self._series.items()):
            acc, buckets = 0, []
            for bound, n in zip((*h.bounds, float("inf")), h.counts, strict=True):
                acc += n
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
            fam.add_metric(list(values), buckets, h.sum)
        yield fam

    def describe(self) -> Iterable[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


LLM_FIRST_BYTE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
SHARED_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# the GenAI conventions' advisory boundaries
GEN_AI_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
GEN_AI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


class CallbackGauge(Collector):
    """A gauge family whose samples are read from live state at scrape time (nothing to keep in step)."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], registry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.sources: list = []  # one per running app (tests run several in one process)
        if registry is not None:
            registry.register(self)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        fam = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for source in list(self.sources):
            for *labels, value in source():
                fam.add_metric(labels, value)
        yield fam

    def describe(self):
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        r = registry
        self.registry = registry
        self.build_info = Gauge("build_info", "Version of the running resilience-proxy.", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.requests = Counter(
            "upstream_requests",
            "Requests answered per upstream, track and route. outcome: upstream (the upstream's answer), "
            "fallback (served by the fallback), rejected (an error produced by the proxy), shed (load shedding).",
            ["name", "track", "route", "status", "outcome"], registry=r,
        )
        self.duration = PerSeriesHistogram(
            "upstream_request_duration_seconds",
            "Time from request to response headers per upstream and track (upstream answers only).",
            ("name", "track"), r,
        )
        # Read from live state at scrape time: nothing on the request path keeps them in step.
        self.in_flight = CallbackGauge("upstream_in_flight", "Requests in flight per upstream.", ("name",), r)
        self.breaker_state = Gauge(
            "circuit_breaker_state",
            "Breaker state per upstream track: 0 closed, 1 open, 2 half-open, 3 forced open, 4 forced closed.",
            ["name", "track"], registry=r,
        )
        self.breaker_opened = Counter(
            "circuit_breaker_opened", "Times the breaker opened (automatic or forced).", ["name", "track"], registry=r
        )
        self.model_breaker_state = Gauge(
            "llm_model_breaker_state",
            "protocol: openai — the breaker of one model on one track (0 closed, 1 open, 2 half-open, 3 forced "
            "open, 4 forced closed); models not in llm.models or the fallback lists share `other`.",
            ["name", "track", "model"], registry=r,
        )
        self.model_breaker_opened = Counter(
            "llm_model_breaker_opened", "Times a model's breaker opened (automatic or forced).",
            ["name", "track", "model"], registry=r)
        self.retries = Counter("upstream_retries", "Retries sent, by the reason of the failed attempt.",
                               ["name", "reason"], registry=r)
        self.budget_exhausted = Counter(
            "upstream_retry_budget_exhausted", "Retries not sent because the retry budget was spent.", ["name"], registry=r
        )
        self.shed = Counter("upstream_shed", "Requests shed at the entrance (max_in_flight/max_pending).",
                            ["name"], registry=r)
        self.fallbacks = Counter(
            "fallback_responses", "Responses served by a fallback. source: cache|stale|static|degraded.",
            ["name", "source", "reason"], registry=r,
        )
        self.shared_reads = Counter(
            "shared_cache_reads", "Reads of the shared fallback cache (after a failure) by result: "
            "hit|miss|invalid|error|skipped (its breaker open).", ["name", "result"], registry=r)
        self.shared_writes = Counter(
            "shared_cache_writes", "Answers written to the shared fallback cache by result: written|dropped (queue "
            "full or its breaker open)|error.", ["name", "result"], registry=r)
        self.shared_latency = PerSeriesHistogram(
            "shared_cache_duration_seconds", "Round trips to the shared fallback cache, op: read|write (a batch).",
            ("name", "op"), r)
        self.llm_limits_local = Counter(
            "llm_limits_local", "openai: limit decisions made on this pod's share (llm.limits.expected_replicas) "
            "because the shared buckets in Redis could not answer.", ["name"], registry=r)
        self.cache_entries = CallbackGauge("fallback_cache_entries", "Entries in the fallback cache.", ("name",), r)
        self.cache_bytes = CallbackGauge("fallback_cache_bytes", "Bytes held by the fallback cache.", ("name",), r)
        self.llm_first_byte = PerSeriesHistogram(
            "llm_stream_first_byte_seconds",
            "Streaming LLM calls: request sent → first event, per model (configured names, else `other`).",
            ("name", "model"), r,
        )
        self.llm_tokens = Counter("llm_tokens", "Tokens reported in `usage`, kind: prompt|completion.",
                                  ["name", "model", "kind"], registry=r)
        self.llm_limited = Counter(
            "llm_limited", "openai: requests over llm.limits, by what answered them: cache | fallback_model | "
            "waited | rejected (a local 429).", ["name", "action"], registry=r)
        self.llm_cost = Counter(
            "llm_cost", "openai: spend in USD, from usage.cost when the provider sends it (OpenRouter), else "
            "from llm.prices; whole answers only.", ["name", "model"], registry=r)
        # The OpenTelemetry GenAI semantic conventions' client metrics, under their Prometheus names
        self.gen_ai_tokens = PerSeriesHistogram(
            "gen_ai_client_token_usage", "GenAI: tokens per answer (gen.ai.client.token.usage), by token type.",
            ("name", "gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"), r)
        self.gen_ai_duration = PerSeriesHistogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI: request → whole answer (gen_ai.client.operation.duration), upstream answers only.",
            ("name", "gen_ai_operation_name", "gen_ai_request_model"), r)
        self.gen_ai_first_chunk = PerSeriesHistogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "GenAI: request → first chunk of a streamed answer (gen_ai.client.operation.time_to_first_chunk).",
            ("name", "gen_ai_operation_name", "gen_ai_request_model"), r)
        self.llm_recoveries = Counter(
            "llm_stream_recoveries", "Streams broken after events reached the app, outcome: recovered (continued "
            "to a whole answer) | failed (no continuation finished it) | not_continuable (tool calls, n > 1, "
            "continuation off).", ["name", "outcome"], registry=r)
        self.redis_commands = Counter(
            "redis_commands", "Redis commands by class (read|write|blocking|transaction|tunnel|admin) and outcome.",
            ["name", "command_class", "outcome"], registry=r)
        self.redis_refused = Counter(
            "redis_refused_commands", "Redis commands the listener refused by its command policy, by rule "
            "('CONFIG SET', 'pub/sub' for a command not relayed on a pub/sub connection).", ["name", "rule"],
            registry=r)
        self.redis_auth_failures = Counter(
            "redis_client_auth_failures", "Failed client AUTH attempts, result: wrongpass | throttled (refused "
            "unchecked, too many failures).", ["name", "result"], registry=r)
        self.redis_evicted = Counter(
            "redis_clients_evicted", "Redis clients closed for holding too much of the proxy's memory, limit: "
            "client_output_limit | max_client_memory.", ["name", "limit"], registry=r)
        self.upstream_health = CallbackGauge(
            "upstream_health", "1 when the track can take traffic (active checks passing or none, breaker not "
            "open), else 0.", ("name", "track"), r)
        self.canary_aborts = Counter("canary_aborts", "Canary tracks aborted by the local rollback watchdog.",
                                     ["name", "track", "reason"], registry=r)
        self.canary_weight = Gauge("canary_weight", "Effective weight of each track (after aborts and operator "
                                   "overrides).", ["name", "track"], registry=r)
        self.inbound_requests = Counter("http_requests", "The app's inbound traffic (golden metrics).",
                                        ["method", "status", "track"], registry=r)
        self.inbound_duration = PerSeriesHistogram("http_request_duration_seconds",
                                                   "The app's inbound latency, request → response headers.",
                                                   ("method", "track"), r)
        self.tracing_dropped = Counter(
            "tracing_spans_dropped", "Spans that never reached the Collector, reason: queue_full (tracing.max_queue: "
            "the data path never waits for the exporter) | export_failed (the Collector away or refusing).",
            ["reason"], registry=r)
        self.reloads = Counter("config_reload", "Config reloads by result.", ["result"], registry=r)
        self.config_info = Gauge("config_info", "Hash of the running config (value is always 1).", ["hash"], registry=r)

    def status_totals(self) -> dict:
        """What the status page (proxy/admin/ui.py) samples, read from the counters themselves: per
        (upstream, track) the answers, the failed ones (the upstream failed: a fallback, an error the proxy
        produced with a 5xx, an upstream 5xx, a body cut), shed ones and the latency
        buckets; per upstream the retries and the fallbacks by reason; per (upstream, track) the aborts."""
        tracks: dict = {}
        ups: dict = {}

        def row(name, track):
            r = tracks.get((name, track))
            if r is None:
                r = tracks[(name, track)] = {"requests": 0.0, "failed": 0.0, "shed": 0.0, "buckets": {}, "aborts": 0.0}
            return r

        def up(name):
            u = ups.get(name)
            if u is None:
                u = ups[name] = {"retries": 0.0, "fallbacks": {}}
            return u

        for fam in self.requests.collect():
            for smp in fam.samples:
                if not smp.name.endswith("_total"):
                    continue
                lb = smp.labels
                r = row(lb["name"], lb["track"])
                r["requests"] += smp.value
                if lb["outcome"] == "shed":
                    r["shed"] += smp.value
                # not a 4xx the proxy answered itself (the app's bad request is not the track's failure)
                elif lb["outcome"] == "fallback" or lb["status"].startswith("5") or lb["status"] == "reset":
                    r["failed"] += smp.value
        for fam in self.duration.collect():
            for smp in fam.samples:
                if smp.name.endswith("_bucket"):
                    le = float(smp.labels["le"])
                    row(smp.labels["name"], smp.labels["track"])["buckets"][le] = smp.value
        for fam in self.retries.collect():
            for smp in fam.samples:
                if smp.name.endswith("_total"):
                    up(smp.labels["name"])["retries"] += smp.value
        for fam in self.fallbacks.collect():
            for smp in fam.samples:
                if smp.name.endswith("_total"):
                    fb = up(smp.labels["name"])["fallbacks"]
                    fb[smp.labels["reason"]] = fb.get(smp.labels["reason"], 0.0) + smp.value
        for fam in self.canary_aborts.collect():
            for smp in fam.samples:
                if smp.name.endswith("_total"):
                    row(smp.labels["name"], smp.labels["track"])["aborts"] += smp.value
        return {"tracks": tracks, "upstreams": ups}

    def breaker_events(self, upstream: str, track: str) -> BreakerEvents:
        return BreakerEvents(self.breaker_state.labels(upstream, track), self.breaker_opened.labels(upstream, track))

    def model_breaker_events(self, upstream: str, track: str, model: str) -> BreakerEvents:
        return BreakerEvents(self.model_breaker_state.labels(upstream, track, model),
                             self.model_breaker_opened.labels(upstream, track, model))

    def canary_aborted(self, upstream: str, track: str, reason: str) -> None:
        self.canary_aborts.labels(upstream, track, reason).inc()

    def track_weight(self, upstream: str, track: str, weight: int) -> None:
        self.canary_weight.labels(upstream, track).set(weight)

    def set_config_hash(self, digest: str) -> None:
        self.config_info.clear()
        self.config_info.labels(digest).set(1)


BREAKER_GAUGE = {"closed": 0, "open": 1, "half_open": 2, "forced_open": 3, "forced_closed": 4}


class BreakerEvents:
    """What one breaker reports: its state (the gauge) and each opening (the counter)."""

    __slots__ = ("_state", "_opened")

    def __init__(self, state, opened) -> None:
        self._state, self._opened = state, opened

    def changed(self, state: str) -> None:
        self._state.set(BREAKER_GAUGE[state])

    def opened(self) -> None:
        self._opened.inc()


METRICS = Metrics()


class UpstreamMetrics:
    """The children one upstream uses, created at build time. Status children are cached per code on
    first use: the set of codes is bounded (100-599) and each costs one `labels()` call once."""

    __slots__ = ("name", "m", "buckets", "_req", "_dur", "_shed", "_budget_exhausted",
                 "_retries", "_fallbacks", "_models", "_first_byte", "_tokens", "_prices", "_gen_ai_series",
                 "_shared")

    def __init__(self, name: str, tracks: Iterable[str], buckets: tuple[float, ...], m: Metrics = METRICS) -> None:
        self.name, self.m, self.buckets = name, m, buckets
        self._shed = m.shed.labels(name)
        self._budget_exhausted = m.budget_exhausted.labels(name)
        self._req: dict[tuple[str, str, str, str], object] = {}
        self._dur = {t: m.duration.labels(name, t, buckets=buckets) for t in tracks}
        self._retries: dict[str, object] = {}
        self._fallbacks: dict[tuple[str, str], object] = {}
        self._models: frozenset[str] = frozenset()
        self._first_byte: dict[str, _Histogram] = {}
        self._tokens: dict[tuple[str, str], object] = {}
        self._prices: dict = {}
        self._gen_ai_series: dict[tuple, object] = {}
        self._shared: dict[str, _Histogram] = {}

    def activate(self) -> None:
        """This upstream's build went live: its histogram series replace the previous ones."""
        for track, h in self._dur.items():
            self.m.duration.install((self.name, track), h)
        for model, h in self._first_byte.items():
            self.m.llm_first_byte.install((self.name, model), h)

    def llm_models(self, models: Iterable[str]) -> None:
        """Models that get their own label value; created at build time with `other`."""
        self._models = frozenset(models)
        for model in (*self._models, "other"):
            self._first_byte[model] = self.m.llm_first_byte.labels(self.name, model, buckets=LLM_FIRST_BYTE_BUCKETS)
            for kind in ("prompt", "completion"):
                self._tokens[(model, kind)] = self.m.llm_tokens.labels(self.name, model, kind)

    def model_label(self, model: object) -> str:
        return model if isinstance(model, str) and model in self._models else "other"

    def first_byte(self, model: str, operation: str, seconds: float) -> None:
        self._first_byte[model].observe(seconds)
        self._gen_ai(self.m.gen_ai_first_chunk, (operation, model), GEN_AI_DURATION_BUCKETS).observe(seconds)

    def llm_prices(self, prices: dict) -> None:
        self._prices = prices

    def tokens(self, model: str, usage: object, operation: str = "chat", asked: object = None) -> None:
        """A whole answer's `usage` (label `model`; `asked`: the model name it was asked of, for the
        price table)."""
        if not isinstance(usage, dict):
            return
        for kind, key, gen_ai in (("prompt", "prompt_tokens", "input"), ("completion", "completion_tokens", "output")):
            n = usage.get(key)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                self._tokens[(model, kind)].inc(n)
                self._gen_ai(self.m.gen_ai_tokens, (operation, model, gen_ai), GEN_AI_TOKEN_BUCKETS).observe(n)
        cost = usage.get("cost")
        if not (isinstance(cost, int | float) and not isinstance(cost, bool) and 0 <= cost < 1e9):
            price = self._prices.get(asked) if isinstance(asked, str) else None
            cost = None
            if price is not None:
                p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
                p = p if isinstance(p, int) and p > 0 else 0
                c = c if isinstance(c, int) and c > 0 else 0
                cost = (p * price.prompt + c * price.completion) / 1e6
        if cost:
            self.m.llm_cost.labels(self.name, model).inc(cost)

    def _gen_ai(self, family, labels: tuple, buckets):
        key = (family.name, *labels)
        h = self._gen_ai_series.get(key)
        if h is None:
            h = self._gen_ai_series[key] = family.labels(self.name, *labels, buckets=buckets)
        return h

    def operation(self, model: str, operation: str, seconds: float) -> None:
        self._gen_ai(self.m.gen_ai_duration, (operation, model), GEN_AI_DURATION_BUCKETS).observe(seconds)

    def limited(self, action: str) -> None:
        self.m.llm_limited.labels(self.name, action).inc()  # rare: no child kept

    def stream_recovery(self, outcome: str) -> None:
        self.m.llm_recoveries.labels(self.name, outcome).inc()  # rare: no child kept

    def request(self, track: str, route: str, status: str, outcome: str) -> None:
        key = (track, route, status, outcome)
        c = self._req.get(key)
        if c is None:
            c = self._req[key] = self.m.requests.labels(self.name, track, route, status, outcome)
        c.inc()

    def duration(self, track: str, seconds: float) -> None:
        h = self._dur.get(track)
        if h is None:
            h = self._dur[track] = self.m.duration.labels(self.name, track, buckets=self.buckets)
        h.observe(seconds)

    def shed(self) -> None:
        self._shed.inc()

    def refused(self, rule: str) -> None:
        self.m.redis_refused.labels(self.name, rule).inc()  # rare: no child kept

    def evicted(self, limit: str) -> None:
        self.m.redis_evicted.labels(self.name, limit).inc()

    def auth_failed(self, result: str) -> None:
        self.m.redis_auth_failures.labels(self.name, result).inc()

    def budget_exhausted(self) -> None:
        self._budget_exhausted.inc()

    def retry(self, reason: str) -> None:
        c = self._retries.get(reason)
        if c is None:
            c = self._retries[reason] = self.m.retries.labels(self.name, reason)
        c.inc()

    def limits_local(self) -> None:
        self.m.llm_limits_local.labels(self.name).inc()  # only while Redis is away: no child kept

    def shared_read(self, result: str) -> None:
        self.m.shared_reads.labels(self.name, result).inc()  # only after a failure: no child kept

    def shared_write(self, result: str, n: int = 1) -> None:
        self.m.shared_writes.labels(self.name, result).inc(n)  # per batch, off the request path

    def shared_latency(self, op: str, seconds: float) -> None:
        h = self._shared.get(op)
        if h is None:
            h = self._shared[op] = self.m.shared_latency.labels(self.name, op, buckets=SHARED_BUCKETS)
        h.observe(seconds)

    def fallback(self, source: str, reason: str) -> None:
        key = (source, reason)
        c = self._fallbacks.get(key)
        if c is None:
            c = self._fallbacks[key] = self.m.fallbacks.labels(self.name, source, reason)
        c.inc()


class ReceiverMetrics:
    """The rollback receiver's (proxy/fleet/rollback.py): a process of its own, a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.actions = Counter("rollback_actions", "Rollback decisions by action (track_weight_zero | rollout_abort "
                               "| none) and result (done | dry_run | unchanged | rate_limited | refused | failed | "
                               "duplicate).", ["action", "result"], registry=self.registry)

    def rollback(self, action: str, result: str) -> None:
        self.actions.labels(action, result).inc()
