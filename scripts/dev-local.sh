#!/usr/bin/env bash
# The main job on one machine, no cluster: hot-reload examples/hello (or DIR) into a
# running app through the production pipeline (pack → store → annotations file → fetch →
# verify → extract → swap → restart). Edit a file under DIR and watch it go live:
#   curl http://127.0.0.1:8080/
#
# usage: scripts/dev-local.sh [DIR] [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-examples/hello}
port=${2:-8080}
command -v python3 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null; }
# Not -q: on a fresh machine the first build takes minutes, and silence looks like a hang.
if [ ! -x target/debug/aether ] || [ ! -x target/debug/aether-fetcher ]; then
  echo "building aether and aether-fetcher: the first build compiles every dependency (about 5 to 7 minutes on 2 cores); later ones take seconds" >&2
fi
cargo build --locked -p aether -p aether-fetcher
echo "serving $dir on http://127.0.0.1:$port/ — edit a file there to hot-reload it (Ctrl-C to stop)"
exec target/debug/aether dev --hot --local "$dir" --ready-port "$port" -- python3 -m http.server "$port" --bind 127.0.0.1
