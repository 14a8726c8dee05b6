#!/usr/bin/env bash
# Supply chain, by one command: `bash scripts/supply-chain.sh [audit|sbom|all]`.
#   audit: pip-audit over requirements.lock (the image's exact, hash-pinned dependencies). A finding fails
#          unless .pip-audit-ignore lists its ID with a reason. When no vulnerability service answers for
#          the locked versions (this CI's PyPI mirror has no per-version JSON API and osv.dev does not
#          resolve), it says BLOCKED and why, and fails unless SUPPLY_CHAIN_ALLOW_BLOCKED=1 says that is
#          known: an audit that could not look is never reported as clean.
#   sbom:  a CycloneDX 1.6 SBOM of requirements.lock (plus the project from pyproject.toml) at
#          sbom.cdx.json; the image build copies it into the image (Dockerfile).
# pip-audit and cyclonedx-bom live in a venv cached outside the clone, keyed by their versions.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
AUDIT=2.10.1 CDX=7.5.0
CACHE="${RESILIENCE_PROXY_TOOLS:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/resilience-proxy/tools}"
V="$CACHE/supply-chain-pip-audit-$AUDIT-cyclonedx-$CDX"
if [ ! -x "$V/bin/pip-audit" ] || [ ! -x "$V/bin/cyclonedx-py" ]; then
  python3 -m venv "$V" >/dev/null
  "$V/bin/pip" install -q "pip-audit==$AUDIT" "cyclonedx-bom==$CDX"
fi

if [ "$what" = audit ] || [ "$what" = all ]; then
  ignore=()
  while read -r id reason || [ -n "$id" ]; do
    [ -n "$id" ] && [ "${id:0:1}" != "#" ] && [ -n "$reason" ] && ignore+=(--ignore-vuln "$id")
  done < .pip-audit-ignore
  out=$(mktemp)
  set +e
  "$V/bin/pip-audit" -r requirements.lock --require-hashes --disable-pip --progress-spinner off \
    "${ignore[@]}" >"$out" 2>&1
  rc=$?
  set -e
  cat "$out"
  locked=$(grep -cE '^[a-zA-Z0-9_.-]+==' requirements.lock)
  skipped=$(grep -c 'could not be audited' "$out" || true)
  if [ "$rc" -ne 0 ] && grep -qE '^Name +Version +ID' "$out"; then
    echo "supply-chain: pip-audit found vulnerabilities (list an ID in .pip-audit-ignore with a reason to accept one)" >&2
    exit 1
  fi
  if [ "$skipped" -ge "$locked" ]; then
    echo "supply-chain: BLOCKED — no vulnerability service answered for any of the $locked locked packages" \
         "(pypi.org's per-version JSON API is not served by this machine's PyPI mirror; api.osv.dev does not resolve)." \
         "The audit did not run; nothing is claimed clean." >&2
    [ "${SUPPLY_CHAIN_ALLOW_BLOCKED:-}" = 1 ] || { echo "supply-chain: set SUPPLY_CHAIN_ALLOW_BLOCKED=1 to go on without it" >&2; exit 1; }
  elif [ "$rc" -ne 0 ]; then
    echo "supply-chain: pip-audit failed (exit $rc)" >&2
    exit "$rc"
  else
    echo "supply-chain: pip-audit: no known vulnerabilities in $((locked - skipped)) of $locked locked packages"
  fi
fi

if [ "$what" = sbom ] || [ "$what" = all ]; then
  "$V/bin/cyclonedx-py" requirements requirements.lock --pyproject pyproject.toml --mc-type application \
    --sv 1.6 --of JSON --output-reproducible --validate -o sbom.cdx.json
  n=$(python3 -c 'import json; print(len(json.load(open("sbom.cdx.json"))["components"]))')
  locked=$(grep -cE '^[a-zA-Z0-9_.-]+==' requirements.lock)
  [ "$n" -eq "$locked" ] || { echo "supply-chain: the SBOM lists $n components, the lock $locked" >&2; exit 1; }
  echo "supply-chain: sbom.cdx.json (CycloneDX 1.6, $n components, validated)"
fi
