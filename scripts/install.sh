#!/usr/bin/env bash
# Installs lamcr for users and C applications:
#   PREFIX/bin/lamcr
#   PREFIX/lib/liblamcr.so, PREFIX/lib/liblamcr.a
#   PREFIX/include/lamcr/libcr.h        (BLCR-compatible names; #include <libcr.h>)
#   PREFIX/lib/pkgconfig/lamcr.pc       (cc app.c $(pkg-config --cflags --libs lamcr))
# Usage: scripts/install.sh [--prefix DIR] [--debug] [--no-build]
#   (default /usr/local and a release build; --no-build installs what is already built)
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=/usr/local
profile=release
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --debug) profile=debug; shift ;;
        --no-build) build=0; shift ;;
        *) echo "install: unknown argument $1 (usage: install.sh [--prefix DIR] [--debug] [--no-build])" >&2; exit 2 ;;
    esac
done
if [ "$build" = 1 ]; then
    if [ "$profile" = release ]; then
        cargo build --locked --release --lib --bins
    else
        cargo build --locked --lib --bins
    fi
fi
target=${CARGO_TARGET_DIR:-target}/$profile
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
install -d "$prefix/bin" "$prefix/lib/pkgconfig" "$prefix/include/lamcr"
install -m 0755 "$target/lamcr" "$prefix/bin/lamcr"
install -m 0755 "$target/liblamcr.so" "$prefix/lib/liblamcr.so"
install -m 0644 "$target/liblamcr.a" "$prefix/lib/liblamcr.a"
install -m 0644 include/libcr.h "$prefix/include/lamcr/libcr.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" lamcr.pc.in >"$prefix/lib/pkgconfig/lamcr.pc"
echo "install: lamcr $version ($profile) in $prefix"
