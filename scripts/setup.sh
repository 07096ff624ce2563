#!/usr/bin/env bash
# Installs everything lamcr needs on a Debian machine, idempotently:
#   - CRIU 4.2.1, built from Debian's sid *source* package (bookworm's 3.17 fails on
#     recent kernels; 4.1.x cannot dump inet sockets on kernels >= 6.16);
#   - MPICH (the launch benchmark compares against its mpiexec), nftables, iproute2.
# Re-running it when everything is present takes well under a second.
set -euo pipefail

CRIU_VERSION=4.2.1
CRIU_ORIG_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
PREFIX=${LAMCR_PREFIX:-/usr/local}
BUILD_DIR=${LAMCR_BUILD_DIR:-/var/cache/lamcr-build}

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
}

apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_update
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

criu_ok() {
    command -v criu >/dev/null 2>&1 && criu --version 2>/dev/null | grep -q "Version: ${CRIU_VERSION}"
}

# The deb-src entry reuses the archive URI the machine is already configured with,
# so no registry host is ever written by this project.
add_sid_sources() {
    local list=/etc/apt/sources.list.d/lamcr-sid-src.sources
    [ -f "$list" ] && return 0
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
            /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' \
            /etc/apt/sources.list)
    fi
    if [ -z "$uri" ]; then
        log "no Debian archive URI found in the apt configuration"
        exit 1
    fi
    as_root tee "$list" >/dev/null <<SRC
Types: deb-src
URIs: $uri
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    APT_UPDATED=0
}

install_criu() {
    if criu_ok; then return 0; fi
    log "building CRIU ${CRIU_VERSION} from Debian's source package (a few minutes, once)"
    apt_install dpkg-dev build-essential libprotobuf-c-dev protobuf-c-compiler protobuf-compiler \
        python3-protobuf libprotobuf-dev libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev \
        libnftables-dev libaio-dev pkg-config uuid-dev nftables
    add_sid_sources
    apt_update
    as_root mkdir -p "$BUILD_DIR"
    cd "$BUILD_DIR"
    if [ ! -d "criu-${CRIU_VERSION}" ]; then
        # apt verifies what it downloads against the signed index. The archive has been seen
        # serving the .dsc and the upstream tarball but not the Debian patch tarball; the
        # upstream tarball alone builds a working criu, so fall back to it (checksum pinned).
        as_root apt-get source -qq criu/sid >/dev/null 2>&1 || true
        if [ ! -d "criu-${CRIU_VERSION}" ]; then
            if [ ! -f "criu_${CRIU_VERSION}.orig.tar.xz" ]; then
                # Fetch just the upstream tarball, at the address apt itself reports, verified
                # by apt-helper against the pinned hash.
                uri=$(apt-get --print-uris source criu/sid 2>/dev/null \
                    | awk -v f="criu_${CRIU_VERSION}.orig.tar.xz" '$2 == f { gsub("\047", "", $1); print $1 }')
                [ -n "$uri" ] || { log "apt does not know criu_${CRIU_VERSION}.orig.tar.xz"; exit 1; }
                as_root /usr/lib/apt/apt-helper download-file "$uri" "criu_${CRIU_VERSION}.orig.tar.xz" \
                    "SHA256:${CRIU_ORIG_SHA256}" >/dev/null
            fi
            echo "${CRIU_ORIG_SHA256}  criu_${CRIU_VERSION}.orig.tar.xz" | sha256sum -c --quiet
            as_root tar -xJf "criu_${CRIU_VERSION}.orig.tar.xz"
        fi
    fi
    cd "criu-${CRIU_VERSION}"
    as_root make -j"$(nproc)" criu >/dev/null
    as_root install -m 0755 criu/criu "$PREFIX/sbin/criu"
    hash -r
    criu_ok || { log "CRIU ${CRIU_VERSION} did not install"; exit 1; }
    log "installed $(criu --version | head -1) at $PREFIX/sbin/criu"
}

# gcc, libc6-dev and pkg-config: the tests build the C examples against the installed library.
apt_install ca-certificates iproute2 nftables mpich libmpich-dev procps gcc libc6-dev pkg-config
install_criu
