#!/usr/bin/env bash
# Builds the static musl binaries on the host and the FROM scratch images from them (no
# registry is needed or used): aether-fetcher, aether (control plane), the example app,
# and the API emulator for the container tests. Prints the image sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-musl
TAG=${TAG:-dev}
command -v musl-gcc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools >/dev/null; }
rustup target list --installed | grep -x "$TARGET" >/dev/null || rustup target add "$TARGET"
# The fetcher alone: built beside aether it would share reqwest features only aether needs
# (object storage's HTTP/2), and grow past its image budget.
cargo build --release --locked --target "$TARGET" -p aether-fetcher
cargo build --release --locked --target "$TARGET" -p aether -p aether-example-server
cargo build --release --locked --target "$TARGET" -p aether-testkit --bin aether-kube-emulator
for image in fetcher:aether-fetcher control-plane:aether app:aether-example-app emulator:aether-kube-emulator; do
  file=${image%%:*} name=${image#*:}
  DOCKER_BUILDKIT=0 docker build -q -f "images/$file.Dockerfile" -t "$name:$TAG" . >/dev/null 2>&1 \
    || docker build -q -f "images/$file.Dockerfile" -t "$name:$TAG" . >/dev/null
done
echo "| image | size |"
echo "|---|---|"
for name in aether-fetcher aether aether-example-app aether-kube-emulator; do
  bytes=$(docker image inspect "$name:$TAG" --format '{{.Size}}')
  echo "| $name:$TAG | $(awk -v b="$bytes" 'BEGIN {printf "%.2f MB", b/1e6}') |"
done
