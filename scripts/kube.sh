#!/usr/bin/env bash
# etcd and kube-apiserver for the tests that need a real Kubernetes API server (envtest-style: no
# kubelet, no controllers), built from their Go modules through the small wrapper modules in
# scripts/kube/ (neither can be `go install`ed directly: their go.mod files carry replace directives).
# Cached outside the clone in a folder keyed by the versions and the wrappers' go.sum, built into a
# temporary folder and moved into place; built only when missing (~15 minutes on 2 cores, ~3 GB at
# link). Prints the folder that holds `etcd` and `kube-apiserver`.
#   KUBE_BIN="$(bash scripts/kube.sh)"
set -euo pipefail
cd "$(dirname "$0")/kube"
CACHE="${RESILIENCE_PROXY_TOOLS:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/resilience-proxy/tools}"
KUBE=v1.37.2 ETCD=v3.7.3
key=$(cat etcd/go.sum apiserver/go.sum | sha256sum | cut -c1-12)
dir="$CACHE/kube-$KUBE-etcd-$ETCD-$key"
if [ ! -x "$dir/kube-apiserver" ] || [ ! -x "$dir/etcd" ]; then
  command -v go >/dev/null || { echo "go is needed to build etcd and kube-apiserver" >&2; exit 1; }
  echo "building etcd $ETCD and kube-apiserver $KUBE (once; cached in $dir) ..." >&2
  mkdir -p "$CACHE"
  tmp=$(mktemp -d "$CACHE/.kube-build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  (cd etcd && go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" .) >&2
  # without the version stamp it reports v0.0.0-master, which clients and discovery refuse
  (cd apiserver && go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBE" \
      -o "$tmp/kube-apiserver" .) >&2
  chmod 755 "$tmp"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  trap - EXIT
fi
echo "$dir"
