#!/usr/bin/env bash
# `make mirror-demo`: the registry mirror on loopback, offline, no Docker. Debian's
# `docker-registry` holds an image built here from Shoal's own binaries (one layer each, as a
# FROM scratch image would have them), a tracker and DEMO_AGENTS node agents (default 3) mirror
# it, and `skopeo` pulls the image through every agent at once, each with a registries.conf whose
# mirror is that agent. Then it checks the pulled copies against the pushed image and prints the
# agents' mirror metrics and how many bytes of each layer the registry sent (its access log).
# Every process stops when it ends, also on failure or Ctrl-C; files and logs stay in
# target/mirror-demo. DEMO_BIN: where the binaries are (default target/release).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${DEMO_BIN:-target/release}
AGENTS=${DEMO_AGENTS:-3}
WORK=target/mirror-demo
pids=()

for tool in docker-registry skopeo python3 sha256sum gzip tar; do
  command -v "$tool" >/dev/null || { echo "mirror-demo needs $tool (apt-get install docker-registry skopeo python3)" >&2; exit 1; }
done

# Sends SIGTERM to every process started here, waits up to 10 s, then kills the rest.
stop() {
  trap - INT TERM EXIT
  [ ${#pids[@]} -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  local deadline=$((SECONDS + 10)) pid
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  echo "stopped the registry, the tracker and the agents; logs are in $WORK"
}
trap 'stop; exit 130' INT TERM
trap stop EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The status code of GET $2 at 127.0.0.1:$1, with bash alone ("000" when nothing answers).
status_of() {
  local reply
  reply=$( { exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET %s HTTP/1.0\r\n\r\n' "$2" >&3 && head -c 12 <&3; } 2>/dev/null) || reply=""
  echo "${reply:9:3}"
}
# The body of GET $2 at 127.0.0.1:$1.
body_of() {
  exec 3<>"/dev/tcp/127.0.0.1/$1"
  printf 'GET %s HTTP/1.0\r\n\r\n' "$2" >&3
  sed '1,/^\r$/d' <&3
  exec 3<&-
}
# Waits up to 30 s for GET $2 at 127.0.0.1:$1 to answer 200.
wait_ok() {
  local deadline=$((SECONDS + 30))
  until [ "$(status_of "$1" "$2")" = 200 ]; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "nothing answered 127.0.0.1:$1$2 within 30 s; see $WORK/*.log" >&2; exit 1; }
    sleep 0.2
  done
}

rm -rf "$WORK" && mkdir -p "$WORK/image/blobs/sha256" "$WORK/layers"

# An OCI image layout of Shoal's binaries: one gzip'd tar layer per binary, a config, a manifest.
blob() { # file -> its digest; the file becomes a blob of the layout
  local sum; sum=$(sha256sum "$1" | cut -d' ' -f1)
  mv "$1" "$WORK/image/blobs/sha256/$sum"
  echo "$sum"
}
size_of() { stat -c %s "$WORK/image/blobs/sha256/$1"; }
layers="" diff_ids=""
for bin in shoal-peer shoal-tracker; do
  tar -C "$BIN" --owner=0 --group=0 --numeric-owner -cf "$WORK/layers/$bin.tar" "$bin"
  diff_ids+="${diff_ids:+,}\"sha256:$(sha256sum "$WORK/layers/$bin.tar" | cut -d' ' -f1)\""
  gzip -n -c "$WORK/layers/$bin.tar" > "$WORK/layers/$bin.tar.gz"
  d=$(blob "$WORK/layers/$bin.tar.gz")
  layers+="${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$d\",\"size\":$(size_of "$d")}"
done
printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/shoal-peer"]},"rootfs":{"type":"layers","diff_ids":[%s]}}' \
  "$diff_ids" > "$WORK/config.json"
config=$(blob "$WORK/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' \
  "$config" "$(size_of "$config")" "$layers" > "$WORK/manifest.json"
manifest=$(blob "$WORK/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"demo"}}]}' \
  "$manifest" "$(size_of "$manifest")" > "$WORK/image/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$WORK/image/oci-layout"

# The registry: its access log (one line per request, with the bytes sent) on stdout.
rport=$(free_port)
registry=127.0.0.1:$rport
cat > "$WORK/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $PWD/$WORK/registry
http:
  addr: $registry
EOF
docker-registry serve "$WORK/registry.yml" > "$WORK/registry-access.log" 2> "$WORK/registry.log" &
pids+=($!)
wait_ok "$rport" /v2/
skopeo --insecure-policy copy --quiet --dest-tls-verify=false "oci:$WORK/image:demo" \
  "docker://$registry/shoal/peer:demo"
echo "registry on $registry holds shoal/peer:demo, manifest sha256:${manifest:0:12}..."

tport=$(free_port)
SHOAL_LISTEN=127.0.0.1:$tport SHOAL_ANNOUNCE_INTERVAL=2s "$BIN/shoal-tracker" 2> "$WORK/tracker.log" &
pids+=($!)
api=() metrics=()
for i in $(seq 1 "$AGENTS"); do
  api+=($(free_port)); metrics+=($(free_port))
  mkdir -p "$WORK/agent$i"
  SHOAL_TRACKER=127.0.0.1:$tport SHOAL_LISTEN=127.0.0.1:0 SHOAL_NAME=agent$i \
    SHOAL_DATA_DIR=$WORK/agent$i SHOAL_API_ADDR=127.0.0.1:${api[-1]} \
    SHOAL_METRICS_ADDR=127.0.0.1:${metrics[-1]} SHOAL_REGISTRY_UPSTREAM=http://$registry \
    "$BIN/shoal-peer" run 2> "$WORK/agent$i.log" &
  pids+=($!)
done
for i in "${!api[@]}"; do
  wait_ok "${metrics[$i]}" /readyz
  # What a node would use: podman, skopeo and CRI-O read this (docker/registries.conf.example).
  printf '[[registry]]\nprefix = "%s"\nlocation = "%s"\ninsecure = true\n\n[[registry.mirror]]\nlocation = "127.0.0.1:%s"\ninsecure = true\n' \
    "$registry" "$registry" "${api[$i]}" > "$WORK/registries-agent$((i + 1)).conf"
done
echo "tracker on 127.0.0.1:$tport; $AGENTS agents mirror it; skopeo pulls through each at once..."

pulls=()
for i in $(seq 1 "$AGENTS"); do
  skopeo --insecure-policy --registries-conf "$WORK/registries-agent$i.conf" copy --quiet \
    --src-tls-verify=false "docker://$registry/shoal/peer:demo" "oci:$WORK/pulled$i:demo" \
    > "$WORK/skopeo$i.log" 2>&1 &
  pulls+=($!)
done
for i in "${!pulls[@]}"; do
  wait "${pulls[$i]}" || { echo "skopeo through agent$((i + 1)) failed:"; cat "$WORK/skopeo$((i + 1)).log"; exit 1; }
  grep -q "sha256:$manifest" "$WORK/pulled$((i + 1))/index.json" \
    || { echo "agent$((i + 1)): the pulled image is not shoal/peer:demo"; exit 1; }
done
echo "every pull has the pushed manifest; skopeo checked each blob against its digest"

echo
printf '%-7s %12s %14s %12s\n' AGENT "BLOBS SERVED" "FROM UPSTREAM" "FROM PEERS"
for i in "${!api[@]}"; do
  m=$(body_of "${metrics[$i]}" /metrics)
  served=$(awk '$1 == "shoal_peer_mirror_requests_total{kind=\"blob\",status=\"200\"}" { print $2 }' <<< "$m")
  up=$(awk '$1 == "shoal_peer_mirror_bytes_total{source=\"upstream\"}" { printf "%.1f MiB", $2 / 1048576 }' <<< "$m")
  peers=$(awk '$1 == "shoal_peer_mirror_bytes_total{source=\"peers\"}" { printf "%.1f MiB", $2 / 1048576 }' <<< "$m")
  printf '%-7s %12s %14s %12s\n' "agent$((i + 1))" "${served:-0}" "$up" "$peers"
done
echo
echo "what the registry sent of each blob (its access log):"
for d in $(ls "$WORK/image/blobs/sha256"); do
  [ "$d" = "$manifest" ] && continue
  awk -v path="/blobs/sha256:$d" -v size="$(size_of "$d")" -v d="${d:0:12}" '
    $6 == "\"GET" && index($7, path) { gets++; bytes += $10 }
    END { printf "  sha256:%s...  %9d bytes  %2d GETs  %5.2f copies\n", d, size, gets, bytes / size }' \
    "$WORK/registry-access.log"
done
