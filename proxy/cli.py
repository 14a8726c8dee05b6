"""Command line: `run`, `check-config`, `demo`, ... It parses arguments and calls what does the work
(`proxy.app.run()` owns the proxy's start-up).

Exit codes everywhere: 0 ok, 1 invalid config, 2 usage error, 3 runtime failure (e.g. a port in use).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from proxy import __version__
from proxy.settings import DEFAULT_PATH, ConfigError, load

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_RUNTIME = 0, 1, 2, 3  # app.run() returns the same


def _config_path(arg: str | None) -> str:
    return arg or os.environ.get("PROXY_CONFIG") or DEFAULT_PATH


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_check(args: argparse.Namespace) -> int:
    try:
        loaded = load(args.file, strict_refs=args.strict)
    except ConfigError as exc:
        print(f"{args.file}: invalid config ({len(exc.errors)} error{'s' if len(exc.errors) != 1 else ''})",
              file=sys.stderr)
        for e in exc.errors:
            print(f"  {e}", file=sys.stderr)
        return EXIT_CONFIG
    s = loaded.settings
    print(f"{args.file}: ok (hash {loaded.digest})")
    print(f"  admin     {s.admin.listen}  token: {'file' if s.admin.token_file else 'none (mutating /admin calls get 403)'}")
    for name, up in s.upstreams.items():
        tracks = ", ".join(f"{t.name}={t.weight}" for t in up.targets)
        b, r, t = up.breaker, up.retry, up.timeouts
        print(f"  {name:<11} {up.protocol:<7}{up.listen:<18}→ {tracks}")
        print(f"            timeouts connect={t.connect:g}s attempt={t.attempt:g}s total={t.total:g}s idle={t.idle:g}s;"
              f" retry attempts={r.attempts} budget={r.budget_ratio:g}/min {r.budget_min};"
              f" breaker {b.mode} fail_max={b.fail_max} reset={b.reset_timeout:g}s;"
              f" routes: {', '.join(x.name for x in up.routes) or 'default'}")
    for w in loaded.warnings:
        print(f"  warning: {w}")
    return EXIT_OK


def cmd_config_schema(args: argparse.Namespace) -> int:
    from proxy.settings.schema import config_schema, dumps

    sys.stdout.write(dumps(config_schema()))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.obs import log

    path = _config_path(args.config)
    try:
        loaded = load(path)
    except ConfigError as exc:
        print(f"{path}: invalid config, not starting:", file=sys.stderr)
        for e in exc.errors:
            print(f"  {e}", file=sys.stderr)
        return EXIT_CONFIG
    log.configure(loaded.settings.log.level)
    _install_uvloop()
    from proxy.app import run

    return asyncio.run(run(path, loaded))


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    if args.port_base is not None and not 1 <= args.port_base <= 65528:
        print("resilience-proxy demo: --port-base must be 1..65528 (it uses N to N+7)", file=sys.stderr)
        return EXIT_USAGE
    _install_uvloop()
    return asyncio.run(run_demo(args.config, args.port_base))


def cmd_wait_ready(args: argparse.Namespace) -> int:
    from proxy.settings.units import parse_duration
    from proxy.status import wait_ready

    return wait_ready(args.admin, float(parse_duration(args.timeout)))


def cmd_status(args: argparse.Namespace) -> int:
    from proxy.status import status

    return status(args.admin, args.token_file, args.watch)


def _inject_options(args: argparse.Namespace):
    from proxy.k8s.sidecar import Options

    kw = {"native": not args.classic, "app_env": args.app_env, "app_probes": args.app_probes}
    if args.image:
        kw["image"] = args.image
    return Options(**kw)


def cmd_inject(args: argparse.Namespace) -> int:
    from proxy.k8s.inject import main as inject_main

    return inject_main(args.file, _inject_options(args))


def cmd_webhook(args: argparse.Namespace) -> int:
    from proxy.k8s.webhook import serve
    from proxy.obs import log
    from proxy.settings.spec import parse_listen

    log.configure("info")
    host, port = parse_listen(args.listen)
    _install_uvloop()
    try:
        return asyncio.run(serve(host, port, args.tls_cert, args.tls_key, _inject_options(args)))
    except OSError as exc:
        print(f"cannot start the webhook: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_rollback_receiver(args: argparse.Namespace) -> int:
    from proxy.obs import log
    from proxy.settings.spec import parse_listen
    from proxy.settings.units import parse_duration

    log.configure("info")
    namespace = args.namespace or os.environ.get("POD_NAMESPACE")
    if not namespace:
        print("rollback-receiver: --namespace (or $POD_NAMESPACE) is needed: the one namespace it acts in",
              file=sys.stderr)
        return EXIT_USAGE
    token = None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            print(f"rollback-receiver: cannot read --token-file: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        if not token:
            print("rollback-receiver: --token-file is empty", file=sys.stderr)
            return EXIT_USAGE
        if "REPLACE-ME" in token or len(token) < 16:
            # the shipped placeholder is public: anyone who read the repository could roll canaries back
            print("rollback-receiver: --token-file holds the shipped placeholder or under 16 characters: "
                  "put a long random token in the Secret (openssl rand -hex 32)", file=sys.stderr)
            return EXIT_USAGE
    elif not args.no_token:
        print("rollback-receiver: --token-file is needed (Alertmanager sends it as a bearer token: "
              "http_config.authorization.credentials_file), or --no-token to accept any caller", file=sys.stderr)
        return EXIT_USAGE
    try:
        host, port = parse_listen(args.listen)
        per = parse_duration(args.per)
    except ValueError as exc:
        print(f"rollback-receiver: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from aiohttp import web

    from proxy.fleet.rollback import Kube, Receiver, app
    from proxy.obs.metrics import ReceiverMetrics

    try:
        kube = Kube.connect(args.kubeconfig)
    except Exception as exc:  # noqa: BLE001 — no in-cluster config, an unreadable kubeconfig
        print(f"rollback-receiver: no Kubernetes API: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    metrics = ReceiverMetrics()
    receiver = Receiver(kube, namespace, args.configmap, args.key, dry_run=args.dry_run,
                        max_actions=args.max_actions, per=per, events=metrics)
    log.info("rollback_receiver_started", namespace=namespace, configmap=args.configmap, dry_run=args.dry_run,
             listen=args.listen)
    try:
        web.run_app(app(receiver, token, metrics.registry), host=host, port=port, print=None,
                    handle_signals=True)
    except OSError as exc:
        print(f"rollback-receiver: cannot listen on {args.listen}: {exc.strerror}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def _add_inject_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classic", action="store_true", help="a classic sidecar container (clusters before 1.29)")
    p.add_argument("--image", default=None, help="the sidecar image")
    p.add_argument("--app-env", action="store_true", help="point the app at the local listeners (env)")
    p.add_argument("--app-probes", action="store_true", help="point the app's probes at /app-health/*")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resilience-proxy", description="A resilience sidecar for an app's dependencies.")
    p.add_argument("--version", action="version", version=f"resilience-proxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the proxy")
    r.add_argument("--config", help=f"config file (default: $PROXY_CONFIG or {DEFAULT_PATH})")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file")
    c.add_argument("--strict", action="store_true", help="unresolved ${env:}/${file:} references are errors")
    c.set_defaults(func=cmd_check)
    cs = sub.add_parser("config-schema", help="print the JSON Schema of config.yaml (for editors and CI)")
    cs.set_defaults(func=cmd_config_schema)
    d = sub.add_parser("demo", help="run the proxy against built-in local upstreams")
    d.add_argument("--config", default=None, help="demo config (default: the packaged demo.yaml)")
    d.add_argument("--port-base", type=int, default=None, metavar="N",
                   help="the listeners, admin and built-in upstreams on N..N+7 (default: the config's ports)")
    d.set_defaults(func=cmd_demo)
    from proxy.status import DEFAULT_ADMIN

    w = sub.add_parser("wait-ready", help="exit 0 once the sidecar has started (/health/startup), for app start gating")
    w.add_argument("--admin", default=DEFAULT_ADMIN, help=f"admin URL (default {DEFAULT_ADMIN})")
    w.add_argument("--timeout", default="60s")
    w.set_defaults(func=cmd_wait_ready)
    st = sub.add_parser("status", help="a table per upstream and track: breaker, rates, errors, p99, fallbacks")
    st.add_argument("--admin", default=DEFAULT_ADMIN)
    st.add_argument("--token-file", default=None)
    st.add_argument("--watch", action="store_true", help="refresh every second")
    st.set_defaults(func=cmd_status)
    i = sub.add_parser("inject", help="add the sidecar to Kubernetes YAML (stdin or -f)")
    i.add_argument("-f", "--file", default="-", help="a YAML file, or - for stdin (default)")
    _add_inject_flags(i)
    i.set_defaults(func=cmd_inject)
    wh = sub.add_parser("webhook", help="serve the mutating admission webhook over TLS")
    wh.add_argument("--tls-cert", required=True)
    wh.add_argument("--tls-key", required=True)
    wh.add_argument("--listen", default="0.0.0.0:8443")
    _add_inject_flags(wh)
    wh.set_defaults(func=cmd_webhook)
    rb = sub.add_parser("rollback-receiver", help="roll a bad canary back for the fleet, on Alertmanager's webhook")
    rb.add_argument("--listen", default="0.0.0.0:9095")
    rb.add_argument("--namespace", default=None, help="the namespace it acts in (default: $POD_NAMESPACE)")
    rb.add_argument("--configmap", default="resilience-proxy-config", help="the sidecars' ConfigMap")
    rb.add_argument("--key", default="config.yaml", help="the ConfigMap key holding the sidecar config")
    rb.add_argument("--token-file", default=None, help="the bearer token Alertmanager must send")
    rb.add_argument("--no-token", action="store_true", help="accept the webhook from any caller")
    rb.add_argument("--dry-run", action="store_true", help="decide and record, write nothing")
    rb.add_argument("--max-actions", type=int, default=5, help="actions per --per at most (default 5)")
    rb.add_argument("--per", default="10m", help="the rate limit's window (default 10m)")
    rb.add_argument("--kubeconfig", default=None, help="a kubeconfig (default: the in-cluster service account)")
    rb.set_defaults(func=cmd_rollback_receiver)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
