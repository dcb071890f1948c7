#!/usr/bin/env bash
# Signature enforcement end to end: a badly signed digest is refused by every fetcher
# (REFRESH_FAIL reason=signature, the live release unchanged), then the good signature
# goes live.
#
# usage: scripts/dev-hot-signature-e2e.sh <app> <artifact-url> <digest>
#
# Needs the fetchers to run with AETHER_PUBKEY and AETHER_SIGNING_KEY (the matching
# seed) in this environment; `aether` on PATH or AETHER_BIN. Optional FETCHER_LOGS: a
# glob of fetcher log files in which the REFRESH_FAIL marker must appear.
# Exit 0 on success, 20 on any failure, 2 on usage errors.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 3 ] || [ -z "${AETHER_SIGNING_KEY:-}" ]; then
  echo "usage: AETHER_SIGNING_KEY=<seed hex> $0 <app> <artifact-url> <digest>" >&2
  exit 2
fi
app=$1 url=$2 digest=$3
NAMESPACE=${NAMESPACE:-default}
KUBECTL=${KUBECTL:-kubectl}
FETCHER_PORT=${FETCHER_PORT:-9180}
AETHER_BIN=${AETHER_BIN:-aether}
selector="app.kubernetes.io/name=$app,app.kubernetes.io/managed-by=aether"
k() { $KUBECTL -n "$NAMESPACE" "$@"; }
field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p"; }
status_of() { k get --raw "/api/v1/namespaces/$NAMESPACE/pods/$1:$FETCHER_PORT/proxy/status" 2>/dev/null || true; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$AETHER_BIN" keygen --out "$tmp" >/dev/null
bad=$(AETHER_SIGNING_KEY=$(cat "$tmp/aether.key") "$AETHER_BIN" sign "$digest")
good=$("$AETHER_BIN" sign "$digest")

pods=$(k get pods -l "$selector" -o jsonpath='{.items[*].metadata.name}')
[ -n "$pods" ] || { echo "no pods match $selector" >&2; exit 20; }
declare -A before
for pod in $pods; do before[$pod]=$(status_of "$pod" | field current_digest); done

echo "==> a bad signature must be refused"
# The Deployment too: the control plane would otherwise copy its desired state back.
bad_set=("aether.dev/digest=$digest" "aether.dev/artifact-url=$url" "aether.dev/signature=$bad")
k annotate deployment "$app" --overwrite "${bad_set[@]}" >/dev/null 2>&1 || true
k annotate pods -l "$selector" --overwrite "${bad_set[@]}" >/dev/null
for pod in $pods; do
  ok=
  deadline=$(( $(date +%s) + 30 ))
  while [ "$(date +%s)" -le "$deadline" ]; do
    s=$(status_of "$pod")
    if [ "$(printf '%s' "$s" | field desired_digest)" = "$digest" ] && printf '%s' "$s" | grep '"reason":"signature"' >/dev/null; then ok=1; break; fi
    sleep 0.02
  done
  [ -n "$ok" ] || { echo "pod $pod did not refuse the bad signature: $s" >&2; exit 20; }
  now=$(printf '%s' "$s" | field current_digest)
  [ "$now" = "${before[$pod]}" ] || { echo "pod $pod changed its live release on a bad signature" >&2; exit 20; }
done
if [ -n "${FETCHER_LOGS:-}" ]; then
  # shellcheck disable=SC2086
  grep -q "REFRESH_FAIL app=.* reason=signature" $FETCHER_LOGS || { echo "no REFRESH_FAIL reason=signature marker in $FETCHER_LOGS" >&2; exit 20; }
fi
echo "refused on every pod, live release unchanged"

echo "==> the good signature goes live"
if SIGNATURE=$good scripts/dev-hot-e2e.sh "$app" "$url" "$digest"; then
  echo "signature e2e OK"
else
  echo "the correctly signed release did not go live" >&2
  exit 20
fi
