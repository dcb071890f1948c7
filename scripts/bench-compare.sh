#!/usr/bin/env bash
# aether-fetcher side by side with the legacy busybox loop it replaces
# (scripts/legacy/busybox-fetch-loop.sh under Debian's busybox), in one run, against the
# same API emulator code and the same artifact server. Prints a markdown table:
#   - patch-to-live latency p50 / p95 / max over PATCHES (30) patches of a 1 MB artifact;
#   - API requests per minute and CPU seconds while idle for IDLE_SEC (60) seconds;
#   - wall time and peak RSS to apply a ~BIG_MB (100) MB artifact (median of RUNS=3);
#   - FLEET (100) agents on one emulator: API requests per second at idle and time until
#     all are live after one patch of every pod.
# Needs busybox, /usr/bin/time and python3 (installed with apt when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PATCHES=${PATCHES:-30} IDLE_SEC=${IDLE_SEC:-60} BIG_MB=${BIG_MB:-100} RUNS=${RUNS:-3}
FLEET=${FLEET:-100} FLEET_IDLE_SEC=${FLEET_IDLE_SEC:-30}
TARGET=x86_64-unknown-linux-musl

missing=()
command -v busybox >/dev/null || missing+=(busybox)
[ -x /usr/bin/time ] || missing+=(time)
command -v python3 >/dev/null || missing+=(python3)
command -v musl-gcc >/dev/null || missing+=(musl-tools)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
rustup target list --installed 2>/dev/null | grep -x "$TARGET" >/dev/null || rustup target add "$TARGET"
cargo build --release --locked -q --target "$TARGET" -p aether-fetcher
cargo build --release --locked -q -p aether-testkit --bins

json=$(AETHER_QUIET_CHILDREN=1 target/release/aether-compare \
  --fetcher "target/$TARGET/release/aether-fetcher" --legacy scripts/legacy/busybox-fetch-loop.sh \
  --busybox "$(command -v busybox)" --patches "$PATCHES" --idle-sec "$IDLE_SEC" --big-mb "$BIG_MB" \
  --runs "$RUNS" --fleet "$FLEET" --fleet-idle-sec "$FLEET_IDLE_SEC")
echo "$json" > "${COMPARE_JSON:-/dev/null}"
python3 - "$json" <<'PY'
import json, os, platform, sys
r = json.loads(sys.argv[1])
def ratio(legacy, fetcher, better_low=True):
    if fetcher == 0:
        return "∞" if legacy else "-"
    x = legacy / fetcher if better_low else fetcher / legacy
    return f"{x:.1f}x"
L, I, B, F = r["latency"], r["idle"], r["big"], r["fleet"]
cores = os.cpu_count()
mem = round(int(open("/proc/meminfo").read().split()[1]) / 1048576)
print(f"\nMachine: {cores} cores, {mem} GiB, Linux {platform.release()}. Command: `scripts/bench-compare.sh`.\n")
print("| measure | aether-fetcher | legacy busybox loop | legacy ÷ fetcher |")
print("|---|---|---|---|")
for k in ("p50_ms", "p95_ms", "max_ms"):
    print(f"| patch-to-live {k[:-3]} ({L['patches']} patches, 1 MB) | {L['fetcher'][k]} ms | {L['legacy'][k]} ms | {ratio(L['legacy'][k], L['fetcher'][k])} |")
print(f"| API requests per minute, idle | {I['fetcher']['requests_per_min']} | {I['legacy']['requests_per_min']} | {ratio(I['legacy']['requests_per_min'], I['fetcher']['requests_per_min'])} |")
print(f"| CPU seconds, idle {I['seconds']} s | {I['fetcher']['cpu_seconds']} | {I['legacy']['cpu_seconds']} | {ratio(I['legacy']['cpu_seconds'], I['fetcher']['cpu_seconds'])} |")
print(f"| apply a {B['fetcher']['artifact_mb']} MB artifact, wall (median of {B['runs']}) | {B['fetcher']['wall_ms']:.0f} ms | {B['legacy']['wall_ms']:.0f} ms | {ratio(B['legacy']['wall_ms'], B['fetcher']['wall_ms'])} |")
print(f"| same, peak RSS (largest process) | {B['fetcher']['rss_kib'] // 1024} MiB | {B['legacy']['rss_kib'] // 1024} MiB | {ratio(B['legacy']['rss_kib'], B['fetcher']['rss_kib'])} |")
print(f"| {F['agents']} agents: API requests per second, idle | {F['fetcher']['idle_requests_per_sec']} | {F['legacy']['idle_requests_per_sec']} | {ratio(F['legacy']['idle_requests_per_sec'], F['fetcher']['idle_requests_per_sec'])} |")
print(f"| {F['agents']} agents: one patch until all live | {F['fetcher']['all_live_ms']:.0f} ms | {F['legacy']['all_live_ms']:.0f} ms | {ratio(F['legacy']['all_live_ms'], F['fetcher']['all_live_ms'])} |")
PY
