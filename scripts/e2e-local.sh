#!/usr/bin/env bash
# The kube path end to end on one machine: the Kubernetes API emulator, `aether serve`,
# and two emulated "pods" (each a real aether-fetcher watching its Pod object plus a real
# app under `aether-fetcher supervise`), all on loopback. Runs scripts/dev-hot-e2e.sh and
# scripts/dev-hot-signature-e2e.sh against them and checks the apps serve the new code.
# Exits non-zero on any failure; removes everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x /usr/bin/kubectl ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null; }
command -v python3 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null; }
cargo build --locked -q -p aether -p aether-fetcher -p aether-testkit --bins
bin=$PWD/target/debug
export PATH=$bin:$PATH

work=$(mktemp -d /tmp/aether-e2e.XXXXXX)
pids=()
cleanup() {
  local code=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$code" -ne 0 ]; then
    echo "--- e2e-local failed ($code); last log lines:" >&2
    tail -n 15 "$work"/*.log >&2 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_file() { for _ in $(seq 1200); do [ -s "$1" ] && return 0; sleep 0.05; done; echo "timeout waiting for $1" >&2; return 1; }
fail() { echo "FAIL: $*" >&2; exit 1; }

echo "==> Kubernetes API emulator"
aether-kube-emulator > "$work/emu.url" 2> "$work/emulator.log" & pids+=($!)
wait_file "$work/emu.url"
api=$(head -1 "$work/emu.url")
export KUBECONFIG=$work/kubeconfig HOME=$work
kubectl config set-cluster emu --server="$api" >/dev/null
kubectl config set-credentials emu --token=unused >/dev/null
kubectl config set-context emu --cluster=emu --user=emu --namespace=default >/dev/null
kubectl config use-context emu >/dev/null

echo "==> keys and aether serve"
aether keygen --out "$work/keys" >/dev/null
export AETHER_SIGNING_KEY=$(cat "$work/keys/aether.key")
pubkey=$(cat "$work/keys/aether.pub")
serve_port=$(free_port)
export AETHER_API_URL=http://127.0.0.1:$serve_port AETHER_API_TOKEN=e2e-token
AETHER_LISTEN=127.0.0.1:$serve_port AETHER_DATA_DIR=$work/data AETHER_PUBKEY=$pubkey \
  aether serve 2> "$work/serve.log" & pids+=($!)
for _ in $(seq 1200); do curl -sf "$AETHER_API_URL/healthz" >/dev/null && break; sleep 0.05; done

echo "==> deploy demo (dev-hot) from examples/hello"
mkdir -p "$work/src"
cp -r examples/hello/. "$work/src/"
aether deploy demo "$work/src" --dev-hot --image demo:local -- python3 -m http.server >/dev/null

echo "==> two emulated pods: fetcher + supervised app each"
declare -A app_port
for i in 0 1; do
  pod=demo-$i
  fport=$(free_port); aport=$(free_port); app_port[$pod]=$aport
  kubectl apply --server-side -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $pod
  labels: {app.kubernetes.io/name: demo, app.kubernetes.io/managed-by: aether}
  annotations: {emulator.aether.dev/address: "127.0.0.1:$fport"}
spec:
  containers: [{name: demo, image: demo:local}]
YAML
  mkdir -p "$work/$pod"
  POD_NAME=$pod POD_NAMESPACE=default AETHER_WORKSPACE=$work/$pod AETHER_PUBKEY=$pubkey \
    AETHER_ALLOW_HTTP=1 AETHER_HTTP_ADDR=127.0.0.1:$fport AETHER_MIN_REFRESH_INTERVAL_MS=100 \
    aether-fetcher 2> "$work/fetcher-$pod.log" & pids+=($!)
  AETHER_WORKSPACE=$work/$pod aether-fetcher supervise --grace-sec 2 -- \
    python3 -m http.server "$aport" --bind 127.0.0.1 > "$work/app-$pod.log" 2>&1 & pids+=($!)
done

serves() { curl -sf "http://127.0.0.1:$1/index.html" 2>/dev/null | grep "$2" >/dev/null; }
for pod in demo-0 demo-1; do
  ok=; for _ in $(seq 1200); do serves "${app_port[$pod]}" "Hello, version 1" && ok=1 && break; sleep 0.05; done
  [ -n "$ok" ] || fail "$pod never served the first release"
done
echo "both pods serve release 1"

release() { # $1 = text appended to index.html; prints "url digest"
  echo "<p>$1</p>" >> "$work/src/index.html"
  tar -C "$work/src" -czf "$work/r.tgz" .
  local d; d="sha256:$(sha256sum "$work/r.tgz" | cut -d' ' -f1)"
  curl -sf -X PUT -H "Authorization: Bearer $AETHER_API_TOKEN" --data-binary @"$work/r.tgz" \
    "$AETHER_API_URL/v1/artifacts/$d" | sed -n 's/.*"url":"\([^"]*\)".*/\1/p' | tr -d '\n'
  echo " $d"
}

echo "==> scripts/dev-hot-e2e.sh"
read -r url digest < <(release "version 2")
ms=$(SIGNATURE=$(aether sign "$digest") scripts/dev-hot-e2e.sh demo "$url" "$digest") || fail "dev-hot-e2e.sh exited $?"
echo "patch-to-live on 2 pods: ${ms} ms"
for pod in demo-0 demo-1; do
  ok=; for _ in $(seq 1200); do serves "${app_port[$pod]}" "version 2" && ok=1 && break; sleep 0.05; done
  [ -n "$ok" ] || fail "$pod app does not serve version 2 after the restart"
done
echo "both apps restarted and serve version 2"

echo "==> scripts/dev-hot-signature-e2e.sh"
read -r url digest < <(release "version 3")
FETCHER_LOGS="$work/fetcher-demo-*.log" AETHER_BIN=aether \
  scripts/dev-hot-signature-e2e.sh demo "$url" "$digest" || fail "dev-hot-signature-e2e.sh"
for pod in demo-0 demo-1; do
  ok=; for _ in $(seq 1200); do serves "${app_port[$pod]}" "version 3" && ok=1 && break; sleep 0.05; done
  [ -n "$ok" ] || fail "$pod app does not serve version 3"
done
echo "==> e2e-local OK"
