#!/usr/bin/env bash
# Runs the benchmark workloads of /work/shared/BENCH.md against a fresh chatd each and writes
# <results>/<workload>.json, a markdown table of all of them and (with gnuplot) an SVG plot.
#
#   bench/run.sh [--quick] [--build-dir DIR] [--results-dir DIR] [workload...]
#
#   workloads: floor latency direct idle sync connect storm fanout channel history client
#              (default: all; connect also runs over wss as connect-wss, and storm also as
#              storm-groups, members of groups catching up on the same messages)
#   --quick        every workload small (under a minute in all); used by the test suite
#   --build-dir    use the chatd and chat-bench already built there instead of building Release
#                  into build/bench
#   --results-dir  where the JSON files go (default bench/results)
#
# BENCH_GIT_COMMIT names the commit measured when the binaries were built from an export of it
# rather than from this checkout.
#
# Exits 1 if any workload did not complete or lost, duplicated or reordered a message.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
BUILD_DIR=""
RESULTS="$ROOT/bench/results"
WORKLOADS=()
ALL=(floor latency direct idle sync connect storm fanout channel history client)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --build-dir) BUILD_DIR=$2; shift ;;
    --results-dir) RESULTS=$2; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown flag $1" >&2; exit 2 ;;
    *) WORKLOADS+=("$1") ;;
  esac
  shift
done
[[ ${#WORKLOADS[@]} -eq 0 ]] && WORKLOADS=("${ALL[@]}")
for w in "${WORKLOADS[@]}"; do
  [[ " ${ALL[*]} " == *" $w "* ]] || { echo "run.sh: unknown workload $w (have: ${ALL[*]})" >&2; exit 2; }
done

if [[ -z "$BUILD_DIR" ]]; then
  BUILD_DIR="$ROOT/build/bench"
  echo "== building Release into $BUILD_DIR"
  cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCHAT_BUILD_TESTS=OFF >/dev/null
  cmake --build "$BUILD_DIR" -j "$(nproc)" --target chatd chat-bench >/dev/null
fi
BUILD_DIR=$(cd "$BUILD_DIR" && pwd)
CHATD="$BUILD_DIR/examples/chatd"
BENCH="$BUILD_DIR/bench/chat-bench"
for bin in "$CHATD" "$BENCH"; do
  [[ -x "$bin" ]] || { echo "run.sh: $bin is missing (build targets chatd and chat-bench)" >&2; exit 2; }
done
BUILD_TYPE=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$BUILD_DIR/CMakeCache.txt")
if grep -q '^CHAT_SANITIZE:BOOL=ON' "$BUILD_DIR/CMakeCache.txt"; then BUILD_TYPE="$BUILD_TYPE+ASan"; fi
# The allocator chatd runs on (jemalloc in builds without sanitizers; see examples/CMakeLists.txt).
ALLOCATOR="glibc malloc"
if grep -q '^CHAT_SANITIZE[A-Z_]*:BOOL=ON' "$BUILD_DIR/CMakeCache.txt"; then
  ALLOCATOR="the sanitizer's"
elif ldd "$CHATD" 2>/dev/null | grep -q 'libjemalloc'; then
  ALLOCATOR="jemalloc"
fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)

PIN_SERVER=()
PIN_GEN=()
if command -v taskset >/dev/null && [[ $(nproc) -ge 2 ]]; then
  PIN_SERVER=(taskset -c 0)
  PIN_GEN=(taskset -c 1)
  PINNING="chatd on CPU 0 (taskset -c 0), chat-bench on CPU 1 (taskset -c 1)"
else
  PINNING="not pinned (taskset missing or fewer than 2 CPUs)"
fi
echo "== pinning: $PINNING"
echo "== build: $BUILD_TYPE ($BUILD_DIR), results: $RESULTS"

TMP=$(mktemp -d)
CHATD_PID=""
ECHO_PID=""
cleanup() {
  [[ -n "$CHATD_PID" ]] && kill -TERM "$CHATD_PID" 2>/dev/null && wait "$CHATD_PID" 2>/dev/null
  [[ -n "$ECHO_PID" ]] && kill "$ECHO_PID" 2>/dev/null && wait "$ECHO_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TMP/secret"

# Starts chatd on a free port with a fresh database (or CHATD_DB when set), over wss with a
# self-signed certificate when CHATD_TLS=1; sets CHATD_PID and PORT.
CHATD_DB=""
CHATD_TLS=0
start_chatd() {
  local name=$1
  shift
  local db=${CHATD_DB:-$TMP/$name.db} tls=()
  if [[ $CHATD_TLS -eq 1 ]]; then
    if [[ ! -f "$TMP/cert.pem" ]]; then
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=127.0.0.1 -keyout "$TMP/key.pem" -out "$TMP/cert.pem" >/dev/null 2>&1
    fi
    tls=(--tls-cert "$TMP/cert.pem" --tls-key "$TMP/key.pem")
  fi
  : >"$TMP/$name.out"
  "${PIN_SERVER[@]}" "$CHATD" serve --listen 127.0.0.1 --port 0 --db "$db" \
    --secret-file "$TMP/secret" --log-level error \
    --messages-per-second 1000000 --messages-burst 1000000 "${tls[@]}" "$@" \
    >"$TMP/$name.out" 2>"$TMP/$name.err" &
  CHATD_PID=$!
  PORT=""
  for _ in $(seq 1 300); do
    PORT=$(sed -n 's|^chatd listening on wss*://127.0.0.1:\([0-9]*\)$|\1|p' "$TMP/$name.out" || true)
    [[ -n "$PORT" ]] && return 0
    kill -0 "$CHATD_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "run.sh: chatd did not start:" >&2
  cat "$TMP/$name.err" >&2
  return 1
}

stop_chatd() {
  kill -TERM "$CHATD_PID" 2>/dev/null || true
  wait "$CHATD_PID" 2>/dev/null || true
  CHATD_PID=""
}

COMMIT=${BENCH_GIT_COMMIT:-}
if [[ -z "$COMMIT" ]]; then
  COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    COMMIT="$COMMIT+dirty"
  fi
fi
FAILED=()

# Wraps chat-bench's JSON with the run's context and writes <results>/<file>.json.
record() {
  local file=$1 durability=$2 command=$3 rc=$4 raw=$5
  rm -f "$RESULTS/$file.json"
  if ! python3 "$ROOT/bench/table.py" --record "$raw" "$RESULTS/$file.json" \
      git_commit="$COMMIT" nproc="$(nproc)" kernel="$(uname -r)" build_type="$BUILD_TYPE" \
      pinning="$PINNING" durability="$durability" quick="$QUICK" server_allocator="$ALLOCATOR" \
      generator_command="$command" exit_code="$rc" \
      loadavg_after="$(cut -d' ' -f1-3 /proc/loadavg)"; then
    echo "run.sh: $file produced no JSON (exit $rc)" >&2
    FAILED+=("$file")
    return
  fi
  [[ $rc -eq 0 ]] || FAILED+=("$file")
}

# Runs one chat-bench workload against a fresh chatd: run_bench FILE DURABILITY -- ARGS...
run_bench() {
  local file=$1 durability=$2
  shift 3
  start_chatd "$file" --synchronous "$durability"
  local args=(--port "$PORT" --secret-file "$TMP/secret" --server-pid "$CHATD_PID"
              --label "$file" "$@")
  echo "== $file ($durability): chat-bench ${*}"
  local rc=0
  "${PIN_GEN[@]}" "$BENCH" "${args[@]}" >"$TMP/$file.raw" 2>"$TMP/$file.bench.err" || rc=$?
  stop_chatd
  [[ $rc -eq 0 ]] || { echo "   exit $rc"; tail -5 "$TMP/$file.bench.err" >&2 || true; }
  record "$file" "$durability" "chat-bench $*" "$rc" "$TMP/$file.raw"
}

# Like run_bench, but with PROCESSES generators at once, each with its share of the connections:
# libwebsockets' poll(2) loop costs time linear in the descriptors per process, so one process
# with 10,000 connections limits the handshake rate (docs/performance.md).
# run_connect_split FILE PROCESSES CONNECTIONS -- ARGS...
run_connect_split() {
  local file=$1 processes=$2 connections=$3
  shift 4
  start_chatd "$file" --synchronous full
  local share=$((connections / processes)) pids=() rc=0 raws=()
  echo "== $file (full): $processes x chat-bench --workload connect --connections $share ${*}"
  for i in $(seq 1 "$processes"); do
    "${PIN_GEN[@]}" "$BENCH" --workload connect --port "$PORT" --secret-file "$TMP/secret" \
      --server-pid "$CHATD_PID" --label "$file-$i" --connections "$share" "$@" \
      >"$TMP/$file.$i.raw" 2>"$TMP/$file.$i.err" &
    pids+=($!)
    raws+=("$TMP/$file.$i.raw")
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  stop_chatd
  python3 "$ROOT/bench/table.py" --merge-connect "$TMP/$file.raw" "${raws[@]}" || true
  record "$file" full "$processes x chat-bench --workload connect --connections $share $*" \
    "$rc" "$TMP/$file.raw"
}

# The history workload: a store of CONVERSATIONS x PER messages built once with the store API
# (cached under the build dir, keyed by the store's schema version and size), then newest-page
# reads three ways: MessageStore::History in-process, History requests to a chatd serving that
# store, and Client::History answered from a client's cache synced from that chatd.
# run_history CONVERSATIONS PER READS REQUESTS
run_history() {
  local conversations=$1 per=$2 reads=$3 requests=$4 rc=0 part
  local schema
  schema=$(sed -n 's/^constexpr int kSchemaVersion = \([0-9]*\);.*/\1/p' \
    "$ROOT/src/server/sqlite_store.cc")
  mkdir -p "$BUILD_DIR/bench-cache"
  # Each conversation gets its messages in bursts of 10 (an exchange), the bursts of all
  # conversations interleaved; the name changes with the layout so an older cached store is not
  # reused.
  local burst=10
  local base="$BUILD_DIR/bench-cache/history-schema${schema:-unknown}-${conversations}x${per}-burst${burst}"
  local db="$base.db" list="$base.conversations"
  local gen=(--workload history-gen --store "$db" --conversations-file "$list" --label hist
             --conversations "$conversations" --messages-per-conversation "$per" --burst "$burst"
             --batch 10000)
  if [[ ! -f "$list" ]]; then
    echo "== history: generating $((conversations * per)) messages into $db (once, then cached)"
    "${PIN_SERVER[@]}" "$BENCH" "${gen[@]}" >"$TMP/history-gen.raw" 2>"$TMP/history.err" || rc=$?
  else
    echo "== history: reusing $db"
    echo '{"workload":"history-gen","cached":true}' >"$TMP/history-gen.raw"
  fi
  # Two passes: right after dropping the file from the kernel's page cache, then after reading
  # the whole file once (the warm pass is the one compared with the target; the file then stays
  # in the page cache for chatd below, as a long-running server's hot file would).
  local store=(--workload history-store --store "$db" --conversations-file "$list" --label hist
               --messages-per-conversation "$per" --reads "$reads")
  echo "== history (in-process store): chat-bench ${store[*]}"
  "${PIN_SERVER[@]}" "$BENCH" "${store[@]}" >"$TMP/history-store.raw" 2>>"$TMP/history.err" || rc=$?
  CHATD_DB=$db
  start_chatd history --synchronous full
  CHATD_DB=""
  # One request at a time (what one user waits for), then 10 connections with one request in
  # flight each (queueing on the server's one core shows).
  local protocol=(--workload history --conversations-file "$list" --requests "$requests"
                  --connections 1 --label hist)
  echo "== history (protocol): chat-bench ${protocol[*]}"
  "${PIN_GEN[@]}" "$BENCH" --port "$PORT" --secret-file "$TMP/secret" --server-pid "$CHATD_PID" \
    "${protocol[@]}" >"$TMP/history-protocol.raw" 2>>"$TMP/history.err" || rc=$?
  local protocol10=(--workload history --conversations-file "$list" --requests "$requests"
                    --connections 10 --label hist)
  echo "== history (protocol): chat-bench ${protocol10[*]}"
  "${PIN_GEN[@]}" "$BENCH" --port "$PORT" --secret-file "$TMP/secret" --server-pid "$CHATD_PID" \
    "${protocol10[@]}" >"$TMP/history-protocol10.raw" 2>>"$TMP/history.err" || rc=$?
  local user
  user=$(head -1 "$list" | cut -d' ' -f1)
  local client=(--workload client --sends 0 --reads "$reads" --user "$user" --label hist)
  echo "== history (client cache): chat-bench ${client[*]}"
  "${PIN_GEN[@]}" "$BENCH" --url "ws://127.0.0.1:$PORT" --secret-file "$TMP/secret" \
    "${client[@]}" >"$TMP/history-client.raw" 2>>"$TMP/history.err" || rc=$?
  stop_chatd
  [[ $rc -eq 0 ]] || { echo "   exit $rc"; tail -5 "$TMP/history.err" >&2 || true; }
  for part in gen store protocol protocol10 client; do
    [[ -s "$TMP/history-$part.raw" ]] || echo '{}' >"$TMP/history-$part.raw"
  done
  python3 "$ROOT/bench/table.py" --merge-history "$TMP/history.raw" "$TMP/history-gen.raw" \
    "$TMP/history-store.raw" "$TMP/history-protocol.raw" "$TMP/history-protocol10.raw" \
    "$TMP/history-client.raw" || true
  record history full "chat-bench ${gen[*]}; chat-bench ${store[*]}; chat-bench ${protocol[*]}; chat-bench ${protocol10[*]}; chat-bench ${client[*]}" \
    "$rc" "$TMP/history.raw"
}

# The client workload: Client::Send() into the outbox with the client's loop not running (no
# network I/O), then the outbox drains into a chatd, then cached newest pages.
run_client() {
  local sends=$1 reads=$2 rc=0
  start_chatd client --synchronous full
  local args=(--workload client --sends "$sends" --reads "$reads" --label client)
  echo "== client (full): chat-bench ${args[*]}"
  "${PIN_GEN[@]}" "$BENCH" --url "ws://127.0.0.1:$PORT" --secret-file "$TMP/secret" "${args[@]}" \
    >"$TMP/client.raw" 2>"$TMP/client.err" || rc=$?
  stop_chatd
  [[ $rc -eq 0 ]] || { echo "   exit $rc"; tail -5 "$TMP/client.err" >&2 || true; }
  record client full "chat-bench ${args[*]}" "$rc" "$TMP/client.raw"
}

# connect over wss: chatd with a self-signed certificate.
run_connect_wss() {
  CHATD_TLS=1
  run_bench connect-wss full -- --workload connect --tls "$@"
  CHATD_TLS=0
}

run_floor() {
  local trips=$1 syncs=$2
  : >"$TMP/echo.out"
  "${PIN_SERVER[@]}" "$BENCH" --workload tcp-echo-server --port 0 --label floor >"$TMP/echo.out" &
  ECHO_PID=$!
  local port=""
  for _ in $(seq 1 100); do
    port=$(sed -n 's/^tcp-echo listening on \([0-9]*\)$/\1/p' "$TMP/echo.out" || true)
    [[ -n "$port" ]] && break
    sleep 0.1
  done
  echo "== floor: plain TCP ping-pong over loopback, $trips round trips; $syncs appends + fdatasync"
  local rc=0
  "${PIN_GEN[@]}" "$BENCH" --workload floor --port "$port" --label floor --round-trips "$trips" \
    --syncs "$syncs" --sync-dir "$TMP" >"$TMP/floor.raw" || rc=$?
  kill "$ECHO_PID" 2>/dev/null || true
  wait "$ECHO_PID" 2>/dev/null || true
  ECHO_PID=""
  record floor none "chat-bench --workload floor --round-trips $trips --syncs $syncs" "$rc" \
    "$TMP/floor.raw"
}

for w in "${WORKLOADS[@]}"; do
  if [[ $QUICK -eq 1 ]]; then
    case $w in
      floor) run_floor 2000 100 ;;
      latency) run_bench latency full -- --workload latency --pairs 5 --rate 200 --duration 2 --timeout 30 ;;
      direct)
        run_bench direct full -- --workload direct --pairs 20 --rates 200,400 --step-seconds 1 --timeout 30
        run_bench direct-normal normal -- --workload direct --pairs 20 --rates 200,400 --step-seconds 1 --timeout 30 ;;
      idle) run_bench idle full -- --workload idle --connections 100 --hold 1 --timeout 30 ;;
      sync) run_bench sync full -- --workload sync --conversations 10 --messages 500 --rate 2000 --timeout 30 ;;
      connect)
        run_bench connect full -- --workload connect --connections 100 --timeout 30
        run_connect_split connect-split 2 100 -- --max-connecting 32 --timeout 30
        run_connect_wss --connections 50 --timeout 30 ;;
      storm)
        run_bench storm full -- --workload storm --connections 100 --per-client 2 --timeout 30
        run_bench storm-groups full -- --workload storm-groups --groups 4 --members 10 --per-client 3 \
          --timeout 30 ;;
      fanout)
        run_bench fanout full -- --workload fanout --groups 2 --members 10 --rates 1,5 \
          --step-seconds 1 --p99-limit-ms 100 --timeout 30
        # 40 members: over chatd's default receipt_updates_max_members (32). 1000 ms is the
        # client SDK's delay for delivered-only receipts in groups over 32 members.
        run_bench fanout-receipts full -- --workload fanout --groups 2 --members 40 --rates 1,5 \
          --receipts-ms 1000 --step-seconds 1 --p99-limit-ms 100 --timeout 30 ;;
      channel)
        run_bench channel full -- --workload channel --viewers 20 --channel-members 2000 \
          --add-batch 500 --rates 5,20 --step-seconds 1 --p99-limit-ms 100 --timeout 30 ;;
      history) run_history 1000 100 200 200 ;;
      client) run_client 500 100 ;;
    esac
  else
    case $w in
      floor) run_floor 20000 1000 ;;
      latency) run_bench latency full -- --workload latency --pairs 50 --rate 5000 --duration 10 ;;
      direct)
        rates=1000,2500,5000,7500,10000,15000,20000,30000,40000,50000,60000
        run_bench direct full -- --workload direct --pairs 500 --rates $rates --step-seconds 5
        run_bench direct-normal normal -- --workload direct --pairs 500 --rates $rates --step-seconds 5 ;;
      # Held 15 s: chatd's allocator hands the handshakes' freed pages back within ~10 s.
      idle) run_bench idle full -- --workload idle --connections 10000 --hold 15 --max-connecting 512 ;;
      sync) run_bench sync full -- --workload sync --conversations 100 --messages 10000 --rate 20000 ;;
      connect)
        run_bench connect full -- --workload connect --connections 10000 --max-connecting 512
        run_connect_split connect-split 4 10000 -- --max-connecting 128
        run_connect_wss --connections 2000 --max-connecting 256 --timeout 300 ;;
      storm)
        run_bench storm full -- --workload storm --connections 10000 --per-client 1 --max-connecting 512
        run_bench storm-groups full -- --workload storm-groups --groups 20 --members 500 --per-client 20 \
          --max-connecting 512 ;;
      fanout)
        run_bench fanout full -- --workload fanout --groups 20 --members 500 --max-connecting 512 \
          --rates 1,2,5,10,20,50,100 --step-seconds 5 --p99-limit-ms 100 --timeout 300
        # The members report their deliveries with Receipts, as the client SDK does: 1000 ms is
        # its delay for delivered-only receipts in groups over 32 members.
        run_bench fanout-receipts full -- --workload fanout --groups 20 --members 500 \
          --max-connecting 512 --rates 1,2,5,10 --receipts-ms 1000 --step-seconds 5 \
          --p99-limit-ms 100 --timeout 300 ;;
      channel)
        run_bench channel full -- --workload channel --viewers 1000 --channel-members 100000 \
          --add-batch 5000 --rates 10,20,50,100,200,500,1000 --step-seconds 5 --p99-limit-ms 100 \
          --timeout 300 ;;
      history) run_history 100000 100 10000 10000 ;;
      client) run_client 20000 10000 ;;
    esac
  fi
done

python3 "$ROOT/bench/table.py" "$RESULTS"

# Plots (full runs only): direct latency against offered load, idle server memory against
# connections, fanout latency against deliveries per second.
plots=()
for w in direct idle fanout; do
  if [[ $QUICK -eq 0 && -f "$RESULTS/$w.json" ]]; then plots+=("$w"); fi
done
if [[ ${#plots[@]} -gt 0 ]] && ! command -v gnuplot >/dev/null; then
  echo "== gnuplot missing: trying apt-get install -y gnuplot-nox"
  apt-get install -y gnuplot-nox >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y gnuplot-nox >/dev/null 2>&1; } ||
    true
fi
if [[ ${#plots[@]} -gt 0 ]] && ! command -v gnuplot >/dev/null; then
  echo "== gnuplot unavailable: no plots written"
  plots=()
fi
for w in "${plots[@]}"; do
  case $w in
    direct)
      python3 "$ROOT/bench/table.py" --plot-data "$RESULTS" >"$TMP/direct.dat"
      gnuplot <<EOF
set terminal svg size 800,500
set output "$RESULTS/direct-latency.svg"
set title "direct: send -> deliver latency vs offered load (chatd on 1 core)"
set xlabel "offered load (msg/s)"
set ylabel "latency (ms)"
set logscale y
set key left top
plot "$TMP/direct.dat" index 0 using 1:2 with linespoints title "p50 FULL", \
     "" index 0 using 1:3 with linespoints title "p99 FULL", \
     "" index 0 using 1:4 with linespoints title "p99.9 FULL", \
     "" index 1 using 1:3 with linespoints title "p99 NORMAL"
EOF
      echo "== plot: $RESULTS/direct-latency.svg" ;;
    idle)
      python3 "$ROOT/bench/table.py" --plot-idle "$RESULTS" >"$TMP/idle.dat"
      gnuplot <<EOF
set terminal svg size 800,500
set output "$RESULTS/idle-memory.svg"
set title "idle: chatd RSS vs authenticated connections (sampled while connecting)"
set xlabel "connections"
set ylabel "server RSS (MiB)"
set key left top
plot "$TMP/idle.dat" using 1:2 with linespoints title "chatd RSS"
EOF
      echo "== plot: $RESULTS/idle-memory.svg" ;;
    fanout)
      python3 "$ROOT/bench/table.py" --plot-fanout "$RESULTS" >"$TMP/fanout.dat"
      gnuplot <<EOF
set terminal svg size 800,500
set output "$RESULTS/fanout-latency.svg"
set title "fanout: send -> deliver latency vs group deliveries per second (chatd on 1 core)"
set xlabel "deliveries/s"
set ylabel "latency (ms)"
set logscale y
set key left top
plot "$TMP/fanout.dat" using 1:2 with linespoints title "p50", \
     "" using 1:3 with linespoints title "p99"
EOF
      echo "== plot: $RESULTS/fanout-latency.svg" ;;
  esac
done

if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "== FAILED: ${FAILED[*]} (incomplete, or lost/duplicated/reordered messages)" >&2
  exit 1
fi
echo "== all workloads completed with 0 lost / 0 duplicated / 0 reordered"
