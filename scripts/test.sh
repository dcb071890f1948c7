#!/usr/bin/env bash
# The test command (README): installs what the tests need on a fresh Debian machine
# (scripts/install-test-deps.sh: apt, PyPI and rustup, only what is missing), then runs
# every test of the workspace, the checks of deploy/, the static release binary's checks
# and the kube path end to end.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-musl
MAX_BINARY_BYTES=12000000

scripts/install-test-deps.sh

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
