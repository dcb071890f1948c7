#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, and nothing that is already there
# (so it is quick to call from every script that needs it):
#   - apt: kubectl (the real client the emulator is tested with), prometheus (the real
#     server and promtool for the metrics and alert rules), musl-tools (ring's C code for
#     the static musl build), python3 (the example app), curl (scripts);
#   - PyPI: kubernetes-validate (pinned; the official Kubernetes schemas, offline), PyYAML,
#     and moto[server] (pinned; a real S3 server on loopback for the object-storage tests);
#   - rustup: the x86_64-unknown-linux-musl target.
set -euo pipefail
TARGET=x86_64-unknown-linux-musl

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
# moto's S3 server: the real S3 implementation the object-storage tests run against.
MOTO_VERSION=5.2.1
if [ "$(python3 -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null)" != "$MOTO_VERSION" ] \
   || ! python3 -c 'import flask, flask_cors' 2>/dev/null; then
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  echo "installing moto[server]==$MOTO_VERSION..." >&2
  python3 -m pip install --quiet "moto[server]==$MOTO_VERSION" 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages "moto[server]==$MOTO_VERSION"
fi
# `grep` without -q reads all its input: under pipefail an early exit could fail the writer.
if ! rustup target list --installed | grep -x "$TARGET" >/dev/null; then
  rustup target add "$TARGET"
fi

