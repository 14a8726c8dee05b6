#!/usr/bin/env bash
# The tools the tests and the benchmark build with `go install`, cached outside the clone and keyed by
# version (a fresh clone, or a version bump, rebuilds only what it lacks). Prints the directory that
# holds them; `--bench` adds what only the benchmark needs.
#   PATH="$(bash scripts/tools.sh):$PATH"
set -euo pipefail
CACHE="${RESILIENCE_PROXY_TOOLS:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/resilience-proxy/tools}"
BIN="$CACHE/bin"
mkdir -p "$BIN"

build() {  # name module version [the binary's name as go install writes it]
  local name=$1 module=$2 version=$3 built=${4:-$1}
  local dir="$CACHE/$name-$version"
  if [ ! -x "$dir/$name" ]; then
    command -v go >/dev/null || { echo "go is needed to build $name" >&2; exit 1; }
    echo "building $name $version with go install (cached in $dir) ..." >&2
    rm -rf "$dir/.gobin"
    GOBIN="$dir/.gobin" go install "$module@$version" >&2
    mv "$dir/.gobin/$built" "$dir/$name"
    rmdir "$dir/.gobin"
  fi
  ln -sfn "$dir/$name" "$BIN/$name"
}

build toxiproxy-server github.com/Shopify/toxiproxy/v2/cmd/server v2.12.0 server
build kustomize sigs.k8s.io/kustomize/kustomize/v5 v5.4.3
if [ "${1:-}" = "--bench" ]; then
  build vegeta github.com/tsenart/vegeta/v12 v12.13.0
fi
echo "$BIN"
