#!/bin/sh
# The legacy dev-hot sidecar, rewritten from its description as the baseline for
# scripts/bench-compare.sh. Runs under `busybox sh` (Debian's busybox). Do not deploy it:
# it extracts in place, has no TLS verification and no signature check.
#
# Every AETHER_FETCH_INTERVAL_SEC seconds: GET the own pod JSON from the API server with
# wget, read aether.dev/digest and aether.dev/artifact-url, and when the digest differs from
# the last applied one: download to a file, `sha256sum -c`, `tar -xzf` in place, print
# REFRESH_OK. On failure back off 0.5 s * 2^n, capped at 5 s.
#
# Environment: API_SERVER (http://host:port), POD_NAME, POD_NAMESPACE (default),
# AETHER_WORKSPACE (/workspace), AETHER_FETCH_INTERVAL_SEC (5), LEGACY_ONCE=1 to exit after
# the first successful refresh (for timing one apply).
: "${API_SERVER:?API_SERVER is required}"
: "${POD_NAME:?POD_NAME is required}"
POD_NAMESPACE=${POD_NAMESPACE:-default}
AETHER_WORKSPACE=${AETHER_WORKSPACE:-/workspace}
AETHER_FETCH_INTERVAL_SEC=${AETHER_FETCH_INTERVAL_SEC:-5}
tmp=${TMPDIR:-/tmp}/legacy-$$.tgz

# The legacy image was busybox alone: use its applets even where the host has GNU tools.
bb=${BUSYBOX:-busybox}
for applet in wget sed awk sha256sum tar mkdir rm sleep; do
  eval "$applet() { \"\$bb\" $applet \"\$@\"; }"
done
last=""
failures=0

now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

backoff() {
  delay=$(awk -v n="$failures" 'BEGIN { d = 0.5 * 2 ^ n; if (d > 5) d = 5; print d }')
  sleep "$delay"
}

while :; do
  json=$(wget -q -O - "$API_SERVER/api/v1/namespaces/$POD_NAMESPACE/pods/$POD_NAME" 2>/dev/null)
  digest=$(printf '%s' "$json" | sed -n 's/.*"aether\.dev\/digest":"sha256:\([0-9a-f]*\)".*/\1/p')
  url=$(printf '%s' "$json" | sed -n 's/.*"aether\.dev\/artifact-url":"\([^"]*\)".*/\1/p')
  if [ -n "$digest" ] && [ "$digest" != "$last" ]; then
    start=$(now_ms)
    if wget -q -O "$tmp" "$url" \
      && echo "$digest  $tmp" | sha256sum -c -s \
      && mkdir -p "$AETHER_WORKSPACE" \
      && tar -xzf "$tmp" -C "$AETHER_WORKSPACE"; then
      last=$digest
      failures=0
      echo "REFRESH_OK app=$POD_NAME digest=$digest ms=$(( $(now_ms) - start ))"
      rm -f "$tmp"
      [ "${LEGACY_ONCE:-0}" = 1 ] && exit 0
    else
      echo "REFRESH_FAIL app=$POD_NAME reason=download ms=$(( $(now_ms) - start ))"
      rm -f "$tmp"
      failures=$(( failures + 1 ))
      backoff
      continue
    fi
  fi
  sleep "$AETHER_FETCH_INTERVAL_SEC"
done
