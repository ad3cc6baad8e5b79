#!/usr/bin/env bash
# Installs the Debian 12 packages the build and the tests need, and only those that are missing.
# Idempotent and quiet when everything is present. Needs root (or sudo) when something is missing.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libwebsockets-dev libwebsockets-evlib-ev libev-dev libssl-dev
  libprotobuf-dev protobuf-compiler
  libsqlite3-dev sqlite3
  libcurl4-openssl-dev ca-certificates  # the push webhook's HTTP(S) client and the CAs it trusts
  libjemalloc-dev
  doctest-dev libcli11-dev
  python3 curl procps openssl
  locales  # locale sources: a JWT test builds a decimal-comma locale in a temp dir
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
