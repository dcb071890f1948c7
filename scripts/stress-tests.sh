#!/usr/bin/env bash
# Runs the whole `cargo test --workspace` N times (default 5), alternating an idle machine
# with a CPU burner on one core, and prints `P passed, F failed` with the names of the
# tests that failed. A test that passes alone and fails beside load is a broken test: this
# is how to find it before CI does. Logs of every run are kept in target/stress/.
#   scripts/stress-tests.sh [N]
set -uo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}
if ! [[ "$runs" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [N]   (N: how many full runs, default 5)" >&2
  exit 2
fi
logs=target/stress
mkdir -p "$logs"

# Build once up front, so every run measures the tests, not the compiler.
if ! cargo test --workspace --locked --no-run >"$logs/build.log" 2>&1; then
  tail -n 40 "$logs/build.log" >&2
  echo "build failed (full log: $logs/build.log)" >&2
  exit 2
fi

burner=
stop_burner() {
  if [ -n "$burner" ]; then
    kill "$burner" 2>/dev/null
    wait "$burner" 2>/dev/null
    burner=
  fi
}
trap stop_burner EXIT

passed=0
failed=0
failures=()
for i in $(seq 1 "$runs"); do
  load=idle
  if [ $((i % 2)) -eq 0 ]; then
    load="one core burnt"
    # One busy process: it takes one of the two cores for the whole run.
    (while :; do :; done) &
    burner=$!
  fi
  log="$logs/run-$i.log"
  start=$(date +%s)
  if AETHER_QUIET_CHILDREN=1 cargo test --workspace --locked >"$log" 2>&1; then
    passed=$((passed + 1))
    verdict=passed
  else
    failed=$((failed + 1))
    verdict=FAILED
    # `test name ... FAILED` per failed test; a binary that died without that line is
    # named by cargo's `--test` hint.
    while IFS= read -r name; do
      failures+=("run $i ($load): $name")
    done < <(sed -n -E 's/^test (.*) \.\.\. FAILED$/\1/p; s/^error: test failed, to rerun pass `(.*)`$/binary \1/p' "$log")
  fi
  stop_burner
  echo "run $i/$runs ($load): $verdict in $(( $(date +%s) - start )) s, log $log" >&2
done

if [ ${#failures[@]} -gt 0 ]; then
  echo "failed tests:" >&2
  printf '  %s\n' "${failures[@]}" >&2
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
