#!/usr/bin/env bash
# Incremental (manifest) releases side by side with tar.gz releases of the same trees: one
# 10 KB file of a generated app rewritten again and again, save → the app serving the new
# bytes, through the local loop and through aether serve + the emulator + two fetcher
# "pods"; bytes each pod downloads per save and the fetchers' time per stage (manifest: the
# statement fetched and checked; apply: objects, assembly and swap). A benchmark, not a
# test: the figures go into the README (Performance).
#
# usage: scripts/bench-incremental.sh
#   The local loop runs the host build of the fetcher, the "pods" the static musl build.
#   SAVES (30) saves per manifest run, TAR_SAVES (10) per tar.gz run (a 200 MB tar.gz save
#   takes seconds), TREES (20000000:1000,200000000:5000,200000000:40000) as SIZE:FILES,
#   FORMATS (manifest,tar): one of them alone to measure only it; PODS (2) fetcher "pods"
#   (1: a pod's figures without another pod competing for the machine's cores).
# Prints one JSON line per (tree, format, set-up), then a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
SAVES=${SAVES:-30}
TAR_SAVES=${TAR_SAVES:-10}
TREES=${TREES:-20000000:1000,200000000:5000,200000000:40000}
FORMATS=${FORMATS:-manifest,tar}
PODS=${PODS:-2}

echo "building release binaries..." >&2
cargo build --release --locked -q -p aether -p aether-fetcher -p aether-example-server -p aether-testkit --bins >&2
# The pods run the image's static musl fetcher (its allocator and memory are a pod's).
command -v musl-gcc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools >/dev/null; }
rustup target list --installed | grep -x x86_64-unknown-linux-musl >/dev/null || rustup target add x86_64-unknown-linux-musl >&2
cargo build --release --locked -q --target x86_64-unknown-linux-musl -p aether-fetcher >&2
out=$(mktemp)
trap 'rm -f "$out"' EXIT
AETHER_QUIET_CHILDREN=1 target/release/aether-bench-incremental \
  --aether target/release/aether --fetcher target/release/aether-fetcher \
  --pod-fetcher target/x86_64-unknown-linux-musl/release/aether-fetcher \
  --app target/release/aether-example-server \
  --trees "$TREES" --saves "$SAVES" --tar-saves "$TAR_SAVES" --formats "$FORMATS" --pods "$PODS" | tee "$out"

python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def tree(r):
    return f"{r['tree_bytes'] / 1e6:.0f} MB / {r['files']:,} files"
print()
print("| tree | set-up | format | saves | save → served p50 | p99 | downloaded per pod per save (p50) | fetcher refresh p50 | manifest stage p50 | fetcher apply p50 | fetcher peak RSS |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
def ms(v):
    return "" if v is None else (f"{v:.0f} ms" if v >= 10 else f"{v:.1f} ms")
for r in rows:
    dl = r.get("downloaded_bytes_per_pod_per_save_p50")
    dl = "" if dl is None else (f"{dl / 1e3:.1f} kB" if dl < 1e6 else f"{dl / 1e6:.1f} MB")
    stages = r.get("fetcher_stage_ms_p50") or {}
    manifest = stages.get("manifest") if r["format"] == "manifest" else None
    rss = r.get("fetcher_peak_rss_mib")
    rss = "" if rss is None else f"{rss:.0f} MiB"
    print(f"| {tree(r)} | {r['setup']} | {r['format']} | {r['saves']} | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {dl} "
          f"| {ms(r.get('fetcher_refresh_ms_p50'))} | {ms(manifest)} | {ms(r.get('fetcher_apply_ms_p50'))} | {rss} |")
PY
