#!/usr/bin/env bash
# The shipped images, run the way a pod runs them (no registry: every image is FROM scratch
# with host-built static binaries). On a private Docker network: the API emulator, `aether
# serve` run from the Deployment `aether install` prints, and a "pod" made of the fetcher container and the app container sharing one
# volume. Both pod containers run restricted (--read-only, non-root --user, --cap-drop ALL,
# no-new-privileges), with env, args, command and working directory taken from the
# Deployment that the control plane applied (the manifest builder's own output), and
# POD_NAME / POD_NAMESPACE set as the Downward API would.
#   1. deploy; the app container starts only once the fetcher's /readyz (its startupProbe)
#      says the first release is live, and serves it;
#   2. a hot patch through the control plane is served by the app within the SLO;
#   3. `docker restart` of the fetcher does not download the live digest again;
#   4. a hostile artifact is refused, the app keeps serving the previous code;
#   5. `docker stop` of the pod: both containers exit cleanly within the grace period.
# Everything it starts is removed at the end, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-dev}
SLO_MS=${SLO_MS:-10000}
scripts/build-images.sh
command -v python3 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null; }
AETHER=target/x86_64-unknown-linux-musl/release/aether

run=aether-e2e-$$
work=$(mktemp -d /tmp/aether-containers.XXXXXX)
cleanup() {
  local code=$?
  if [ "$code" -ne 0 ]; then
    for c in api cp fetcher app; do
      echo "--- logs of $run-$c:" >&2; docker logs --tail 20 "$run-$c" >&2 2>&1 || true
    done
  fi
  docker rm -f $(docker ps -aq --filter "label=aether-e2e=$run") >/dev/null 2>&1 || true
  docker network rm "$run" >/dev/null 2>&1 || true
  rm -rf "$work"
  exit "$code"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
now_ms() { date +%s%3N; }
hostport() { docker port "$1" "$2" | head -1; }
until_ok() { # seconds, command…
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -le "$deadline" ] || return 1; sleep 0.05; done
}

restricted=(--read-only --user 65532:65532 --cap-drop ALL --security-opt no-new-privileges
  --label "aether-e2e=$run" --network "$run")
docker network create "$run" >/dev/null
mkdir -p "$work/kube" "$work/store" "$work/ws" "$work/bin" "$work/run"
chown 65532:65532 "$work/store" "$work/ws" "$work/bin" "$work/run"

echo "==> API emulator and aether serve"
docker run -d --name "$run-api" "${restricted[@]}" -p 127.0.0.1::8080 "aether-kube-emulator:$TAG" >/dev/null
api_host=http://$(hostport "$run-api" 8080)
until_ok 20 curl -sf "$api_host/version" || fail "emulator did not start"
python3 - "$work/kube/config" "http://$run-api:8080" <<'PY'
import sys
path, server = sys.argv[1], sys.argv[2]
open(path, "w").write(f"""apiVersion: v1
kind: Config
clusters: [{{name: e2e, cluster: {{server: "{server}"}}}}]
users: [{{name: e2e, user: {{token: unused}}}}]
contexts: [{{name: e2e, context: {{cluster: e2e, user: e2e, namespace: default}}}}]
current-context: e2e
""")
PY
chmod 644 "$work/kube/config"
export KUBECONFIG=$work/kubeconfig-host HOME=$work
kubectl config set-cluster e2e --server="$api_host" >/dev/null
kubectl config set-context e2e --cluster=e2e --namespace=default >/dev/null
kubectl config use-context e2e >/dev/null

# The control plane exactly as `aether install` deploys it: args, env, the store volume and
# the token Secret's file at their mount paths, reachable under its Service's DNS name
# (a network alias), which is also the default public URL the fetchers download from.
token=e2e-$RANDOM$RANDOM
"$AETHER" install -n default --store emptydir --image "aether:$TAG" --fetch-image "aether-fetcher:$TAG" > "$work/install.yaml"
kubectl create --dry-run=client -o json -f "$work/install.yaml" > "$work/install.json"
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
text, items, at = open(f"{work}/install.json").read(), [], 0
decoder = json.JSONDecoder()
while text[at:].strip():  # kubectl prints one JSON object per document
    obj, end = decoder.raw_decode(text[at:].lstrip())
    at += len(text[at:]) - len(text[at:].lstrip()) + end
    items.append(obj)
deploy = next(o for o in items if o["kind"] == "Deployment")
service = next(o for o in items if o["kind"] == "Service")
pod = deploy["spec"]["template"]["spec"]
c = pod["containers"][0]
assert "AETHER_API_TOKEN" not in {e["name"] for e in c["env"]}
with open(f"{work}/cp.env", "w") as f:
    defined = {}
    for e in c["env"]:
        value = e.get("value") or {"metadata.namespace": "default", "metadata.name": "aether-0"}[e["valueFrom"]["fieldRef"]["fieldPath"]]
        for name, v in defined.items():  # the kubelet expands $(VAR) of earlier variables
            value = value.replace(f"$({name})", v)
        defined[e["name"]] = value
        f.write(f"{e['name']}={value}\n")
volumes = {v["name"]: v for v in pod["volumes"]}
mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
assert "emptyDir" in volumes["store"] and "secret" in volumes["api-token"]
open(f"{work}/cp.mounts", "w").write(f"{mounts['store']}\n{mounts['api-token']}\n")
open(f"{work}/cp.args", "w").write("\n".join(c["args"]) + "\n")
port = c["ports"][0]["containerPort"]
svc_port = service["spec"]["ports"][0]["port"]
open(f"{work}/cp.ports", "w").write(f"{port}\n{svc_port}\n")
sc = c["securityContext"]
assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and sc["capabilities"]["drop"] == ["ALL"]
PY
mapfile -t cp_mounts < "$work/cp.mounts"
mapfile -t cp_args < "$work/cp.args"
mapfile -t cp_ports < "$work/cp.ports"
mkdir -p "$work/api-token"; printf '%s' "$token" > "$work/api-token/token"
chown -R 65532:65532 "$work/api-token"; chmod 0440 "$work/api-token/token"
public_url=$(sed -n 's/^AETHER_PUBLIC_URL=//p' "$work/cp.env")
svc_host=$(echo "$public_url" | sed -E 's#^https?://([^:/]+).*#\1#')
# A Service translates its port (80) to the pod's (3000); Docker has no Services, so the
# container listens on the Service's port itself (Docker lets non-root bind low ports
# inside a container's network namespace). Everything else is the Deployment's.
docker run -d --name "$run-cp" "${restricted[@]}" --network-alias "$svc_host" \
  --env-file "$work/cp.env" -e AETHER_LISTEN="0.0.0.0:${cp_ports[1]}" \
  -e KUBECONFIG=/kube/config -v "$work/kube:/kube:ro" \
  -v "$work/store:${cp_mounts[0]}" -v "$work/api-token:${cp_mounts[1]}:ro" \
  -p "127.0.0.1::${cp_ports[1]}" "aether:$TAG" "${cp_args[@]}" >/dev/null
export AETHER_API_URL=http://$(hostport "$run-cp" "${cp_ports[1]}") AETHER_API_TOKEN=$token
until_ok 20 curl -sf "$AETHER_API_URL/readyz" || fail "aether serve did not become ready"
code=$(curl -s -o /dev/null -w '%{http_code}' "$AETHER_API_URL/v1/apps/demo/status")
[ "$code" = 401 ] || fail "the API answered $code without the token from the mounted Secret"
echo "the installed control plane is ready at $public_url (token from its Secret file)"

echo "==> 1. deploy, then run the pod from the applied Deployment"
mkdir -p "$work/src"; cp -r examples/hello/. "$work/src/"
"$AETHER" deploy demo "$work/src" --dev-hot --image "aether-example-app:$TAG" -- /app/server >/dev/null
kubectl run demo-0 --image="aether-example-app:$TAG" --restart=Never \
  --labels=app.kubernetes.io/name=demo,app.kubernetes.io/managed-by=aether >/dev/null
kubectl get deployment demo -o json > "$work/deploy.json"
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
pod = json.load(open(f"{work}/deploy.json"))["spec"]["template"]["spec"]
init = {c["name"]: c for c in pod["initContainers"]}
app = pod["containers"][0]
downward = {"metadata.name": "demo-0", "metadata.namespace": "default"}
labels = json.load(open(f"{work}/deploy.json"))["spec"]["template"]["metadata"]["labels"]
downward.update({f"metadata.labels['{k}']": v for k, v in labels.items()})
def env_file(container, path):
    with open(path, "w") as f:
        for e in container.get("env", []):
            value = e.get("value") or downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
            f.write(f"{e['name']}={value}\n")
env_file(init["aether-fetcher"], f"{work}/fetcher.env")
env_file(app, f"{work}/app.env")
open(f"{work}/install.args", "w").write("\n".join(init["aether-install"]["args"]) + "\n")
open(f"{work}/app.cmd", "w").write("\n".join(app["command"]) + "\n")
open(f"{work}/app.workdir", "w").write(app["workingDir"])
assert init["aether-fetcher"]["restartPolicy"] == "Always"
for c in list(init.values()) + [app]:
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and sc["capabilities"]["drop"] == ["ALL"]
# Least privilege inside the pod: no token but the fetcher's; the app only reads releases.
assert pod["automountServiceAccountToken"] is False
token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
mounts = lambda c: {m["mountPath"]: m for m in c.get("volumeMounts", [])}
assert token_dir in mounts(init["aether-fetcher"])
assert token_dir not in mounts(app) and token_dir not in mounts(init["aether-install"])
# The app writes only the run volume, where the supervisor marks the release it runs from.
assert all(m.get("readOnly") for p, m in mounts(app).items() if p != "/aether/run"), mounts(app)
assert "/aether/run" in mounts(init["aether-fetcher"])
PY
mapfile -t install_args < "$work/install.args"
mapfile -t app_cmd < "$work/app.cmd"
docker run --rm "${restricted[@]}" -v "$work/bin:/aether/bin" "aether-fetcher:$TAG" "${install_args[@]}" >/dev/null
# The pod's containers reach the API server through the kubeconfig (the emulator speaks
# plain HTTP, so there is no in-cluster service-account TLS to use).
# Debug logging of the engine only adds its decisions ("nothing to fetch"), which step 3
# waits for instead of waiting for time.
docker run -d --name "$run-fetcher" "${restricted[@]}" --env-file "$work/fetcher.env" \
  -e RUST_LOG=info,aether_fetcher::engine=debug -e KUBECONFIG=/kube/config -v "$work/kube:/kube:ro" -v "$work/ws:/workspace" \
  -v "$work/run:/aether/run" -p 127.0.0.1::9180 "aether-fetcher:$TAG" >/dev/null
fetcher=http://$(hostport "$run-fetcher" 9180)
until_ok 30 curl -sf "$fetcher/readyz" || fail "the fetcher never became ready"
docker run -d --name "$run-app" "${restricted[@]}" --env-file "$work/app.env" -e PORT=8080 \
  -v "$work/ws:/workspace:ro" -v "$work/bin:/aether/bin:ro" -v "$work/run:/aether/run" -w "$(cat "$work/app.workdir")" \
  -p 127.0.0.1::8080 --entrypoint "${app_cmd[0]}" "aether-example-app:$TAG" "${app_cmd[@]:1}" >/dev/null
app=http://$(hostport "$run-app" 8080)
until_ok 30 sh -c "curl -sf $app/ | grep -q 'version 1'" || fail "the app does not serve release 1"
echo "the app serves release 1 (started after /readyz)"

release() { # $1 = line to append; uploads and releases; prints the digest
  echo "<p>$1</p>" >> "$work/src/index.html"
  tar -C "$work/src" -czf "$work/r.tgz" .
  local d; d="sha256:$(sha256sum "$work/r.tgz" | cut -d' ' -f1)"
  curl -sf -X PUT -H "Authorization: Bearer $token" --data-binary @"$work/r.tgz" "$AETHER_API_URL/v1/artifacts/$d" >/dev/null
  curl -sf -X POST -H "Authorization: Bearer $token" -H 'content-type: application/json' \
    -d "{\"digest\":\"$d\"}" "$AETHER_API_URL/v1/apps/demo/release" >/dev/null
  echo "$d"
}

echo "==> 2. hot patch through the control plane"
t0=$(now_ms)
release "version 2" >/dev/null
until_ok 30 sh -c "curl -sf $app/ | grep -q 'version 2'" || fail "the app does not serve release 2"
ms=$(( $(now_ms) - t0 ))
echo "hot patch served by the restarted app in ${ms} ms (SLO ${SLO_MS} ms)"
[ "$ms" -le "$SLO_MS" ] || fail "over the SLO"

echo "==> 3. docker restart of the fetcher does not re-download"
downloads() { curl -sf "$AETHER_API_URL/metrics" | sed -n 's/^aether_downloads_total \([0-9]*\).*/\1/p'; }
before=$(downloads)
decisions() { docker logs "$run-fetcher" 2>&1 | grep -c "nothing to fetch" || true; }
decided=$(decisions)
docker restart -t 5 "$run-fetcher" >/dev/null
fetcher=http://$(hostport "$run-fetcher" 9180)   # a restart may publish another host port
until_ok 30 curl -sf "$fetcher/readyz" || fail "the fetcher did not come back"
# The restarted fetcher has looked at the desired release and decided there is nothing to
# fetch: any download would have started before that decision.
until_ok 30 sh -c "[ \$(docker logs $run-fetcher 2>&1 | grep -c 'nothing to fetch') -gt $decided ]" \
  || fail "the restarted fetcher never decided"
after=$(downloads)
[ "$before" = "$after" ] || fail "restart downloaded again ($before → $after)"
# `grep` reads all its input (`-q` would stop at the first match, and under pipefail the
# writer's SIGPIPE would then fail the pipeline though the line is there).
docker logs "$run-fetcher" 2>&1 | grep "REFRESH_STATE failures=0 last_digest=[0-9a-f]\{64\}" >/dev/null || fail "no REFRESH_STATE marker"
echo "no download after restart ($after downloads in all)"

echo "==> 4. a hostile artifact is refused"
mkdir -p "$work/evil"; ln -s /etc/passwd "$work/evil/passwd"
tar -C "$work/evil" -czf "$work/evil.tgz" .
evil="sha256:$(sha256sum "$work/evil.tgz" | cut -d' ' -f1)"
curl -sf -X PUT -H "Authorization: Bearer $token" --data-binary @"$work/evil.tgz" "$AETHER_API_URL/v1/artifacts/$evil" >/dev/null
curl -sf -X POST -H "Authorization: Bearer $token" -H 'content-type: application/json' \
  -d "{\"digest\":\"$evil\"}" "$AETHER_API_URL/v1/apps/demo/release" >/dev/null
until_ok 30 sh -c "curl -sf $fetcher/status | grep -q '\"reason\":\"extract\"'" || fail "the hostile artifact was not refused"
curl -sf "$app/" | grep "version 2" >/dev/null || fail "the app stopped serving release 2"
echo "refused (reason=extract); the app still serves release 2"

echo "==> 5. docker stop of the pod"
t0=$(now_ms)
docker stop -t 10 "$run-app" "$run-fetcher" >/dev/null
ms=$(( $(now_ms) - t0 ))
for c in app fetcher; do
  code=$(docker inspect "$run-$c" --format '{{.State.ExitCode}}')
  [ "$code" = 0 ] || fail "$c exited $code"
done
[ "$ms" -lt 10000 ] || fail "stopping took ${ms} ms (grace 10 s)"
echo "both containers exited 0 in ${ms} ms"
echo "==> e2e-containers OK"
