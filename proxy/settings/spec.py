"""Frozen config specs: the validated shape of `config.yaml`.

Spec (this module) → Policy (proxy/policy) → State (proxy/upstream). Specs are immutable and hashable by
value, so the runtime can tell which upstream state survives a reload by comparing them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from proxy.settings.units import Duration, Size

NAME = r"^[a-z0-9]([a-z0-9_-]{0,62})$"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
RETRY_CONDITIONS = frozenset({"connect-failure", "reset", "timeout"})
_STATUS_PATTERN = re.compile(r"^[1-5](\d\d|xx)$")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"must be host:port, got {value!r}")
    host = host.strip("[]")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1..65535, got {port}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def status_matcher(patterns: tuple[str, ...]) -> frozenset[int]:
    """Expand `5xx`/`503` patterns into the set of status codes they name (built once per load)."""
    codes: set[int] = set()
    for p in patterns:
        if p.endswith("xx"):
            base = int(p[0]) * 100
            codes.update(range(base, base + 100))
        else:
            codes.add(int(p))
    return frozenset(codes)


def _check_statuses(values: tuple[str, ...]) -> tuple[str, ...]:
    for v in values:
        if not _STATUS_PATTERN.match(v):
            raise ValueError(f"{v!r} is not a status code or class such as 503 or 5xx")
    return values


def _as_str_tuple(v: object) -> object:
    if isinstance(v, list | tuple):
        return tuple(str(x) for x in v)
    return v


class SharedTLSSpec(Spec):
    """rediss:// for the fleet's Redis (redis-py): the certificate is checked against the URL's host, so
    there is no server_name to give."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> SharedTLSSpec:
        if self.key_file and not self.cert_file:
            raise ValueError("key_file needs cert_file")
        return self


class TLSSpec(SharedTLSSpec):
    """A target's TLS: the CA, a client certificate, and the name its certificate is checked against
    (and sent as SNI) when it is not the URL's host."""

    server_name: str | None = None


class TargetSpec(Spec):
    name: str = Field(pattern=NAME)
    url: str
    weight: int = Field(default=100, ge=0, le=100)
    tls: TLSSpec = TLSSpec()
    # redis: the password as a file (any characters; re-read on change), instead of inside the URL
    password_file: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme, sep, rest = v.partition("://")
        schemes = sorted({x for p in protocol_table().values() for x in p.schemes})
        if not sep or scheme not in schemes or not rest.split("/")[0]:
            # user info in it is redacted where every config error line is (ConfigError)
            raise ValueError(f"must be an absolute URL ({', '.join(s + '://' for s in schemes)}), got {v!r}")
        return v


class TimeoutsSpec(Spec):
    connect: Duration = Field(default=5.0, gt=0)
    attempt: Duration = Field(default=10.0, gt=0)
    total: Duration = Field(default=30.0, gt=0)
    idle: Duration = Field(default=60.0, gt=0)
    first_byte: Duration = Field(default=60.0, gt=0)  # streams (openai): request sent → first event


class PoolSpec(Spec):
    max_connections: int = Field(default=100, ge=1)
    idle_timeout: Duration = Field(default=30.0, gt=0)
    max_lifetime: Duration = Field(default=300.0, gt=0)


class LimitsSpec(Spec):
    max_header_bytes: Size = Field(default=16 * 1024, ge=256)
    max_request_body: Size | None = None
    max_in_flight: int = Field(default=1000, ge=1)
    max_pending: int = Field(default=100, ge=0)
    pending_timeout: Duration = Field(default=1.0, ge=0)
    # the app's side of the listener: an idle keep-alive connection is closed after client_idle_timeout
    # (longer than the app's own pool timeout, so the app closes first); a request head must arrive
    # within client_header_timeout (slowloris)
    client_idle_timeout: Duration = Field(default=3630.0, gt=0)
    client_header_timeout: Duration = Field(default=30.0, gt=0)


class RetrySpec(Spec):
    attempts: int = Field(default=3, ge=1, le=10)
    backoff_base: Duration = Field(default=0.1, ge=0)
    backoff_max: Duration = Field(default=2.0, ge=0)
    on: tuple[str, ...] = ("connect-failure", "reset", "timeout", "502", "503", "504")
    non_idempotent: bool = False
    max_replay_body: Size = 1024 * 1024
    budget_ratio: float = Field(default=0.2, ge=0, le=1)
    budget_min: int = Field(default=3, ge=0)

    _coerce_on = field_validator("on", mode="before")(_as_str_tuple)

    @field_validator("on")
    @classmethod
    def _on(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for x in v:
            if x not in RETRY_CONDITIONS and not _STATUS_PATTERN.match(x):
                raise ValueError(f"{x!r} is not connect-failure, reset, timeout or a status such as 503 or 5xx")
        return v

    @model_validator(mode="after")
    def _backoff(self) -> RetrySpec:
        if self.backoff_max < self.backoff_base:
            raise ValueError("backoff_max must be >= backoff_base")
        return self


class RatioSpec(Spec):
    failure_ratio: float = Field(default=0.5, gt=0, le=1)
    window: Duration = Field(default=30.0, gt=0)
    min_requests: int = Field(default=20, ge=1)


class SlowCallSpec(Spec):
    duration: Duration | None = None
    ratio: float = Field(default=1.0, gt=0, le=1)


class BreakerSpec(Spec):
    mode: Literal["consecutive", "ratio"] = "consecutive"
    fail_max: int = Field(default=5, ge=1)
    reset_timeout: Duration = Field(default=60.0, gt=0)
    success_threshold: int = Field(default=1, ge=1)
    half_open_max_calls: int = Field(default=1, ge=1)
    failure_statuses: tuple[str, ...] = ("5xx",)
    ratio: RatioSpec = RatioSpec()
    slow_call: SlowCallSpec = SlowCallSpec()

    _coerce = field_validator("failure_statuses", mode="before")(_as_str_tuple)

    @field_validator("failure_statuses")
    @classmethod
    def _statuses(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_statuses(v)


class StaticResponseSpec(Spec):
    status: int = Field(default=200, ge=200, le=599)
    content_type: str = "application/json"
    body: str = ""
    headers: dict[str, str] = {}


def _redis_url(v: str) -> str:
    rest = v.partition("://")[2]
    if not v.startswith(("redis://", "rediss://")) or not rest.split("/")[0].rpartition("@")[2]:
        # user info in it is redacted where every config error line is (ConfigError)
        raise ValueError(f"must be a redis:// or rediss:// URL, got {v!r}")
    return v


class SharedCacheSpec(Spec):
    """`fallback.shared`: a second level of the fallback cache in Redis, shared by a workload's sidecars
    (proxy/fleet/cache.py). Read only after a failure, written off the request path."""

    url: str
    cluster: bool = False          # a Redis Cluster (redis-py's cluster client; the URL names one node)
    key_prefix: str = Field(default="resilience-proxy:", max_length=200)
    cache_ttl: Duration = Field(default=60.0, gt=0)
    stale_ttl: Duration = Field(default=3600.0, gt=0)
    max_body: Size = 1024 * 1024
    timeout: Duration = Field(default=0.1, gt=0, le=10)  # a read, on the failure path
    write_queue: int = Field(default=1000, ge=1, le=1_000_000)
    # connections to Redis at most (per node of a cluster); more calls at once wait for one within `timeout`
    max_connections: int = Field(default=64, ge=1, le=10_000)
    tls: SharedTLSSpec = SharedTLSSpec()  # rediss://: the CA (and a client certificate)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _redis_url(v)

    @model_validator(mode="after")
    def _ttls(self) -> SharedCacheSpec:
        if self.stale_ttl < self.cache_ttl:
            raise ValueError("stale_ttl must be >= cache_ttl")
        return self


def redis_server(url: str) -> tuple[str, int]:
    """(host, port) of a redis:// or rediss:// URL: which server it names, whatever the db or user."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    host = (u.hostname or "localhost").lower()
    if host in ("localhost", "::1", "0:0:0:0:0:0:0:1"):
        host = "127.0.0.1"
    try:
        port = u.port or 6379
    except ValueError:
        port = -1
    return host, port


class FallbackSpec(Spec):
    methods: tuple[str, ...] = ("GET", "HEAD")
    cache_entries: int = Field(default=1000, ge=0)
    cache_bytes: Size = 64 * 1024 * 1024
    cache_ttl: Duration = 60.0
    stale_ttl: Duration = 3600.0
    max_body: Size = 1024 * 1024
    vary: tuple[str, ...] = ()
    static: StaticResponseSpec | None = None
    shared: SharedCacheSpec | None = None

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: object) -> object:
        if isinstance(v, list | tuple):
            v = tuple(str(m).upper() for m in v)
            bad = [m for m in v if m not in _HTTP_METHODS]
            if bad:
                raise ValueError(f"unknown HTTP method(s): {', '.join(bad)}")
        return v

    @field_validator("vary", mode="before")
    @classmethod
    def _vary(cls, v: object) -> object:
        return tuple(str(h).lower() for h in v) if isinstance(v, list | tuple) else v

    @model_validator(mode="after")
    def _ttls(self) -> FallbackSpec:
        if self.stale_ttl < self.cache_ttl:
            raise ValueError("stale_ttl must be >= cache_ttl")
        if self.shared is not None and self.cache_entries == 0:
            # answers reach Redis through the local cache's write, and its key is what Redis is asked for
            raise ValueError("shared needs the local cache: set cache_entries > 0")
        return self


class RouteMatchSpec(Spec):
    methods: tuple[str, ...] | None = None
    path_prefix: str = Field(default="/", pattern=r"^/")

    @field_validator("methods", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return tuple(str(m).upper() for m in v) if isinstance(v, list | tuple) else v


class RouteSpec(Spec):
    """Overrides for matching requests; a section given here is merged over the upstream's."""

    name: str = Field(pattern=NAME)
    match: RouteMatchSpec = RouteMatchSpec()
    timeouts: dict | None = None
    retry: dict | None = None
    fallback: dict | None = None


class MetricsSpec(Spec):
    buckets: tuple[float, ...] = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    @field_validator("buckets")
    @classmethod
    def _sorted(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or list(v) != sorted(set(v)):
            raise ValueError("must be a non-empty, strictly increasing list of seconds")
        return v


DEGRADED_MESSAGE = "I'm currently experiencing technical difficulties. Please try again in a moment."
CACHE_KEY_FIELDS = (
    "model", "models", "messages", "prompt", "input", "suffix", "temperature", "top_p", "top_k", "min_p", "top_a",
    "max_tokens", "max_completion_tokens", "stop", "seed", "n", "best_of", "echo", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "response_format", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "reasoning",
    "include_reasoning", "transforms", "provider", "dimensions", "encoding_format", "modalities", "prediction",
)


class DegradedSpec(Spec):
    """The answer when the LLM upstream fails and nothing is cached (chat and text completions)."""

    enabled: bool = True
    message: str = DEGRADED_MESSAGE
    status: Literal[200, 503] = 200


class ContinuationSpec(Spec):
    """A stream that breaks after events reached the app is continued: the same model first, then the
    fallback models, asked with the text already sent as an assistant prefill (proxy/llm/splice.py)."""

    enabled: bool = True
    max: int = Field(default=2, ge=0, le=10)        # continuation requests per answer
    no_prefill_models: tuple[str, ...] = ()         # known not to take prefill (others are learnt)


class BucketSpec(Spec):
    """Token buckets refilled continuously: a minute's allowance, never more in hand than that."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


class SharedLimitsSpec(Spec):
    """`llm.limits.shared`: the buckets kept in Redis (proxy/fleet/limits.py), so that every sidecar of a
    workload together respects the provider account's limits."""

    url: str
    cluster: bool = False
    key_prefix: str = Field(default="resilience-proxy:", max_length=200)
    timeout: Duration = Field(default=0.25, gt=0, le=10)  # a bucket decision; past it, the local share decides
    max_connections: int = Field(default=64, ge=1, le=10_000)  # as fallback.shared's
    tls: SharedTLSSpec = SharedTLSSpec()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _redis_url(v)


class LLMLimitsSpec(BucketSpec):
    """`llm.limits`: the provider account's limits, kept by the proxy (proxy/llm/limits.py). Over them, in
    order: a fresh cached answer, a fallback model with budget left, a wait up to `max_wait`, a local 429."""

    max_wait: Duration = Field(default=0.0, ge=0)
    models: dict[str, BucketSpec] = {}    # per model, besides the upstream's
    shared: SharedLimitsSpec | None = None
    expected_replicas: int = Field(default=1, ge=1, le=10_000)  # with `shared`: Redis away, each keeps 1/N


class PriceSpec(Spec):
    """USD per million tokens, for `llm_cost_total` when the provider does not send `usage.cost`."""

    prompt: float = Field(ge=0)
    completion: float = Field(ge=0)


class LLMSpec(Spec):
    """`protocol: openai` only."""

    cache_key_fields: tuple[str, ...] = CACHE_KEY_FIELDS
    fallback_models: tuple[str, ...] = ()
    # a 400 saying the prompt is longer than the model's context goes to these, in order (never the same
    # model again, never the plain fallback models, which may be no larger)
    context_fallback_models: tuple[str, ...] = ()
    # after a timeout (first_byte, attempt, idle before the body) go to the next model at once instead of
    # retrying a silent model in place (whenever fallback_models is set, the last model included)
    failover_on_timeout: bool = True
    models: tuple[str, ...] = ()          # model names used as a metric label; others count as `other`
    degraded: DegradedSpec = DegradedSpec()
    continuation: ContinuationSpec = ContinuationSpec()
    limits: LLMLimitsSpec = LLMLimitsSpec()
    prices: dict[str, PriceSpec] = {}


class ClientAuthSpec(Spec):
    """`protocol: redis`: when set, clients must AUTH with this password (compared in constant time)."""

    password_file: str | None = None


_COMMAND_RULE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*([ |][A-Za-z][A-Za-z0-9_-]*)?$")


def _command_rules(v: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for x in v:
        if not _COMMAND_RULE.match(x.strip()):
            raise ValueError(f"{x!r} is not a command name, or a command and subcommand ('CONFIG SET')")
        out.append(" ".join(x.strip().upper().replace("|", " ").split()))
    return tuple(out)


class RedisSpec(Spec):
    """`protocol: redis`: what clients may run through the listener. The default refuses what hands out
    the upstream's secrets or admin powers (proxy/redis/guard.py); `deny_commands` adds to it and
    `allow_commands` lets a refused command or subcommand through ('DEBUG', 'CONFIG SET')."""

    deny_commands: tuple[str, ...] = ()
    allow_commands: tuple[str, ...] = ()
    # memory the listener holds for clients (proxy/redis/flow.py): a client whose replies waiting to be
    # read pass client_output_limit is closed; past max_client_memory (all clients of the upstream,
    # unfinished commands too) clients are not read, then the ones holding most are closed
    client_output_limit: Size = Field(default=32 * 1024 * 1024, ge=64 * 1024)
    max_client_memory: Size = Field(default=128 * 1024 * 1024, ge=1024 * 1024)

    _coerce = field_validator("deny_commands", "allow_commands", mode="before")(_as_str_tuple)
    _rules = field_validator("deny_commands", "allow_commands")(_command_rules)

    @model_validator(mode="after")
    def _disjoint(self) -> RedisSpec:
        both = sorted(set(self.deny_commands) & set(self.allow_commands))
        if both:
            raise ValueError(f"allow_commands: {', '.join(both)} is also in deny_commands")
        return self


def _with_defaults(data: dict, defaults: dict) -> dict:
    out = dict(data)
    for key, value in defaults.items():
        given = out.get(key)
        if isinstance(value, dict) and isinstance(given, dict):
            out[key] = _with_defaults(given, value)
        elif given is None and key not in out:
            out[key] = value
    return out


class HealthSpec(Spec):
    """Active checks per target, run in the background; probes read their last result."""

    enabled: bool = True
    path: str | None = Field(default=None, pattern=r"^/")  # http: none = passive only; openai: /api/v1/models
    interval: Duration = Field(default=10.0, gt=0)
    timeout: Duration = Field(default=2.0, gt=0)
    healthy_threshold: int = Field(default=1, ge=1)
    unhealthy_threshold: int = Field(default=3, ge=1)
    critical: bool = False


class RollbackSpec(Spec):
    """Local automated rollback of a canary track (any track but the first)."""

    enabled: bool = True
    window: Duration = Field(default=60.0, gt=0)
    min_requests: int = Field(default=100, ge=1)
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    min_success_rate: float = Field(default=0.99, ge=0, le=1)
    max_p99: Duration = Field(default=5.0, gt=0)


class CanarySpec(Spec):
    override_header: str | None = "X-Canary"     # always | never | <track name>
    sticky_header: str | None = "X-User-Id"
    sticky_cookie: str | None = None
    track_header: str | None = "X-Canary-Track"  # the chosen track, sent upstream and back to the client
    rollback: RollbackSpec = RollbackSpec()


def protocol_table():
    """The protocol table (proxy/protocols), read while validating. Imported here, not at the top:
    the protocols build on these specs, so the table is only complete once this module is."""
    from proxy.protocols import PROTOCOLS

    return PROTOCOLS


class UpstreamSpec(Spec):
    protocol: str = "http"
    listen: str
    targets: tuple[TargetSpec, ...] = Field(min_length=1)
    timeouts: TimeoutsSpec = TimeoutsSpec()
    pool: PoolSpec = PoolSpec()
    limits: LimitsSpec = LimitsSpec()
    request_headers: dict[str, str] = {}
    retry: RetrySpec = RetrySpec()
    breaker: BreakerSpec = BreakerSpec()
    fallback: FallbackSpec = FallbackSpec()
    routes: tuple[RouteSpec, ...] = ()
    metrics: MetricsSpec = MetricsSpec()
    llm: LLMSpec = LLMSpec()
    client_auth: ClientAuthSpec = ClientAuthSpec()
    redis: RedisSpec = RedisSpec()
    health: HealthSpec = HealthSpec()
    canary: CanarySpec = CanarySpec()

    @model_validator(mode="before")
    @classmethod
    def _protocol_defaults(cls, data: object) -> object:
        """The protocol's defaults for keys the config leaves out (an LLM call runs to minutes and POSTs;
        a Redis command takes a millisecond)."""
        if not isinstance(data, dict):
            return data
        table = protocol_table()
        name = data.get("protocol", "http")
        protocol = table.get(name) if isinstance(name, str) else None
        if protocol is None:
            raise ValueError(f"protocol: must be one of {', '.join(sorted(table))}, got {name!r}")
        return _with_defaults(data, protocol.defaults)

    @field_validator("*", mode="before")
    @classmethod
    def _owned_section(cls, v: object, info: ValidationInfo) -> object:
        """A section only another protocol reads is an error at its own path — unless it is empty or
        its defaults, as /admin/config shows every section (such a config must load again)."""
        table = protocol_table()
        owner = next((p for p in table.values() if info.field_name in p.sections), None)
        protocol = table.get(info.data.get("protocol"))
        if owner is None or protocol is None or owner is protocol:
            return v
        default = cls.model_fields[info.field_name].default
        if v is None or v == {} or v == default.model_dump(mode="json"):
            return default
        raise ValueError(f"only for protocol {owner.name} (this upstream is {protocol.name})")

    @field_validator("targets", mode="before")
    @classmethod
    def _owned_target_keys(cls, v: object, info: ValidationInfo) -> object:
        table = protocol_table()
        protocol = table.get(info.data.get("protocol"))
        if protocol is None or not isinstance(v, list | tuple):
            return v
        out, errors = [], []
        for i, t in enumerate(v):
            if isinstance(t, dict):
                t = dict(t)
                for other in table.values():
                    for key in other.target_keys if other is not protocol else ():
                        if key in t and t[key] is None:
                            del t[key]  # as /admin/config shows it: not set
                        elif key in t:
                            errors.append((f"{i}.{key}", other.name))
            out.append(t)
        if errors:
            (where, owner), more = errors[0], len(errors) - 1
            also = f"; {more} more target{'s' if more > 1 else ''} the same" if more else ""
            raise ValueError(f"{where}: only for protocol {owner} (this upstream is {protocol.name}{also})")
        return out

    @field_validator("request_headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", k):
                raise ValueError(f"{k!r} is not a valid header name")
            if "\r" in val or "\n" in val or "\0" in val:
                raise ValueError(f"the value of {k} contains a line break")
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, _ = parse_listen(v)
        if not is_loopback(host):
            raise ValueError(f"egress listeners must bind a loopback address (127.0.0.1, ::1), got {host!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> UpstreamSpec:
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError("targets: names must be unique")
        if sum(t.weight for t in self.targets) == 0:
            raise ValueError("targets: at least one target needs a weight above 0")
        schemes = protocol_table()[self.protocol].schemes
        for t in self.targets:
            if t.url.split("://")[0] not in schemes:
                raise ValueError(f"targets: {t.name}: protocol {self.protocol} needs a {' or '.join(schemes)} URL")
        routes = [r.name for r in self.routes]
        if "default" in routes or len(set(routes)) != len(routes):
            raise ValueError("routes: names must be unique and not 'default'")
        for r in self.routes:
            self.route_sections(r)  # surfaces a bad override at load time, not on the first request
        refused = protocol_table()[self.protocol].no_shared_cache
        if refused and (self.fallback.shared is not None
                        or any(self.route_sections(r)[2].shared is not None for r in self.routes)):
            raise ValueError(f"fallback.shared: not for protocol {self.protocol}: {refused}")
        return self

    def route_sections(self, route: RouteSpec | None) -> tuple[TimeoutsSpec, RetrySpec, FallbackSpec]:
        """The effective timeouts/retry/fallback for a route: its sections merged over the upstream's."""
        if route is None:
            return self.timeouts, self.retry, self.fallback
        out = []
        for key, cls in (("timeouts", TimeoutsSpec), ("retry", RetrySpec), ("fallback", FallbackSpec)):
            base = getattr(self, key)
            override = getattr(route, key)
            if override is None:
                out.append(base)
            else:
                merged = {**base.model_dump(exclude_unset=False), **override}
                try:
                    out.append(cls.model_validate(merged))
                except Exception as exc:
                    raise ValueError(f"routes: {route.name}.{key}: {exc}") from None
        return out[0], out[1], out[2]


class AdminSpec(Spec):
    listen: str = "0.0.0.0:9901"
    token_file: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v


class ShutdownSpec(Spec):
    drain_timeout: Duration = Field(default=20.0, ge=0)
    quiet_period: Duration = Field(default=2.0, ge=0)


class LogSpec(Spec):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: bool = False

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v


class ReloadSpec(Spec):
    interval: Duration = Field(default=5.0, gt=0)


class TracingSpec(Spec):
    """`tracing`: OpenTelemetry traces over OTLP (proxy/obs/tracing.py). A server span per request the app
    makes (its W3C `traceparent` continued), a client span per upstream attempt (the context injected
    upstream), GenAI attributes on openai upstreams, a span per Redis command batch. Off: nothing of the
    SDK is imported."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318"   # the Collector (http/protobuf: /v1/traces is added)
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    sample_ratio: float = Field(default=1.0, ge=0, le=1)  # of traces the app did not decide (parent-based)
    service_name: str = Field(default="resilience-proxy", min_length=1, max_length=200)
    capture_content: bool = False  # prompt and completion text on GenAI spans: never, unless set
    max_queue: int = Field(default=2048, ge=1, le=1_000_000)  # spans waiting for export; past it: dropped
    timeout: Duration = Field(default=10.0, gt=0, le=60)      # one export

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or "@" in v.partition("://")[2].split("/")[0]:
            raise ValueError("must be an http:// or https:// URL without user info (the Collector's credentials go "
                             "in OTEL_EXPORTER_OTLP_HEADERS, read by the exporter)")
        return v


class AppSpec(Spec):
    """The app next to the sidecar: its own probe endpoints, checked in the background."""

    ready_url: str | None = None
    live_url: str | None = None
    interval: Duration = Field(default=5.0, gt=0)
    timeout: Duration = Field(default=2.0, gt=0)

    @field_validator("ready_url", "live_url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s):// URL, got {v!r}")
        return v


class InboundSpec(Spec):
    """A reverse proxy in front of the app's own port that records the golden metrics of its traffic."""

    listen: str = "0.0.0.0:8080"
    app_url: str = "http://127.0.0.1:8000"
    track: str = Field(default="stable", pattern=r"^[A-Za-z0-9._-]{0,63}$")  # e.g. ${env:ROLLOUT_TRACK}
    max_header_bytes: Size = Field(default=16 * 1024, ge=256)
    max_request_body: Size | None = None
    idle_timeout: Duration = Field(default=300.0, gt=0)
    buckets: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @field_validator("track")
    @classmethod
    def _track(cls, v: str) -> str:
        return v or "default"  # a pod without the label: one bounded value, not an empty one

    @field_validator("app_url")
    @classmethod
    def _app(cls, v: str) -> str:
        if not v.startswith("http://"):
            raise ValueError(f"must be an http:// URL of the app's port, got {v!r}")
        return v.rstrip("/")


class LivenessSpec(Spec):
    max_loop_lag: Duration = Field(default=2.0, gt=0)  # /health/live turns 503 when the event loop lags more
