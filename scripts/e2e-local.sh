#!/usr/bin/env bash
# The kube path end to end on one machine: the Kubernetes API emulator, `aether serve`,
# and two emulated "pods" (each a real aether-fetcher watching its Pod object plus a real
# app under `aether-fetcher supervise`), all on loopback. Runs scripts/dev-hot-e2e.sh and
# scripts/dev-hot-signature-e2e.sh against them and checks the apps serve the new code.
# A real Prometheus server (Debian's `prometheus`) scrapes the fetchers and the control
# plane throughout, with the shipped alert rules loaded, and is queried over its HTTP API
# for the metrics, the alerts and every query of the Grafana dashboard; `promtool check
# metrics` lints the real /metrics; the Deployments and RBAC the control plane applied are
# read back with kubectl and validated against the Kubernetes schemas (strict).
# Exits non-zero on any failure; removes everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
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
declare -A app_port fetch_port
for i in 0 1; do
  pod=demo-$i
  fport=$(free_port); aport=$(free_port); app_port[$pod]=$aport; fetch_port[$pod]=$fport
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
  POD_NAME=$pod POD_NAMESPACE=default AETHER_APP=demo AETHER_WORKSPACE=$work/$pod AETHER_PUBKEY=$pubkey \
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

echo "==> Prometheus scraping both fetchers and aether serve, with the shipped rules"
prom_port=$(free_port)
cat > "$work/prometheus.yml" <<YAML
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: ["$PWD/deploy/monitoring/aether.rules.yaml"]
scrape_configs:
  # The job names Prometheus Operator gives the shipped PodMonitors (<namespace>/<name>).
  - job_name: aether/aether-fetchers
    static_configs:
      - {targets: ["127.0.0.1:${fetch_port[demo-0]}"], labels: {namespace: default, pod: demo-0}}
      - {targets: ["127.0.0.1:${fetch_port[demo-1]}"], labels: {namespace: default, pod: demo-1}}
  - job_name: aether/aether-control-plane
    static_configs: [{targets: ["127.0.0.1:$serve_port"]}]
YAML
promtool check config "$work/prometheus.yml" >/dev/null
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" > "$work/prometheus.log" 2>&1 & pids+=($!)
# Waits until the instant query $1 gives a result for which the Python expression $2 (over
# `r`, the result list) holds; prints the result. Prometheus scrapes every second, so this
# waits for the next scrape, not for a fixed time.
promq() {
  local out=
  for _ in $(seq 600); do
    out=$(curl -sf --data-urlencode "query=$1" "http://127.0.0.1:$prom_port/api/v1/query" 2>/dev/null || true)
    if [ -n "$out" ] && python3 -c 'import json,sys; r=json.loads(sys.argv[1])["data"]["result"]; sys.exit(0 if ('"$2"') else 1)' "$out" 2>/dev/null; then
      echo "$out"; return 0
    fi
    sleep 0.1
  done
  echo "Prometheus: no result for $1 satisfying $2; last answer: $out" >&2
  return 1
}
promq 'up == 1' 'len(r) == 3' >/dev/null || fail "Prometheus does not scrape all three targets"
echo "Prometheus scrapes 2 fetchers and the control plane"

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
echo "==> the metrics through the real Prometheus"
v3=${digest#sha256:}
promq 'dev_hot_refresh_total' 'len(r) == 2 and all(float(s["value"][1]) >= 3 for s in r)' >/dev/null \
  || fail "dev_hot_refresh_total"
p50=$(promq 'histogram_quantile(0.5, sum by (le) (dev_hot_refresh_latency_seconds_bucket))' \
  'len(r) == 1 and 0 < float(r[0]["value"][1]) < 60' | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["result"][0]["value"][1])') \
  || fail "histogram_quantile of dev_hot_refresh_latency_seconds"
promq "dev_hot_current_info{digest=\"sha256:$v3\"} == 1" 'sorted(s["metric"]["pod"] for s in r) == ["demo-0", "demo-1"]' >/dev/null \
  || fail "dev_hot_current_info does not show release 3 live on both pods"
promq 'dev_hot_in_sync == 1' 'len(r) == 2' >/dev/null || fail "dev_hot_in_sync"
promq 'ALERTS{alertname="AetherSignatureFailure", alertstate="firing", severity="critical"}' 'len(r) == 2' >/dev/null \
  || fail "the AetherSignatureFailure alert did not fire for the refused signature"
# The scripts above patch with kubectl; one release through the control plane's own route
# (the same, live, release again) feeds its patch metrics.
curl -sf -X POST -H "Authorization: Bearer $AETHER_API_TOKEN" -H 'Content-Type: application/json' \
  -d "{\"digest\":\"$digest\",\"url\":\"$url\",\"signature\":\"$(aether sign "$digest")\"}" \
  "$AETHER_API_URL/v1/apps/demo/release" >/dev/null || fail "release through the API"
promq 'aether_patches_total' 'len(r) == 1 and float(r[0]["value"][1]) >= 1' >/dev/null || fail "aether_patches_total"
promq 'histogram_quantile(0.99, sum by (le) (aether_patch_seconds_bucket))' 'len(r) == 1' >/dev/null \
  || fail "histogram_quantile of aether_patch_seconds"
promq 'sum(aether_pod_patches_total{result="ok"})' 'len(r) == 1 and float(r[0]["value"][1]) >= 2' >/dev/null \
  || fail "aether_pod_patches_total"
echo "Prometheus: refresh counts, latency p50 ${p50}s, live digest on both pods, in sync, signature alert firing, control-plane patches"
# Every query of the dashboard, with Grafana's variables replaced, must be accepted.
python3 - "$prom_port" deploy/monitoring/grafana-dashboard.json <<'PY' || fail "a dashboard query failed"
import json, sys, urllib.parse, urllib.request
port, path = sys.argv[1], sys.argv[2]
exprs = [t["expr"] for p in json.load(open(path))["panels"] for t in p.get("targets", [])]
for e in exprs:
    q = e.replace("$namespace", ".*").replace("$__rate_interval", "1m")
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url) as resp:
        body = json.load(resp)
    assert body["status"] == "success", (e, body)
    assert body["data"]["result"], f"no data for the dashboard query {e}"
print(f"the {len(exprs)} dashboard queries are valid PromQL and return data")
PY

echo "==> promtool check metrics on the real /metrics"
for port in "${fetch_port[demo-0]}" "$serve_port"; do
  curl -sf "http://127.0.0.1:$port/metrics" > "$work/metrics.txt"
  promtool check metrics < "$work/metrics.txt" || fail "promtool check metrics on 127.0.0.1:$port"
done
echo "fetcher and control-plane metrics pass promtool"

echo "==> the manifests the control plane applied, validated (strict) for Kubernetes"
aether deploy plain "$work/src" --image demo:local -- python3 -m http.server >/dev/null
kubectl get deployments,serviceaccounts,roles,rolebindings -o yaml > "$work/applied.yaml"
python3 scripts/validate-manifests.py "$work/applied.yaml" || fail "an applied manifest is not valid Kubernetes"
echo "==> e2e-local OK"
