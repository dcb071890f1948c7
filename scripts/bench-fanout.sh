#!/usr/bin/env bash
# Patch fan-out of the control plane: 200 emulated pods of one dev-hot app; time from a
# release (API call) and from a Deployment annotation (reconcile loop) until every pod
# carries the new digest. A benchmark, not a test: figures go into the README.
#
# usage: scripts/bench-fanout.sh [PODS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
pods=${1:-200}
rounds=${2:-5}
cargo build --release --locked -q -p aether -p aether-testkit --bins
AETHER_QUIET_CHILDREN=1 target/release/aether-bench fanout --aether target/release/aether --pods "$pods" --rounds "$rounds"
