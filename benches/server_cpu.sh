#!/usr/bin/env bash
# Server CPU per request: durable RESERVE against PING, as the
# stampede-server process's own CPU time (user + system, from /proc) over
# the load phase of N requests each, the two kinds alternated, PAIRS pairs.
# Prints every run and the median of the per-pair ratios.
#
#   cargo build --release --workspace --bins
#   bash benches/server_cpu.sh [N] [PAIRS]
#
# SHAPE picks the load (default: 32 connections x 4 in flight, every request
# its own frame); e.g. SHAPE="--callers 1024 --connections 4" for the
# checkout-service shape, whose client coalesces. SERVER_ARGS adds server
# flags, SERVER_BIN another server binary (to compare two builds). Every reserve succeeds (stock = users) and is fdatasynced before
# its reply (the server's default durability).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-300000}
PAIRS=${2:-3}
SHAPE=${SHAPE:---connections 32 --depth 4}
SERVER_ARGS=${SERVER_ARGS:-}
bin=target/release
server=${SERVER_BIN:-$bin/stampede-server}
for b in stampede-server stampede-loadgen; do
  [ -x "$bin/$b" ] || { echo "build first: cargo build --release --workspace --bins" >&2; exit 1; }
done

# One run on a fresh server: prints the server's CPU us per request.
run() {
  local kind=$1 dir port pid
  dir=$(mktemp -d /tmp/stampede-cpu.XXXXXX)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # shellcheck disable=SC2086
  "$server" --insecure --listen "127.0.0.1:$port" --data-dir "$dir/data" $SERVER_ARGS >"$dir/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
  local ping=()
  [ "$kind" = ping ] && ping=(--ping)
  # shellcheck disable=SC2086
  STAMPEDE_TOKEN=insecure "$bin/stampede-loadgen" drill --target "stampede://127.0.0.1:$port" --server-pid "$pid" \
    --users "$N" --stock "$N" --reserve-only $SHAPE --quiet "${ping[@]}" --json "$dir/summary.json" >/dev/null
  kill "$pid"
  wait "$pid" || true
  python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); print("%.3f %.0f" % (s["server_cpu"]["us_per_request"], s["throughput_rps"]))' "$dir/summary.json"
  rm -rf "$dir"
}

ratios=()
for pair in $(seq 1 "$PAIRS"); do
  read -r ping_us ping_rps < <(run ping)
  read -r reserve_us reserve_rps < <(run reserve)
  ratio=$(python3 -c "print('%.2f' % ($reserve_us / $ping_us))")
  ratios+=("$ratio")
  echo "pair $pair: ping $ping_us us/request ($ping_rps req/s), reserve $reserve_us us/request ($reserve_rps req/s): ratio $ratio"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}')
echo "median reserve/ping server CPU ratio over $PAIRS pairs: $median (shape: $SHAPE)"
