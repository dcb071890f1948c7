#!/usr/bin/env bash
# Hot-patch an app and measure patch-to-live across all its pods.
#
# usage: scripts/dev-hot-e2e.sh <app> <artifact-url> <digest>
#
# Annotates the app's Deployment (the control plane copies it onto new pods) and its pods
# (so it works without the control plane too), then polls each pod's fetcher /status
# through the API server's pod proxy until every pod reports <digest> live.
# Prints the latency in ms. Exit codes (contract):
#    0  live on every pod within SLO_MS
#   10  live on every pod, but over SLO_MS
#   20  refused by a fetcher, or not live within TIMEOUT_MS
#    2  usage error
#
# Environment: SLO_MS (10000), TIMEOUT_MS (60000), NAMESPACE (default),
# SIGNATURE (aether.dev/signature to set with the digest), FORMAT (`manifest` when the
# URL serves a release manifest; default: a tar.gz, and a format annotation left by an
# earlier manifest release is removed), KUBECTL (kubectl), FETCHER_PORT (9180). kubectl
# uses KUBECONFIG as usual.
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 <app> <artifact-url> <digest>" >&2
  exit 2
fi
app=$1 url=$2 digest=$3
SLO_MS=${SLO_MS:-10000}
TIMEOUT_MS=${TIMEOUT_MS:-60000}
NAMESPACE=${NAMESPACE:-default}
KUBECTL=${KUBECTL:-kubectl}
FETCHER_PORT=${FETCHER_PORT:-9180}
selector="app.kubernetes.io/name=$app,app.kubernetes.io/managed-by=aether"
case "$digest" in sha256:*) ;; *) echo "digest must be sha256:<hex>" >&2; exit 2 ;; esac

now_ms() { date +%s%3N; }
k() { $KUBECTL -n "$NAMESPACE" "$@"; }

annotations=("aether.dev/digest=$digest" "aether.dev/artifact-url=$url")
if [ -n "${SIGNATURE:-}" ]; then
  annotations+=("aether.dev/signature=$SIGNATURE")
else
  annotations+=("aether.dev/signature-")
fi
case "${FORMAT:-tar.gz}" in
  manifest) annotations+=("aether.dev/format=manifest") ;;
  tar.gz) annotations+=("aether.dev/format-") ;;
  *) echo "FORMAT must be manifest or tar.gz" >&2; exit 2 ;;
esac

pods=$(k get pods -l "$selector" -o jsonpath='{.items[*].metadata.name}')
if [ -z "$pods" ]; then
  echo "no pods match $selector in $NAMESPACE" >&2
  exit 20
fi

start=$(now_ms)
k annotate deployment "$app" --overwrite "${annotations[@]}" >/dev/null 2>&1 || true
k annotate pods -l "$selector" --overwrite "${annotations[@]}" >/dev/null

field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p"; }
deadline=$(( start + TIMEOUT_MS ))
while :; do
  pending=0
  for pod in $pods; do
    status=$(k get --raw "/api/v1/namespaces/$NAMESPACE/pods/$pod:$FETCHER_PORT/proxy/status" 2>/dev/null || true)
    current=$(printf '%s' "$status" | field current_digest)
    [ "$current" = "$digest" ] && continue
    desired=$(printf '%s' "$status" | field desired_digest)
    reason=$(printf '%s' "$status" | sed -n 's/.*"last_error":{"reason":"\([^"]*\)".*/\1/p')
    if [ "$desired" = "$digest" ] && [ -n "$reason" ]; then
      echo "pod $pod refused $digest: reason=$reason" >&2
      exit 20
    fi
    pending=$(( pending + 1 ))
  done
  [ "$pending" -eq 0 ] && break
  if [ "$(now_ms)" -gt "$deadline" ]; then
    echo "$pending pod(s) not live within ${TIMEOUT_MS} ms" >&2
    exit 20
  fi
  sleep 0.02
done
latency=$(( $(now_ms) - start ))
echo "$latency"
if [ "$latency" -le "$SLO_MS" ]; then exit 0; else exit 10; fi
