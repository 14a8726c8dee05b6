#!/usr/bin/env bash
# A real OpenTelemetry Collector for the tracing tests: the OTLP receiver and the contrib file exporter,
# built from the Go module proxy through the small wrapper module in scripts/otelcol/ (every collector
# module on one release, v0.161.0). Cached outside the clone in a folder keyed by the release and the
# wrapper's go.sum, built into a temporary folder and moved into place; built only when missing. Prints
# the path of the binary.
#   OTELCOL="$(bash scripts/otelcol.sh)"
set -euo pipefail
cd "$(dirname "$0")/otelcol"
CACHE="${RESILIENCE_PROXY_TOOLS:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/resilience-proxy/tools}"
RELEASE=v0.161.0
key=$(sha256sum go.sum main.go | sha256sum | cut -c1-12)
dir="$CACHE/otelcol-$RELEASE-$key"
if [ ! -x "$dir/otelcol-test" ]; then
  command -v go >/dev/null || { echo "go is needed to build the OpenTelemetry Collector" >&2; exit 1; }
  echo "building the OpenTelemetry Collector $RELEASE (once; cached in $dir) ..." >&2
  mkdir -p "$CACHE"
  tmp=$(mktemp -d "$CACHE/.otelcol-build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  go build -trimpath -ldflags "-s -w" -o "$tmp/otelcol-test" . >&2
  chmod 755 "$tmp"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  trap - EXIT
fi
echo "$dir/otelcol-test"
