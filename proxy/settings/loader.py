"""Config loading: YAML file + `PROXY_*` environment overrides + `${env:}`/`${file:}` references → Settings.

Runs off the hot path (startup, reload). Errors come back as `field.path: reason` lines, all at once.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from proxy.obs import redact
from proxy.settings import yaml12
from proxy.settings.spec import (
    AdminSpec,
    AppSpec,
    InboundSpec,
    LivenessSpec,
    LogSpec,
    ReloadSpec,
    ShutdownSpec,
    TracingSpec,
    UpstreamSpec,
    parse_listen,
    protocol_table,
    redis_server,
)

DEFAULT_PATH = "/etc/resilience-proxy/config.yaml"
_REDIS_URLS = ("redis://", "rediss://")
_REF = re.compile(r"\$\{(env|file):([^}]+)\}")
# Stands in for an unresolved reference when check-config only warns about it (a plain word, so the rest
# of the value still validates).
_UNRESOLVED = "unresolved"
# Literal header values /admin/config shows as they are: these say nothing secret. Every other literal
# value is redacted (a credential's header name need not look like one: X-Tenant, X-Goog-Api-...).
_HARMLESS_HEADERS = frozenset({"accept", "accept-encoding", "accept-language", "cache-control", "content-type",
                               "user-agent", "x-forwarded-proto", "x-request-source", "http-referer", "x-title"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PROXY_", env_nested_delimiter="__", extra="forbid", frozen=True, case_sensitive=False
    )

    admin: AdminSpec = AdminSpec()
    shutdown: ShutdownSpec = ShutdownSpec()
    log: LogSpec = LogSpec()
    reload: ReloadSpec = ReloadSpec()
    app: AppSpec = AppSpec()
    liveness: LivenessSpec = LivenessSpec()
    tracing: TracingSpec = TracingSpec()
    inbound: InboundSpec | None = None
    upstreams: dict[str, UpstreamSpec] = {}

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Environment wins over the file, as an operator expects from `kubectl set env`.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _unique_ports(self) -> Settings:
        seen: dict[int, str] = {parse_listen(self.admin.listen)[1]: "admin.listen"}
        if self.inbound is not None:
            port = parse_listen(self.inbound.listen)[1]
            if port in seen:
                raise ValueError(f"inbound.listen: port {port} is already used by admin.listen")
            seen[port] = "inbound.listen"
        for name, up in self.upstreams.items():
            if not re.match(r"^[a-z0-9][a-z0-9_-]{0,62}$", name):
                raise ValueError(f"upstreams: {name!r}: names are lowercase letters, digits, '-' and '_'")
            port = parse_listen(up.listen)[1]
            if port in seen:
                raise ValueError(f"upstreams.{name}.listen: port {port} is already used by {seen[port]}")
            seen[port] = f"upstreams.{name}.listen"
        # The shared fallback cache must not live in a dependency it stands in for
        redis_servers = {redis_server(t.url): (name, t.name) for name, up in self.upstreams.items()
                         for t in up.targets if t.url.startswith(_REDIS_URLS)}
        for name, up in self.upstreams.items():
            for where, fb in (("fallback", up.fallback),
                              *((f"routes.{r.name}.fallback", up.route_sections(r)[2]) for r in up.routes)):
                if fb.shared is not None and redis_server(fb.shared.url) in redis_servers:
                    owner, target = redis_servers[redis_server(fb.shared.url)]
                    raise ValueError(f"upstreams.{name}.{where}.shared.url: names the server of upstream {owner}'s "
                                     f"target {target}: the shared cache must not live in a dependency it stands in for")
        return self


class ConfigError(Exception):
    """An invalid config: `errors` holds one `path: reason` line per problem. Every line is redacted here,
    whoever raised it (a validator, the runtime build, a transport), so no error path can show user info."""

    def __init__(self, errors: list[str]):
        errors = [redact.userinfo(_ONE_LINE.sub(" ", e)) for e in errors]
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Loaded:
    settings: Settings
    raw: dict[str, Any]              # the YAML as written (references unresolved), for /admin/config
    warnings: tuple[str, ...] = ()
    files: tuple[str, ...] = ()      # files referenced by ${file:...}: their content is polled
    digest: str = ""                 # hash of the config and referenced files: a change triggers reload
    sensitive: frozenset[str] = field(default_factory=frozenset)  # resolved secret values, never to be logged


_ONE_LINE = re.compile(r"\s*[\r\n]+\s*")  # an error is one line (a YAML parser's message may span two)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _loc_part(p: object) -> str:
    """A path element as written: a key that is not a plain word is quoted, so the path stays readable
    (`upstreams.'a:b'`, not `upstreams.a:b`)."""
    s = str(p)
    return s if isinstance(p, int) or _PLAIN_KEY.fullmatch(s) else repr(s)


def validation_messages(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(_loc_part(p) for p in err["loc"] if not str(p).startswith("function-"))
        kind, ctx = err["type"], err.get("ctx") or {}
        if kind == "extra_forbidden":
            reason = "unknown key"
        elif kind == "missing":
            reason = "required"
        elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
            reason = f"must be {op} {next(iter(ctx.values()))}"
        elif kind == "value_error":
            reason = str(ctx.get("error", err["msg"]))
        else:
            reason = err["msg"][0].lower() + err["msg"][1:]
        # A model validator's message may already name its own sub-path ("targets: ...").
        if ": " in reason and kind == "value_error" and not reason.startswith(("invalid", "must")):
            sub, _, rest = reason.partition(": ")
            if re.match(r"^[\w.-]+$", sub):
                loc, reason = f"{loc}.{sub}" if loc else sub, rest
        out.append(f"{loc or '<root>'}: {reason}")
    return out


def _resolve(node: Any, path: str, errors: list[str], files: set[str], secrets: set[str]) -> Any:
    if isinstance(node, dict):
        return {k: _resolve(v, f"{path}.{_loc_part(k)}" if path else _loc_part(k), errors, files, secrets)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, f"{path}[{i}]", errors, files, secrets) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def sub(m: re.Match[str]) -> str:
        kind, ref = m.group(1), m.group(2).strip()
        if kind == "env":
            if ref not in os.environ:
                errors.append(f"{path}: environment variable {ref} is not set")
                return _UNRESOLVED
            value = os.environ[ref]
        else:
            files.add(ref)
            try:
                with open(ref, encoding="utf-8") as f:
                    value = f.read().rstrip()  # Secret files often end in a newline
            except OSError as exc:
                errors.append(f"{path}: cannot read {ref}: {exc.strerror or exc}")
                return _UNRESOLVED
            except UnicodeDecodeError:
                errors.append(f"{path}: {ref} is not UTF-8 text")  # never its bytes: it may be a secret
                return _UNRESOLVED
        if value:
            secrets.add(value)
        return value

    return _REF.sub(sub, node)


def read_yaml(path: str) -> dict[str, Any]:
    """The config file as YAML 1.2, within yaml12's bounds (size, depth, alias expansion, no key twice)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(yaml12.MAX_BYTES + 1)
        data = yaml12.load(raw)
    except FileNotFoundError:
        raise ConfigError([f"<file>: {path}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"<file>: {path}: {exc.strerror or exc}"]) from None
    except ValueError as exc:
        raise ConfigError([f"<file>: {path}: {exc}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([f"<file>: {path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    except RecursionError:
        raise ConfigError([f"<file>: {path}: nested too deep"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"<root>: {path}: must be a mapping, got {type(data).__name__}"])
    bad = [k for k in data if not isinstance(k, str)]
    if bad:  # `? ` or `1: x` at the top: not a field name (deeper ones are the spec's to refuse)
        raise ConfigError([f"<root>: {path}: keys should be strings, got {bad[0]!r}"])
    return data


def load(path: str, *, strict_refs: bool = True) -> Loaded:
    """Load and validate. Unresolved references are errors when `strict_refs`, else warnings."""
    raw = read_yaml(path)
    ref_errors: list[str] = []
    files: set[str] = set()
    secrets: set[str] = set()
    resolved = _resolve(raw, "", ref_errors, files, secrets)  # nesting is bounded (64) by read_yaml
    if ref_errors and strict_refs:
        raise ConfigError(ref_errors)
    try:
        settings = Settings(**resolved)
    except ValidationError as exc:
        raise ConfigError(_scrub(validation_messages(exc), frozenset(secrets)) + (ref_errors if strict_refs else [])) from None
    except ValueError as exc:  # pydantic-settings raises plain errors for unparsable env values
        raise ConfigError(_scrub([f"<env>: {exc}"], frozenset(secrets))) from None
    # password files of redis targets are watched like ${file:} references: a rotation reloads
    files |= {t.password_file for up in settings.upstreams.values() for t in up.targets if t.password_file}
    return Loaded(settings, raw, tuple(ref_errors), tuple(sorted(files)), digest(path, files), frozenset(secrets))


def digest(path: str, files: set[str] | tuple[str, ...]) -> str:
    """Content hash of the config and every referenced file (a ConfigMap/Secret swap changes it)."""
    h = hashlib.sha256()
    for p in (path, *sorted(files)):
        h.update(p.encode())
        try:
            with open(p, "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(b"\0missing")
    h.update(repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("PROXY_"))).encode())
    return h.hexdigest()[:16]


def redacted(loaded: Loaded) -> dict[str, Any]:
    """The effective config for /admin/config: resolved defaults, with every secret replaced."""
    data = loaded.settings.model_dump(mode="json")
    table = protocol_table()
    for name, up in data.get("upstreams", {}).items():
        own = table[up["protocol"]]
        for other in table.values():  # another protocol's sections do not apply (and would not load)
            if other is not own:
                for section in other.sections:
                    up.pop(section, None)
                for t in up.get("targets", []):
                    for key in other.target_keys:
                        t.pop(key, None)
        raw_headers = ((loaded.raw.get("upstreams") or {}).get(name) or {}).get("request_headers") or {}
        for key in list(up.get("request_headers", {})):
            template = raw_headers.get(key)
            if isinstance(template, str) and "${" in template:
                up["request_headers"][key] = template  # the reference, not its value
            elif key.lower() not in _HARMLESS_HEADERS:
                up["request_headers"][key] = "<redacted>"
        for t in up.get("targets", []):
            t["url"] = redact.url(t["url"])
        limits = (up.get("llm") or {}).get("limits") or {}
        for fb in (up.get("fallback"), *(r.get("fallback") for r in up.get("routes", [])), limits):
            shared = fb.get("shared") if isinstance(fb, dict) else None
            if isinstance(shared, dict) and isinstance(shared.get("url"), str):
                shared["url"] = redact.url(shared["url"])  # may carry the password of the cache's Redis
    for key in ("ready_url", "live_url"):
        if data.get("app", {}).get(key):
            data["app"][key] = redact.url(data["app"][key])
    if data.get("inbound"):
        data["inbound"]["app_url"] = redact.url(data["inbound"]["app_url"])
    return _scrub(data, loaded.sensitive)


def _scrub(node: Any, secrets: frozenset[str]) -> Any:
    if isinstance(node, dict):
        return {k: _scrub(v, secrets) for k, v in node.items()}
    if isinstance(node, list):
        return [_scrub(v, secrets) for v in node]
    if isinstance(node, str):
        for s in secrets:
            if len(s) >= 4 and s in node:
                node = node.replace(s, "<redacted>")
    return node
