#!/usr/bin/env bash
# `make demo`: a tracker, a seeder with generated sample files and several daemon peers as local
# processes (no Docker), with a live status table read from each peer's /metrics. Ctrl-C (or q)
# stops everything cleanly: the peers first, so each can tell the tracker it leaves, then the
# tracker. DEMO_PEERS (default 5), DEMO_MB (size of the largest file, default 48),
# DEMO_UPLOAD_LIMIT (bytes/s per peer, default 16 MiB/s so convergence is visible),
# DEMO_EXIT_WHEN_DONE=1 (stop once every peer holds every file; for scripted runs), TLS=1 (every
# connection in mutual TLS, with a throwaway CA and certificates from `shoal-tracker gen-certs`),
# DEMO_BIN (where the binaries are, default target/release).
#
# On a terminal the table redraws in place, and Ctrl-C is read as a key rather than delivered
# as SIGINT (stty -isig): a signal would reach make and every process at once, so the tracker
# could stop before the peers had left, and make would report the interruption as an error.
# Elsewhere the table is printed as plain lines and SIGINT/SIGTERM stop the demo the same way.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${DEMO_BIN:-target/release}
TLS=${TLS:-0}
PEERS=${DEMO_PEERS:-5}
MB=${DEMO_MB:-48}
LIMIT=${DEMO_UPLOAD_LIMIT:-16777216}
WORK=target/demo
tracker_pid=""
peer_pids=()
tty_settings=""

# Sends SIGTERM to the given processes and waits up to 10 s for them to exit, then kills the rest.
terminate() {
  kill -TERM "$@" 2>/dev/null || true
  local deadline=$((SECONDS + 10)) pid
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

stop() {
  trap - INT TERM EXIT
  [ -n "$tty_settings" ] && stty "$tty_settings"
  if [ ${#peer_pids[@]} -gt 0 ]; then
    echo; echo "stopping ${#peer_pids[@]} peers (each tells the tracker it leaves)..."
    terminate "${peer_pids[@]}"
  fi
  if [ -n "$tracker_pid" ]; then
    echo "stopping the tracker..."
    terminate "$tracker_pid"
  fi
  local failed
  failed=$(cd "$WORK" && grep -l -E 'leave (failed|timed out)' -- *.log || true)
  if [ -n "$failed" ]; then
    echo "could not tell the tracker they leave (see these logs):" $failed
  fi
  echo "stopped; files and logs are in $WORK"
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

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

# With TLS=1: a CA and one certificate per process. The tracker's names the address peers dial;
# every peer's carries shoal-peer (what a peer checks when it dials another) and its own name.
if [ "$TLS" = 1 ]; then
  specs=(tracker=127.0.0.1 seeder=shoal-peer,seeder)
  for i in $(seq 1 "$PEERS"); do specs+=("peer$i=shoal-peer,peer$i"); done
  "$BIN/shoal-tracker" gen-certs "$WORK/certs" "${specs[@]}"
  echo "TLS on: CA and certificates in $WORK/certs"
fi
# The TLS settings of the holder of certificate $1, as env assignments (none without TLS=1).
tls_env() {
  [ "$TLS" = 1 ] || return 0
  echo "SHOAL_TLS_CERT=$WORK/certs/$1.pem SHOAL_TLS_KEY=$WORK/certs/$1.key SHOAL_TLS_CA=$WORK/certs/ca.pem"
}

tport=$(free_port)
# shellcheck disable=SC2046 # tls_env's words are separate assignments
env $(tls_env tracker) SHOAL_LISTEN=127.0.0.1:$tport SHOAL_METRICS_ADDR=127.0.0.1:$(free_port) \
  SHOAL_ANNOUNCE_INTERVAL=2s "$BIN/shoal-tracker" 2> "$WORK/tracker.log" &
tracker_pid=$!

start_peer() { # name data_dir want metrics_port
  # shellcheck disable=SC2046
  env $(tls_env "$1") SHOAL_TRACKER=127.0.0.1:$tport SHOAL_LISTEN=127.0.0.1:0 \
    SHOAL_METRICS_ADDR=127.0.0.1:$4 SHOAL_NAME=$1 SHOAL_DATA_DIR=$2 SHOAL_WANT=$3 \
    SHOAL_UPLOAD_LIMIT=$LIMIT "$BIN/shoal-peer" run 2> "$WORK/$1.log" &
  peer_pids+=($!)
}
names=(seeder); ports=($(free_port))
start_peer seeder "$WORK/seeder" "" "${ports[0]}"
for i in $(seq 1 "$PEERS"); do
  names+=("peer$i"); ports+=($(free_port))
  mkdir -p "$WORK/peer$i"
  start_peer "peer$i" "$WORK/peer$i" '*' "${ports[$i]}"
done

# Reads every peer's metrics into the status table: sets table and done_peers.
frame() {
  done_peers=0
  printf -v table '%-8s %6s %10s %10s' PEER FILES "DOWN MiB" "UP MiB"
  local i m shared down up row
  for i in "${!names[@]}"; do
    m=$(metrics "${ports[$i]}" 2>/dev/null) || m=""
    shared=$(value shoal_peer_files_shared <<< "$m"); shared=${shared:-0}
    down=$(value shoal_peer_downloaded_bytes_total <<< "$m")
    up=$(value shoal_peer_uploaded_bytes_total <<< "$m")
    printf -v row '%-8s %3s/%-2s %10s %10s' "${names[$i]}" "$shared" "$nfiles" "$(mib "$down")" "$(mib "$up")"
    table+=$'\n'$row
    if [ "$i" -gt 0 ] && [ "$shared" -ge "$nfiles" ]; then
      done_peers=$((done_peers + 1))
    fi
  done
}

# Every peer holds every file, byte for byte; exits on a wrong copy.
verify_copies() {
  local i f
  for i in $(seq 1 "$PEERS"); do
    for f in dataset.bin model.bin release.tar; do
      cmp -s "$WORK/seeder/$f" "$WORK/peer$i/$f" || { echo "peer$i has a wrong $f"; exit 1; }
    done
  done
}

# Waits about a second; true when the user asked to stop (Ctrl-C or q on the terminal).
stop_requested() {
  local key=""
  if [ -n "$tty_settings" ]; then
    # dd, not `read -n1`: bash's one-character mode turns signals back on. The terminal returns
    # at most one key, or nothing after a second (min 0 time 10, set below).
    key=$(dd bs=1 count=1 2>/dev/null) || true
    [ "$key" = $'\x03' ] || [ "$key" = q ]
  else
    sleep 1
    return 1
  fi
}

if [ -t 0 ]; then
  tty_settings=$(stty -g)
  stty -isig -icanon -echo min 0 time 10
fi
redraw=false
[ -t 1 ] && redraw=true
echo "tracker on 127.0.0.1:$tport; seeder and $PEERS peers (upload cap $(mib "$LIMIT") MiB/s each)"
echo "Ctrl-C or q stops them: the peers leave first, then the tracker stops."
start=$(date +%s)
converged=""
drawn=0
exit_when_done=${DEMO_EXIT_WHEN_DONE:-0}
while ! stop_requested; do
  elapsed=$(( $(date +%s) - start ))
  frame
  if [ -z "$converged" ] && [ "$done_peers" -eq "$PEERS" ]; then
    verify_copies
    converged=$elapsed
  fi
  text=$table$'\n'"$done_peers/$PEERS peers complete after ${converged:-$elapsed}s"
  # Lines stay shorter than a terminal's 80 columns: a wrapped line would throw the redraw off.
  if [ -n "$converged" ]; then
    text+=$'\n'"swarm converged in ${converged}s: every peer holds every file, byte-identical."
    [ "$exit_when_done" = 1 ] || text+=$'\n'"Still seeding; Ctrl-C or q stops."
  fi
  # On a terminal, go back over the previous table and clear below it: the table stays in place.
  $redraw && [ "$drawn" -gt 0 ] && printf '\033[%dA\033[J' "$drawn"
  printf '%s\n' "$text"
  drawn=$(( $(wc -l <<< "$text") ))
  if [ -n "$converged" ] && [ "$exit_when_done" = 1 ]; then
    break
  fi
done
exit 0
