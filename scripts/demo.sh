#!/usr/bin/env bash
# A guided run of the hot-reload path on one machine, no cluster: the Kubernetes API
# emulator holds a pod, an artifact server serves two packed versions of examples/hello,
# the real aether-fetcher watches the pod, and kubectl annotates it twice. Each version
# goes live in the fetcher's workspace, with the REFRESH_OK marker and its latency.
#
# usage: scripts/demo.sh [DIR]        (default examples/hello)
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-examples/hello}

[ -x /usr/bin/kubectl ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null; }
cargo build --locked -q -p aether-fetcher -p aether-testkit --bins

work=$(mktemp -d /tmp/aether-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/serve" "$work/workspace" "$work/v2"

# Two releases: the directory as it is, and with one line changed.
tar -C "$src" -czf "$work/serve/v1.tgz" .
cp -r "$src"/. "$work/v2/"
echo "<p>Hello, version 2 (hot reloaded).</p>" >> "$work/v2/index.html"
tar -C "$work/v2" -czf "$work/serve/v2.tgz" .

target/debug/aether-kube-emulator > "$work/emu.url" & pids+=($!)
target/debug/aether-artifact-server --dir "$work/serve" > "$work/art.url" & pids+=($!)
for _ in $(seq 100); do [ -s "$work/emu.url" ] && [ -s "$work/art.url" ] && break; sleep 0.1; done
api=$(head -1 "$work/emu.url"); art=$(head -1 "$work/art.url")
export KUBECONFIG=$work/kubeconfig HOME=$work
kubectl config set-cluster emu --server="$api" >/dev/null
kubectl config set-context emu --cluster=emu --namespace=default >/dev/null
kubectl config use-context emu >/dev/null
kubectl run demo-0 --image=app --restart=Never >/dev/null

POD_NAME=demo-0 POD_NAMESPACE=default AETHER_WORKSPACE="$work/workspace" AETHER_ALLOW_HTTP=1 \
  AETHER_HTTP_ADDR=127.0.0.1:0 AETHER_MIN_REFRESH_INTERVAL_MS=0 \
  target/debug/aether-fetcher 2> "$work/fetcher.log" & pids+=($!)

apply() {
  local name=$1 digest
  digest="sha256:$(sha256sum "$work/serve/$name.tgz" | cut -d' ' -f1)"
  echo "==> kubectl annotate pod demo-0 aether.dev/digest=${digest:0:19}… ($name)"
  kubectl annotate pod demo-0 --overwrite "aether.dev/digest=$digest" "aether.dev/artifact-url=$art/$name.tgz" >/dev/null
  for _ in $(seq 200); do
    [ "$(readlink "$work/workspace/current" 2>/dev/null)" = ".aether/releases/${digest#sha256:}" ] && break
    sleep 0.05
  done
  grep -o "REFRESH_OK.*" "$work/fetcher.log" | tail -1
  echo "--- workspace/current/index.html:"
  cat "$work/workspace/current/index.html"
}
apply v1
apply v2
echo "==> demo done: both releases went live through watch → download → verify → extract → swap"
