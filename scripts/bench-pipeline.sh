#!/usr/bin/env bash
# Measures aether-fetcher's one-pass pipeline (download → SHA-256 + gunzip → tar → swap):
#   1. wall time for a ~100 MB artifact on loopback, side by side with the shell pipeline
#      `curl -s URL | tee >(sha256sum) | tar -xz` in the same run (median of RUNS);
#   2. peak RSS (/usr/bin/time -v) for 10 MB and 500 MB artifacts;
#   3. patch-to-live latency over 50 patches of a 1 MB artifact through the API emulator;
#   4. size of the static release binary.
# Prints a markdown table. Needs curl, GNU tar, gzip and /usr/bin/time (installed if missing).
#
# usage: scripts/bench-pipeline.sh            (RUNS=5 SIZE_MB=100 to change)
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
SIZE_MB=${SIZE_MB:-100}
TARGET=x86_64-unknown-linux-musl

missing=()
for tool in curl tar gzip; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v musl-gcc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools >/dev/null; }
rustup target list --installed 2>/dev/null | grep "$TARGET" >/dev/null || rustup target add "$TARGET"

echo "building release binaries..." >&2
cargo build --release --locked --target "$TARGET" -p aether-fetcher >&2
cargo build --release --locked -p aether-testkit --bins >&2
FETCHER=target/$TARGET/release/aether-fetcher
ARTSRV=target/release/aether-artifact-server
BENCH=target/release/aether-bench

work=$(mktemp -d /tmp/aether-bench.XXXXXX)
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/serve"

# An artifact of about $2 MB compressed: base64 text of random bytes in 4 MiB files
# (gzip shrinks it to ~76%, much like source trees with some binaries).
make_artifact() {
  local name=$1 mb=$2 src="$work/src-$1"
  mkdir -p "$src"
  local raw_mb=$(( mb * 100 / 76 )) i=0
  while [ $(( i * 4 )) -lt "$raw_mb" ]; do
    head -c $(( 3 * 1024 * 1024 )) /dev/urandom | base64 -w 76 > "$src/f$i.txt"
    i=$(( i + 1 ))
  done
  tar -C "$src" -czf "$work/serve/$name.tgz" .
  rm -rf "$src"
}

echo "generating artifacts (${SIZE_MB} MB, 10 MB, 500 MB)..." >&2
make_artifact big "$SIZE_MB"
make_artifact small 10
make_artifact huge 500

"$ARTSRV" --dir "$work/serve" > "$work/server.url" &
server_pid=$!
for _ in $(seq 100); do [ -s "$work/server.url" ] && break; sleep 0.1; done
base=$(head -1 "$work/server.url")

now_ms() { date +%s%3N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# Runs the fetcher in init-container mode on artifact $1; prints "wall_ms rss_kb".
fetch_once() {
  local name=$1 file="$work/serve/$1.tgz" ws="$work/ws-$1"
  rm -rf "$ws"; mkdir -p "$ws" "$work/podinfo"
  local digest; digest="sha256:$(sha256sum "$file" | cut -d' ' -f1)"
  printf 'aether.dev/digest="%s"\naether.dev/artifact-url="%s/%s.tgz"\n' "$digest" "$base" "$name" > "$work/podinfo/annotations"
  local t0 t1
  t0=$(now_ms)
  AETHER_FETCH_MODE=file AETHER_ANNOTATIONS_FILE="$work/podinfo/annotations" \
    AETHER_WORKSPACE="$ws" AETHER_ALLOW_HTTP=1 AETHER_HTTP_ADDR=127.0.0.1:0 RUST_LOG=warn \
    /usr/bin/time -v -o "$work/time.txt" "$FETCHER" --once
  t1=$(now_ms)
  [ "$(readlink "$ws/current")" = ".aether/releases/${digest#sha256:}" ] || { echo "fetcher did not go live" >&2; exit 1; }
  echo "$(( t1 - t0 )) $(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time.txt")"
}

shell_once() {
  local name=$1 dir="$work/shell-$1"
  rm -rf "$dir"; mkdir -p "$dir"
  local t0 t1
  t0=$(now_ms)
  bash -c "set -o pipefail; curl -sf '$base/$name.tgz' | tee >(sha256sum > '$work/shell.sum') | tar -xz -C '$dir'"
  t1=$(now_ms)
  echo $(( t1 - t0 ))
}

echo "throughput: $RUNS runs each..." >&2
: > "$work/fetcher.ms"; : > "$work/shell.ms"
for _ in $(seq "$RUNS"); do
  fetch_once big | cut -d' ' -f1 >> "$work/fetcher.ms"
  shell_once big >> "$work/shell.ms"
done
bytes=$(stat -c %s "$work/serve/big.tgz")
f_ms=$(median < "$work/fetcher.ms")
s_ms=$(median < "$work/shell.ms")
mbps() { awk -v b="$bytes" -v ms="$1" 'BEGIN {printf "%.0f", b / 1e6 / (ms / 1000)}'; }
ratio=$(awk -v f="$f_ms" -v s="$s_ms" 'BEGIN {printf "%.2f", s / f}')

echo "peak RSS..." >&2
rss_small=$(fetch_once small | cut -d' ' -f2)
rss_huge=$(fetch_once huge | cut -d' ' -f2)
small_mb=$(awk -v b="$(stat -c %s "$work/serve/small.tgz")" 'BEGIN {printf "%.0f", b/1e6}')
huge_mb=$(awk -v b="$(stat -c %s "$work/serve/huge.tgz")" 'BEGIN {printf "%.0f", b/1e6}')

echo "patch-to-live latency..." >&2
# Flush the ~1 GB the steps above wrote, so the latency runs do not pay for the
# benchmark's own writeback.
sync
lat=$(AETHER_QUIET_CHILDREN=1 "$BENCH" latency --fetcher "$FETCHER" --patches 50 --size 1048576)
field() { echo "$lat" | sed -E "s/.*\"$1\":([0-9.]+).*/\1/"; }

size=$(stat -c %s "$FETCHER")

cat <<TABLE

Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r). Command: \`scripts/bench-pipeline.sh\` (RUNS=$RUNS, medians).

| measure | aether-fetcher | shell pipeline | ratio / target |
|---|---|---|---|
| apply a $(awk -v b="$bytes" 'BEGIN {printf "%.0f", b/1e6}') MB artifact (wall) | ${f_ms} ms ($(mbps "$f_ms") MB/s) | ${s_ms} ms ($(mbps "$s_ms") MB/s) | ${ratio}x (target ≥ 1.5x) |
| peak RSS, ${small_mb} MB artifact | $(( rss_small / 1024 )) MiB | | target < 32 MiB |
| peak RSS, ${huge_mb} MB artifact | $(( rss_huge / 1024 )) MiB | | target < 32 MiB, flat |
| patch-to-live, 50 × 1 MB | p50 $(field p50_ms) ms, p95 $(field p95_ms) ms, p99 $(field p99_ms) ms, max $(field max_ms) ms | | p50 < 50 ms, p99 < 150 ms |
| static binary (x86_64 musl, stripped) | $(awk -v b="$size" 'BEGIN {printf "%.2f MB", b/1e6}') | | < 12 MB |
TABLE
