#!/usr/bin/env bash
# The test command (README): installs what the tests need on a fresh Debian machine, then
# runs every test of the workspace and checks the static release binary.
#   - apt: kubectl (the real client the emulator is tested with), prometheus (the real
#     server and promtool for the metrics and alert rules), musl-tools (ring's C code for
#     the static musl build), python3 (the example app), curl (scripts);
#   - PyPI: kubernetes-validate (pinned; the official Kubernetes schemas, offline);
#   - rustup: the x86_64-unknown-linux-musl target.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-musl
MAX_BINARY_BYTES=12000000

apt_install() {
  local sudo=
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
[ -x /usr/bin/kubectl ] || missing+=(kubectl)
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v python3 >/dev/null || missing+=(python3)
command -v curl >/dev/null || missing+=(curl)
command -v musl-gcc >/dev/null || missing+=(musl-tools)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}..." >&2
  apt_install "${missing[@]}"
fi
# The pinned version exactly: an older one would not know the schemas we validate against.
KUBERNETES_VALIDATE_VERSION=1.37.0
if [ "$(python3 -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null)" \
     != "$KUBERNETES_VALIDATE_VERSION" ]; then
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  echo "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION (and PyYAML)..." >&2
  # Debian's own python3 refuses pip installs outside a venv (PEP 668) unless told.
  python3 -m pip install --quiet "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" PyYAML 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" PyYAML
fi
# `grep` without -q reads all its input: under pipefail an early exit could fail the writer.
if ! rustup target list --installed | grep -x "$TARGET" >/dev/null; then
  rustup target add "$TARGET"
fi

cargo test --workspace --locked

# What we ship for a cluster: deploy/ is current, every manifest is valid Kubernetes
# (strict, 1.31 and newest), and the alert rules pass promtool and their unit tests.
scripts/check-deploy.sh

# The shipped artifact: a static, stripped binary under the size budget.
cargo build --release --locked --target "$TARGET" -p aether-fetcher
bin=target/$TARGET/release/aether-fetcher
size=$(stat -c %s "$bin")
if readelf -l "$bin" | grep "INTERP" >/dev/null; then
  echo "FAIL: $bin asks for a dynamic loader (not static)" >&2
  exit 1
fi
if [ "$size" -gt "$MAX_BINARY_BYTES" ]; then
  echo "FAIL: $bin is $size bytes, budget $MAX_BINARY_BYTES" >&2
  exit 1
fi
"$bin" --version
echo "static binary OK: $size bytes"

# The kube path end to end with real processes: emulator, aether serve, two fetcher+app
# "pods", and the contract scripts.
scripts/e2e-local.sh
