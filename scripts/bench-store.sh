#!/usr/bin/env bash
# Object storage against the data directory, in one run: FETCHERS (100) real aether-fetcher
# processes (`--once`, one pod and workspace each, on the API emulator) pull one release of
# MB (50) megabytes at once,
#   - streamed by one `aether serve` from its local disk, and
#   - redirected by `aether serve` to presigned URLs of an S3 bucket (moto's server).
# Prints a markdown table: wall time until every fetcher has it live, aggregate throughput,
# the control plane's CPU seconds and peak RSS over the pull, and the S3 server's CPU.
# A benchmark, not a test: the figures go into the README.
set -euo pipefail
cd "$(dirname "$0")/.."
FETCHERS=${FETCHERS:-100} MB=${MB:-50}
scripts/install-test-deps.sh
cargo build --release --locked -q -p aether -p aether-testkit --bins
cargo build --release --locked -q -p aether-fetcher
json=$(AETHER_QUIET_CHILDREN=1 target/release/aether-bench store --aether target/release/aether \
  --fetcher target/release/aether-fetcher --fetchers "$FETCHERS" --mb "$MB")
python3 - "$json" <<'PY'
import json, os, platform, sys
rows = json.loads(sys.argv[1])
mem = round(int(open("/proc/meminfo").read().split()[1]) / 1048576)
r0 = rows[0]
print(f"\nMachine: {os.cpu_count()} cores, {mem} GiB, Linux {platform.release()}. "
      f"Command: `scripts/bench-store.sh` ({r0['fetchers']} fetchers, one {r0['release_mb']} MB release).\n")
print("| download path | all live after | aggregate throughput | control plane CPU | control plane peak RSS | S3 server CPU |")
print("|---|---|---|---|---|---|")
for r in rows:
    s3 = f"{r['object_store_cpu_s']} s" if "S3" in r["mode"] else "-"
    print(f"| {r['mode']} | {r['wall_s']} s | {r['throughput_mb_s']} MB/s | {r['control_plane_cpu_s']} s "
          f"| {r['control_plane_peak_rss_mib']} MiB | {s3} |")
PY
