#!/usr/bin/env bash
# Runs every test: ruff, then pytest. Needs the venv (made by `make test`), the go-built tools
# (scripts/tools.sh and scripts/kube.sh build them once, into a cache outside the clone) and the Debian tools the tests
# drive (redis-server, prometheus/promtool, amtool; .ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
PATH="$(bash scripts/tools.sh):$PATH"
export PATH
# etcd and kube-apiserver for the tests against a real API server (built once, ~15 minutes; cached)
RESILIENCE_PROXY_KUBE="$(bash scripts/kube.sh)"
export RESILIENCE_PROXY_KUBE
# a real OpenTelemetry Collector for the tracing tests (built once, ~1-4 minutes; cached)
RESILIENCE_PROXY_OTELCOL="$(bash scripts/otelcol.sh)"
export RESILIENCE_PROXY_OTELCOL
for t in redis-server redis-server-7.4 promtool prometheus amtool; do
  command -v "$t" >/dev/null 2>&1 || { echo "missing $t: apt-get install redis-server prometheus prometheus-alertmanager (.ci/run does)" >&2; exit 1; }
done
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
