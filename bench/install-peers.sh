#!/usr/bin/env bash
# Installs the tunnels Portway is compared with, pinned, into bench/.tools (or $PEERS_ROOT).
# Only crates.io and Debian's packages are used.
set -euo pipefail
root=${PEERS_ROOT:-$(cd "$(dirname "$0")" && pwd)/.tools}
mkdir -p "$root"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=()
    for p in nginx wrk socat curl iproute2 openssl pkg-config libssl-dev; do
        dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
fi
install() { # crate version [cargo install args...]
    local crate=$1 version=$2; shift 2
    if [ -f "$root/.$crate-$version" ]; then return; fi
    cargo install --locked --root "$root" "$crate" --version "$version" "$@"
    touch "$root/.$crate-$version"
}
install bore-cli 0.6.0
install dumbpipe 0.40.0
# rathole 0.5.0's lockfile pins time 0.3.29, which no longer builds on current Rust
# (type inference break in time's format_description); 0.3.36 is the first that does.
if [ ! -f "$root/.rathole-0.5.0" ]; then
    src=$(mktemp -d)
    curl -sSfL https://static.crates.io/crates/rathole/rathole-0.5.0.crate | tar xz -C "$src"
    (cd "$src/rathole-0.5.0" && cargo update -q -p time --precise 0.3.36 &&
        cargo install --locked --root "$root" --path .)
    rm -rf "$src"
    touch "$root/.rathole-0.5.0"
fi
echo "peers in $root/bin: $(ls "$root/bin" | tr '\n' ' ')"
