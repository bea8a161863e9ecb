#!/usr/bin/env bash
# Builds the static shoal binaries, then the shoal-tracker and shoal-peer images from
# docker/Dockerfile, without any registry: the images are FROM scratch and the build context is
# a directory holding just the two binaries and an empty data/ directory.
#
#   docker/build.sh            # tags :latest and :<crate version>
#
# Environment: CARGO (default cargo), DOCKER (default docker).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARGO=${CARGO:-cargo}
DOCKER=${DOCKER:-docker}
target=x86_64-unknown-linux-gnu
max_bytes=$((20 * 1024 * 1024))

version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
if [[ -z "$version" ]]; then
    echo "build.sh: cannot read the crate version from Cargo.toml" >&2
    exit 1
fi

# A scratch image has no libc, so the binaries must not need one.
echo "==> static binaries (release, $target)"
RUSTFLAGS="-C target-feature=+crt-static" \
    "$CARGO" build --release --locked --target "$target" --bin shoal-tracker --bin shoal-peer
bin_dir=target/$target/release
for bin in shoal-tracker shoal-peer; do
    if command -v readelf >/dev/null && readelf -l "$bin_dir/$bin" | grep -q 'program interpreter'; then
        echo "build.sh: $bin_dir/$bin is dynamically linked; it would not run in a scratch image" >&2
        exit 1
    fi
done

# The smallest possible context: only what the images hold.
context=target/docker-context
rm -rf "$context"
mkdir -p "$context/data"
cp "$bin_dir/shoal-tracker" "$bin_dir/shoal-peer" "$context/"

for role in tracker peer; do
    image=shoal-$role
    echo "==> $image:$version"
    "$DOCKER" build --quiet \
        --file docker/Dockerfile \
        --target "$role" \
        --build-arg "VERSION=$version" \
        --tag "$image:latest" \
        --tag "$image:$version" \
        "$context" >/dev/null
done
rm -rf "$context"

status=0
printf '%-28s %12s\n' IMAGE SIZE
for role in tracker peer; do
    image=shoal-$role:$version
    size=$("$DOCKER" image inspect --format '{{.Size}}' "$image")
    printf '%-28s %9.1f MiB\n' "$image" "$(echo "$size" | awk '{print $1 / 1048576}')"
    if ((size > max_bytes)); then
        echo "build.sh: $image is larger than 20 MiB" >&2
        status=1
    fi
done
exit $status
