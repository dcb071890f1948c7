#!/usr/bin/env bash
# Checks what we ship for a cluster (run by the test command):
#   - deploy/ is exactly what `aether install` prints (scripts/gen-deploy.sh --check);
#   - every manifest `aether install` can print (each store, the replicated object-storage
#     installation, a custom namespace and URL,
#     the monitoring objects) and the kustomize builds of deploy/ and deploy/monitoring are
#     valid Kubernetes, strict, for 1.31 and the newest release (scripts/validate-manifests.py);
#   - the alert rules pass `promtool check rules` and their unit tests (`promtool test rules`);
#   - the Grafana dashboard is valid JSON whose queries are checked against a real
#     Prometheus by scripts/e2e-local.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
if [ -z "${AETHER_BIN:-}" ]; then
  cargo build --locked -q -p aether
  AETHER_BIN=$PWD/target/debug/aether
fi
export AETHER_BIN
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

scripts/gen-deploy.sh --check
echo "deploy/ is current"

"$AETHER_BIN" install > "$work/pvc.yaml"
"$AETHER_BIN" install --store emptydir -n team-a --public-url https://aether.example.com \
  --token-secret t --image registry.example.com/aether:1 --fetch-image registry.example.com/aether-fetcher:1 \
  > "$work/emptydir.yaml"
"$AETHER_BIN" install --replicas 3 --store s3://aether-releases/team-a --store-secret aether-store \
  > "$work/ha.yaml"
"$AETHER_BIN" install --monitoring > "$work/monitoring.yaml"
kubectl kustomize deploy > "$work/kustomize.yaml"
kubectl kustomize deploy/monitoring > "$work/kustomize-monitoring.yaml"
python3 scripts/validate-manifests.py "$work"/*.yaml

promtool check rules deploy/monitoring/aether.rules.yaml
(cd deploy/monitoring && promtool test rules aether.rules.test.yaml)
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["panels"], "no panels"' \
  deploy/monitoring/grafana-dashboard.json
echo "check-deploy OK"
