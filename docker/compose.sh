#!/usr/bin/env bash
# Runs the compose.yaml swarm as one compose project (default "shoal").
#
#   docker/compose.sh up [N [T]]  write sample seed files if absent, start T trackers (3),
#                              the seeders, N peers (6) and the consumer
#   docker/compose.sh status   one line per container from its /metrics (the consumer: its
#                              outcome), then "K/N peers complete"
#   docker/compose.sh down     remove the containers, network, volumes and the seed files
#
# The images are expected to exist (docker/build.sh). Environment: COMPOSE (the compose command,
# default docker-compose, or "docker compose" when only v2 is installed), COMPOSE_PROJECT_NAME
# (shoal; the prefix of every container, network and volume, so two users of one Docker host
# choose different ones; `make up PROJECT=name` sets it), TLS (1: every connection in mutual TLS
# with throwaway certificates, docker/compose.tls.yaml; `make up TLS=1` sets it), MIRROR (1: a
# registry the peers mirror, their API published on loopback, docker/compose.mirror.yaml;
# `make up MIRROR=1` sets it).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
project=${COMPOSE_PROJECT_NAME:-shoal}
seed_root=target/compose
if [[ -n "${COMPOSE:-}" ]]; then
    read -r -a compose <<<"$COMPOSE"
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose)
else
    compose=(docker compose)
fi
compose+=(--project-name "$project" --file compose.yaml)
certs=$seed_root/certs
if [[ "${TLS:-0}" == 1 ]]; then
    compose+=(--file docker/compose.tls.yaml)
fi
if [[ "${MIRROR:-0}" == 1 ]]; then
    compose+=(--file docker/compose.mirror.yaml)
fi

usage() {
    echo "usage: docker/compose.sh up [PEERS [TRACKERS]] | status | down" >&2
    exit 2
}

# name size: a file of random bytes, written once (sizes deliberately not chunk multiples).
seed_file() {
    local path=$1 size=$2
    [[ -f "$path" ]] && return 0
    head -c "$size" /dev/urandom >"$path.tmp"
    chmod 0644 "$path.tmp"
    mv "$path.tmp" "$path"
}

write_seed_files() {
    local mib=$((1024 * 1024))
    mkdir -p "$seed_root/seeder1" "$seed_root/seeder2"
    # The containers run as 65532, so the files must be world-readable.
    chmod 0755 "$seed_root" "$seed_root/seeder1" "$seed_root/seeder2"
    seed_file "$seed_root/seeder1/alpha.bin" $((24 * mib))
    seed_file "$seed_root/seeder1/bravo.bin" $((16 * mib + 4097))
    seed_file "$seed_root/seeder1/charlie.bin" $((10 * mib - 123))
    seed_file "$seed_root/seeder2/delta.bin" $((20 * mib + 1))
    seed_file "$seed_root/seeder2/echo.bin" $((8 * mib))
    du -sh "$seed_root/seeder1" "$seed_root/seeder2"
}

# A throwaway CA and certificates, made by the tracker image itself (no openssl needed), once.
write_certs() {
    [[ -f "$certs/ca.pem" ]] && return 0
    mkdir -p "$certs"
    docker run --rm --user "$(id -u):$(id -g)" --volume "$PWD/$certs:/certs" \
        "shoal-tracker:${STACK_IMAGE_TAG:-latest}" gen-certs /certs \
        tracker=tracker,shoal-tracker seeder1=shoal-peer,seeder1 seeder2=shoal-peer,seeder2 \
        peer=shoal-peer
    # The containers run as 65532: a demo's throwaway keys may be world-readable.
    chmod 0755 "$certs"
    chmod 0644 "$certs"/*
    echo "TLS on: certificates in $certs"
}

cmd_up() {
    local peers=${1:-6} trackers=${2:-3}
    [[ "$peers" =~ ^[0-9]+$ && "$trackers" =~ ^[1-9][0-9]*$ ]] || usage
    local images=(shoal-tracker shoal-peer)
    [[ "${MIRROR:-0}" == 1 ]] && images+=(shoal-registry-demo)
    for image in "${images[@]}"; do
        if ! docker image inspect "$image:${STACK_IMAGE_TAG:-latest}" >/dev/null 2>&1; then
            echo "compose.sh: image $image:${STACK_IMAGE_TAG:-latest} is missing; run make image" >&2
            exit 1
        fi
    done
    write_seed_files
    [[ "${TLS:-0}" == 1 ]] && write_certs
    # up waits for the tracker, then the seeders, to be healthy before it starts the peers.
    "${compose[@]}" up --detach --scale "tracker=$trackers" --scale "peer=$peers"
    echo "started $trackers trackers, $peers peers and a consumer reading ${STACK_CONSUMER_FILE:-alpha.bin} through a peer's API; follow them with: make status"
    if [[ "${MIRROR:-0}" == 1 ]]; then
        echo "registry at $("${compose[@]}" port registry 5000); peer-1 mirrors it at $("${compose[@]}" port --index=1 peer 7480) (docs/MIRROR.md)"
    fi
}

# Prints the value of one metric (no labels) from Prometheus text on stdin; empty if absent.
metric() {
    awk -v name="$1" '$1 == name { print $2; exit }'
}

mib() {
    awk -v b="${1:-0}" 'BEGIN { if (b == "") b = 0; printf "%.1f", b / 1048576 }'
}

# Prints HOST:PORT where the container's metrics port is published, or nothing.
published() {
    docker port "$1" "$2/tcp" 2>/dev/null | grep -m1 -E '^(127\.0\.0\.1|0\.0\.0\.0):' | sed 's/^0\.0\.0\.0:/127.0.0.1:/' || true
}

# Prints "yes" or "no" for the /readyz of HOST:PORT.
ready_at() {
    [[ "$(curl -s -o /dev/null --max-time 2 -w '%{http_code}' "http://$1/readyz" || true)" == 200 ]] &&
        echo yes || echo no
}

# What the consumer did: still reading, read the whole file, or failed (with its last words).
consumer_outcome() {
    local name=$1 state=$2 code restarts
    code=$(docker inspect --format '{{.State.ExitCode}}' "$name" 2>/dev/null || echo "?")
    restarts=$(docker inspect --format '{{.RestartCount}}' "$name" 2>/dev/null || echo 0)
    case "$state/$code" in
    running/* | restarting/*) echo "reading ${STACK_CONSUMER_FILE:-alpha.bin} through a peer's API (retries: $restarts)" ;;
    exited/0) echo "read $(docker logs "$name" 2>/dev/null | tail -n 1) in full through a peer's API" ;;
    *) echo "failed (exit $code): $(docker logs "$name" 2>&1 | tail -n 1)" ;;
    esac
}

cmd_status() {
    # Trackers first, then seeders (the files they share define "complete"), then peers by number.
    local rows
    rows=$(docker ps --all --filter "label=com.docker.compose.project=$project" \
        --format '{{.Label "com.docker.compose.service"}} {{.Names}} {{.State}}' |
        awk '$1 != "prometheus" && $1 != "registry" { print ($1 == "tracker" ? 0 : $1 == "peer" ? 2 : $1 == "consumer" ? 3 : 1), $0 }' |
        sort -k1,1n -k3,3V | cut -d' ' -f2-)
    if [[ -z "$rows" ]]; then
        echo "no containers in project $project; start them with: make up"
        return 0
    fi
    local files=0 service name state addr text ready shared wanted down up
    local peers=0 complete=0
    local format='%-22s %-8s %6s %6s %9s %9s %-5s %s\n'
    # shellcheck disable=SC2059
    printf "$format" CONTAINER STATE FILES WANTED DOWN_MiB UP_MiB READY ""
    while read -r service name state; do
        [[ "$service" == peer ]] && peers=$((peers + 1))
        if [[ "$service" == consumer ]]; then
            # shellcheck disable=SC2059
            printf "$format" "$name" "$state" - - - - - "$(consumer_outcome "$name" "$state")"
            continue
        fi
        addr="" text="" ready=-
        if [[ "$state" == running ]]; then
            addr=$(published "$name" "$([[ "$service" == tracker ]] && echo 9400 || echo 9401)")
        fi
        if [[ -n "$addr" ]]; then
            text=$(curl -fsS --max-time 2 "http://$addr/metrics" 2>/dev/null || true)
            [[ -n "$text" ]] && ready=$(ready_at "$addr")
        fi
        if [[ "$service" == tracker ]]; then
            # shellcheck disable=SC2059
            printf "$format" "$name" "$state" "$(metric shoal_tracker_files_owned <<<"$text")" - - - "$ready" \
                "$(metric shoal_tracker_peers <<<"$text") peers registered"
            continue
        fi
        if [[ -z "$text" ]]; then
            # shellcheck disable=SC2059
            printf "$format" "$name" "$state" - - - - "$ready" ""
            continue
        fi
        shared=$(metric shoal_peer_files_shared <<<"$text")
        wanted=$(metric shoal_peer_files_wanted <<<"$text")
        # The seeders share disjoint files: together, what a peer must end with.
        if [[ "$service" == seeder* ]]; then
            files=$((files + ${shared%.*}))
        fi
        down=$(metric shoal_peer_downloaded_bytes_total <<<"$text")
        up=$(metric shoal_peer_uploaded_bytes_total <<<"$text")
        # shellcheck disable=SC2059
        printf "$format" "$name" "$state" "$shared" "$wanted" "$(mib "$down")" "$(mib "$up")" "$ready" ""
        if [[ "$service" == peer && "$files" -gt 0 && "${shared%.*}" -ge "$files" && "$wanted" == 0 ]]; then
            complete=$((complete + 1))
        fi
    done <<<"$rows"
    echo "$complete/$peers peers complete"
}

cmd_down() {
    # The mirror's registry goes too, with its volume, whether MIRROR=1 is given again or not.
    local mirror=(--file docker/compose.mirror.yaml)
    [[ "${MIRROR:-0}" == 1 ]] && mirror=()
    "${compose[@]}" "${mirror[@]}" --profile monitoring down --volumes --remove-orphans --timeout 10
    rm -rf "$seed_root"
}

case "${1:-}" in
up) shift; cmd_up "$@" ;;
status) cmd_status ;;
down) cmd_down ;;
*) usage ;;
esac
