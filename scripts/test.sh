#!/usr/bin/env bash
# Runs every test. Needs the venv (made by `make test`), a toxiproxy server binary (built here with
# `go install` when missing) and the Debian tools the tests drive (redis-server, ...; .ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
TOXIPROXY_VERSION=v2.12.0
KUSTOMIZE_VERSION=v5.4.3
export PATH="$PWD/.tools/bin:$PATH"
if ! command -v toxiproxy-server >/dev/null 2>&1; then
  command -v go >/dev/null || { echo "go is needed to build toxiproxy-server" >&2; exit 1; }
  echo "building toxiproxy-server $TOXIPROXY_VERSION with go install ..."
  mkdir -p .tools/bin
  GOBIN="$PWD/.tools/gobin" go install "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION"
  mv .tools/gobin/server .tools/bin/toxiproxy-server
fi
if ! command -v kustomize >/dev/null 2>&1; then
  echo "building kustomize $KUSTOMIZE_VERSION with go install ..."
  mkdir -p .tools/bin
  GOBIN="$PWD/.tools/bin" go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
fi
for t in redis-server promtool prometheus amtool; do
  command -v "$t" >/dev/null 2>&1 || { echo "missing $t: apt-get install redis-server prometheus prometheus-alertmanager (.ci/run does)" >&2; exit 1; }
done
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
