#!/usr/bin/env bash
# `make demo`: a tracker, a seeder with generated sample files and several daemon peers as local
# processes (no Docker), with a live status table read from each peer's /metrics. Ctrl-C stops
# everything cleanly. DEMO_PEERS (default 5), DEMO_MB (size of the largest file, default 48),
# DEMO_UPLOAD_LIMIT (bytes/s per peer, default 16 MiB/s so convergence is visible),
# DEMO_EXIT_WHEN_DONE=1 (stop once every peer holds every file; for scripted runs).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=target/release
PEERS=${DEMO_PEERS:-5}
MB=${DEMO_MB:-48}
LIMIT=${DEMO_UPLOAD_LIMIT:-16777216}
WORK=target/demo
pids=()

stop() {
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    echo; echo "stopping ${#pids[@]} processes (each peer tells the tracker it leaves)..."
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  echo "stopped; files and logs are in $WORK"
}
trap stop INT TERM EXIT

# Ports: ask the kernel for free ones rather than assume any.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# GET /metrics with bash alone (no curl needed).
metrics() {
  local port=$1
  exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
  printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
  cat <&3
  exec 3<&-
}
value() { awk -v n="$1" '$1 == n { print $2; exit }'; }
mib() { awk -v b="${1:-0}" 'BEGIN { printf "%.1f", b / 1048576 }'; }

rm -rf "$WORK" && mkdir -p "$WORK/seeder"
echo "generating sample files in $WORK/seeder ..."
head -c $((MB * 1048576)) /dev/urandom > "$WORK/seeder/dataset.bin"
head -c $((MB * 1048576 / 2)) /dev/urandom > "$WORK/seeder/model.bin"
head -c $((MB * 1048576 / 4)) /dev/urandom > "$WORK/seeder/release.tar"
nfiles=3

tport=$(free_port)
SHOAL_LISTEN=127.0.0.1:$tport SHOAL_METRICS_ADDR=127.0.0.1:$(free_port) SHOAL_ANNOUNCE_INTERVAL=2s \
  "$BIN/shoal-tracker" 2> "$WORK/tracker.log" &
pids+=($!)

start_peer() { # name data_dir want metrics_port
  SHOAL_TRACKER=127.0.0.1:$tport SHOAL_LISTEN=127.0.0.1:0 SHOAL_METRICS_ADDR=127.0.0.1:$4 \
    SHOAL_NAME=$1 SHOAL_DATA_DIR=$2 SHOAL_WANT=$3 SHOAL_UPLOAD_LIMIT=$LIMIT \
    "$BIN/shoal-peer" run 2> "$WORK/$1.log" &
  pids+=($!)
}
names=(seeder); ports=($(free_port))
start_peer seeder "$WORK/seeder" "" "${ports[0]}"
for i in $(seq 1 "$PEERS"); do
  names+=("peer$i"); ports+=($(free_port))
  mkdir -p "$WORK/peer$i"
  start_peer "peer$i" "$WORK/peer$i" '*' "${ports[$i]}"
done

echo "tracker on 127.0.0.1:$tport; seeder and $PEERS peers (upload cap $(mib "$LIMIT") MiB/s each); Ctrl-C to stop"
start=$(date +%s)
while true; do
  sleep 1
  done_peers=0
  table=$(printf '%-8s %6s %10s %10s\n' PEER FILES "DOWN MiB" "UP MiB")
  for i in "${!names[@]}"; do
    m=$(metrics "${ports[$i]}" 2>/dev/null) || m=""
    shared=$(value shoal_peer_files_shared <<< "$m"); shared=${shared:-0}
    down=$(value shoal_peer_downloaded_bytes_total <<< "$m")
    up=$(value shoal_peer_uploaded_bytes_total <<< "$m")
    table+=$(printf '\n%-8s %3s/%-2s %10s %10s' "${names[$i]}" "$shared" "$nfiles" "$(mib "$down")" "$(mib "$up")")
    [ "$i" -gt 0 ] && [ "$shared" -ge "$nfiles" ] && done_peers=$((done_peers + 1))
  done
  elapsed=$(( $(date +%s) - start ))
  [ -t 1 ] && printf '\033[2J\033[H'
  printf '%s\n%d/%d peers complete after %ds\n\n' "$table" "$done_peers" "$PEERS" "$elapsed"
  if [ "$done_peers" -eq "$PEERS" ]; then
    for i in $(seq 1 "$PEERS"); do
      for f in dataset.bin model.bin release.tar; do
        cmp -s "$WORK/seeder/$f" "$WORK/peer$i/$f" || { echo "peer$i has a wrong $f"; exit 1; }
      done
    done
    echo "swarm converged in ${elapsed}s: every peer holds every file, byte-identical; still seeding."
    [ "${DEMO_EXIT_WHEN_DONE:-0}" = 1 ] && exit 0
    echo "Ctrl-C to stop."
    wait
  fi
done
