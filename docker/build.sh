#!/usr/bin/env bash
# Builds the static shoal binaries, then the shoal-tracker and shoal-peer images from
# docker/Dockerfile, without any registry: the images are FROM scratch and the build context is
# a directory holding just the binaries and an empty data/ directory. It also builds
# shoal-origin, the test HTTP origin (examples/origin.rs) that `make e2e` pulls files through,
# and shoal-registry-demo, Debian's docker-registry (/usr/bin/docker-registry, package
# docker-registry) with the libraries `ldd` lists, the registry the mirror overlay and `make e2e`
# mirror. Without that package it skips that image and says so (CI=true: an error).
#
#   docker/build.sh            # tags :latest and :<crate version>
#
# The images carry OCI labels: version (Cargo.toml), revision (the git commit, as in
# shoal_build_info), created (now, or SOURCE_DATE_EPOCH for a reproducible build) and source.
#
# Environment: CARGO (default cargo), DOCKER (default docker), BUILD_REVISION (the revision where
# there is no .git, else "unknown"), IMAGE_SOURCE (default: Cargo.toml's repository, else the
# git remote origin, else "unknown").
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

# The same revision the binaries report: build.rs prefers git too, then BUILD_REVISION.
revision=$(git rev-parse --short HEAD 2>/dev/null || echo "${BUILD_REVISION:-unknown}")
export BUILD_REVISION=$revision
created=$(date -u ${SOURCE_DATE_EPOCH:+--date "@$SOURCE_DATE_EPOCH"} +%Y-%m-%dT%H:%M:%SZ)
image_source=${IMAGE_SOURCE:-$(sed -n 's/^repository *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)}
image_source=${image_source:-$(git remote get-url origin 2>/dev/null || echo unknown)}

# A scratch image has no libc, so the binaries must not need one.
echo "==> static binaries (release, $target)"
RUSTFLAGS="-C target-feature=+crt-static" \
    "$CARGO" build --release --locked --target "$target" --bin shoal-tracker --bin shoal-peer \
    --example origin
bin_dir=target/$target/release
for bin in shoal-tracker shoal-peer examples/origin; do
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
cp "$bin_dir/examples/origin" "$context/shoal-origin"

# The registry: its binary, the shared libraries and loader it names (copied as files, at the
# paths it looks for them) and its configuration, laid out as the image's root.
roles=(tracker peer origin)
registry_bin=/usr/bin/docker-registry
if [[ -x "$registry_bin" ]]; then
    mkdir -p "$context/registry/etc/docker/registry"
    cp --parents "$registry_bin" "$context/registry/"
    for lib in $(ldd "$registry_bin" | grep -o '/[^ ]*'); do
        cp --dereference --parents "$lib" "$context/registry/"
    done
    cp docker/registry.yml "$context/registry/etc/docker/registry/config.yml"
    roles+=(registry-demo)
elif [[ "${CI:-}" == true ]]; then
    echo "build.sh: $registry_bin is missing (apt-get install docker-registry)" >&2
    exit 1
else
    echo "==> skipping shoal-registry-demo: $registry_bin is missing (apt-get install docker-registry)"
fi

for role in "${roles[@]}"; do
    image=shoal-$role
    echo "==> $image:$version"
    "$DOCKER" build --quiet \
        --file docker/Dockerfile \
        --target "$role" \
        --build-arg "VERSION=$version" \
        --build-arg "REVISION=$revision" \
        --build-arg "CREATED=$created" \
        --build-arg "SOURCE=$image_source" \
        --tag "$image:latest" \
        --tag "$image:$version" \
        "$context" >/dev/null
done
rm -rf "$context"

status=0
printf '%-28s %12s\n' IMAGE SIZE
for role in "${roles[@]}"; do
    image=shoal-$role:$version
    size=$("$DOCKER" image inspect --format '{{.Size}}' "$image")
    printf '%-28s %9.1f MiB\n' "$image" "$(echo "$size" | awk '{print $1 / 1048576}')"
    # The limit is Shoal's own: the registry is Debian's binary as it is.
    if [[ "$role" != registry-demo ]] && ((size > max_bytes)); then
        echo "build.sh: $image is larger than 20 MiB" >&2
        status=1
    fi
done
exit $status
