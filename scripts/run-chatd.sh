#!/usr/bin/env bash
# Starts chatd for local development (called by `make run`).
#
#   scripts/run-chatd.sh <build-dir>
#
# Keeps its state in ./var/: the signing secret (generated on the first run), the SQLite
# database and nothing else. Prints a token for alice and one for bob and how to connect, then
# replaces itself with `chatd serve` on 127.0.0.1:8080 (Ctrl-C stops it gracefully).
set -euo pipefail

build_dir="${1:-build/release}"
chatd="${build_dir}/examples/chatd"
cli="${build_dir}/examples/chat-cli"
port="${CHATD_PORT:-8080}"

if [[ ! -x "${chatd}" ]]; then
  echo "run-chatd: ${chatd} not found; build it first (make build-run)" >&2
  exit 1
fi

mkdir -p var
chmod 700 var
if [[ ! -s var/secret ]]; then
  umask 077
  if command -v openssl >/dev/null 2>&1; then
    openssl rand -hex 32 > var/secret
  else
    od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > var/secret
    echo >> var/secret
  fi
  echo "run-chatd: generated a new signing secret in var/secret"
fi

alice="$("${chatd}" token --user alice --ttl 24h --secret-file var/secret)"
bob="$("${chatd}" token --user bob --ttl 24h --secret-file var/secret)"

cat <<INFO

Tokens (valid 24 h; mint more with: ${chatd} token --user NAME --secret-file var/secret):
  alice: ${alice}
  bob:   ${bob}

Connect from two terminals:
  ${cli} --url ws://127.0.0.1:${port} --token ${alice}
  ${cli} --url ws://127.0.0.1:${port} --token ${bob}

Health check: curl http://127.0.0.1:${port}/healthz
Database: var/chat.db. Stop with Ctrl-C.

INFO

exec "${chatd}" serve --listen 127.0.0.1 --port "${port}" --db var/chat.db \
  --secret-file var/secret
