#!/usr/bin/env bash
# scripts/install.sh -- build dmabuf-fs and install it system-wide.
#
#   scripts/install.sh            build (cargo build --release) and install
#   scripts/install.sh --no-build install an already-built target/release/dmabuf-fs
#
# Installs:
#   target/release/dmabuf-fs          -> /usr/local/bin/dmabuf-fs
#   mount-helper/mount.fuse.dmabuf-fs -> /sbin/mount.fuse.dmabuf-fs
#                                        (and /usr/sbin/ when that is a separate directory)
#   the fuse3 package (apt-get), when fusermount3 is missing.
# Checks that /dev/fuse exists. Safe to run again: unchanged files are left alone.
# The build runs as the calling user; installing needs root (sudo is used when
# available and the caller is not root).
set -euo pipefail

cd "$(dirname "$0")/.."

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

build=1
for arg in "$@"; do
    case $arg in
        --no-build) build=0 ;;
        -h | --help)
            sed -n '2,14s/^# \{0,1\}//p' "$0"
            exit 0
            ;;
        *) die "unknown argument: $arg (try --help)" ;;
    esac
done

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        die "installing needs root and sudo is not available; run this as root"
    fi
fi

# --- fuse3 (fusermount3, /etc/fuse.conf) -----------------------------------
if command -v fusermount3 >/dev/null 2>&1; then
    say "fuse3: present ($(command -v fusermount3))"
else
    command -v apt-get >/dev/null 2>&1 \
        || die "fusermount3 is missing and apt-get is not available: install your distribution's fuse3 package"
    say "fuse3: missing, installing with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq fuse3 >/dev/null
    command -v fusermount3 >/dev/null 2>&1 || die "fuse3 was installed but fusermount3 is still not in PATH"
    say "fuse3: installed"
fi

# --- /dev/fuse ---------------------------------------------------------------
if [ ! -e /dev/fuse ]; then
    # The module may just not be loaded yet.
    "${SUDO[@]}" modprobe fuse >/dev/null 2>&1 || true
fi
if [ ! -c /dev/fuse ]; then
    die "/dev/fuse does not exist. Load the FUSE kernel module ('modprobe fuse'); in a container, start it with '--device /dev/fuse --cap-add SYS_ADMIN'."
fi
say "/dev/fuse: present"

# --- build -------------------------------------------------------------------
bin_src=${CARGO_TARGET_DIR:-target}/release/dmabuf-fs
if [ "$build" -eq 1 ]; then
    command -v cargo >/dev/null 2>&1 \
        || die "cargo not found: install Rust (https://rustup.rs) or put ~/.cargo/bin in PATH"
    say "building: cargo build --release"
    cargo build --release
fi
[ -x "$bin_src" ] || die "$bin_src not found; build it first (cargo build --release) or drop --no-build"

# --- install -----------------------------------------------------------------
# install_file SRC DEST: copy with mode 0755 unless DEST is already identical.
# Goes through a temporary name and rename, so a running daemon is not disturbed.
install_file() {
    local src=$1 dest=$2
    if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ -x "$dest" ]; then
        say "$dest: up to date"
        return 0
    fi
    "${SUDO[@]}" install -d -m 0755 "$(dirname "$dest")"
    "${SUDO[@]}" install -m 0755 "$src" "$dest.new.$$"
    "${SUDO[@]}" mv -f "$dest.new.$$" "$dest"
    say "$dest: installed"
}

install_file "$bin_src" /usr/local/bin/dmabuf-fs
install_file mount-helper/mount.fuse.dmabuf-fs /sbin/mount.fuse.dmabuf-fs
if [ -d /usr/sbin ] && [ "$(readlink -f /sbin)" != "$(readlink -f /usr/sbin)" ]; then
    install_file mount-helper/mount.fuse.dmabuf-fs /usr/sbin/mount.fuse.dmabuf-fs
fi

say "done: $(/usr/local/bin/dmabuf-fs --version 2>/dev/null || echo dmabuf-fs) installed; mount with: mount -t fuse.dmabuf-fs IMAGE DIR"
