#!/usr/bin/env bash
# Make an `ispc` (Intel SPMD Program Compiler) available to the build.
#
# Debian 13 packages ISPC; Debian 12 does not, and PyPI's `ispc` is an empty placeholder. So:
#   - `ispc` already on PATH, or a working .toolchain/bin/ispc: nothing to do;
#   - Debian 13+ as root: `apt-get install -y ispc`;
#   - otherwise (Debian 12, or no root): download Debian 13's ispc and the libraries it needs with a
#     private apt state (the system's apt state is never touched), unpack them with `dpkg -x` into
#     .toolchain/ispc-root, and install a wrapper .toolchain/bin/ispc that runs the binary through
#     that tree's own dynamic loader (Debian 12's glibc is too old for it).
# Idempotent: a second run returns at once. Prints the path of the ispc it found or installed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
toolchain=${NEOD_TOOLCHAIN:-$here/.toolchain}
wrapper=$toolchain/bin/ispc
sysroot=$toolchain/ispc-root
suite=trixie
mirror=${NEOD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
# ispc and every shared library it loads, as packaged in Debian 13 (about 57 MB of .deb files).
packages=(ispc libllvm19 libc6 libstdc++6 libgcc-s1 libedit2 libffi8 libxml2 libz3-4 libzstd1
          zlib1g libbsd0 libmd0 libtinfo6 libicu76 liblzma5)

die() { echo "install_ispc: $*" >&2; exit 1; }
works() { "$1" --version >/dev/null 2>&1; }

if found=$(command -v ispc) && works "$found"; then
    echo "$found"; exit 0
fi
if [ -x "$wrapper" ] && works "$wrapper"; then
    echo "$wrapper"; exit 0
fi

[ "$(uname -m)" = x86_64 ] || die "only x86-64 hosts are supported (this is $(uname -m))"
command -v apt-get >/dev/null || die "apt-get not found: install ISPC >= 1.23 yourself and put it on PATH (or set ISPC=/path/to/ispc)"
command -v dpkg >/dev/null || die "dpkg not found: install ISPC yourself and put it on PATH"

codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
major=$(cut -d. -f1 /etc/debian_version 2>/dev/null || echo 0)
case $major in ''|*[!0-9]*) major=0 ;; esac

if [ "$(id -u)" -eq 0 ] && { [ "$major" -ge 13 ] || [ "$codename" = trixie ] || [ "$codename" = forky ]; }; then
    echo "install_ispc: apt-get install -y ispc" >&2
    if ! apt-get install -y -q ispc >&2; then
        apt-get update -q >&2 && apt-get install -y -q ispc >&2 || die "apt-get install ispc failed"
    fi
    found=$(command -v ispc) || die "apt-get installed ispc but it is not on PATH"
    works "$found" || die "$found --version failed"
    echo "$found"; exit 0
fi

[ -r "$keyring" ] || die "$keyring missing: apt-get install debian-archive-keyring"

echo "install_ispc: fetching Debian $suite's ispc into $sysroot" >&2
state=$toolchain/apt
mkdir -p "$state/lists/partial" "$state/archives/partial" "$state/cache" "$state/etc"
cat >"$state/etc/$suite.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: $suite
Components: main
Signed-By: $keyring
SOURCES
: >"$state/etc/preferences"
opts=(-q -o "Dir::Etc::SourceList=$state/etc/$suite.sources" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::Etc::Preferences=$state/etc/preferences" -o Dir::Etc::PreferencesParts=/dev/null
      -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state/cache"
      -o "Dir::Cache::archives=$state/archives" -o APT::Architecture=amd64
      -o APT::Architectures=amd64 -o APT::Get::List-Cleanup=false)
[ "$(id -u)" -eq 0 ] && opts+=(-o APT::Sandbox::User=root)

apt-get "${opts[@]}" update >&2 || die "apt-get update for $suite failed (is $mirror reachable?)"
debs=$state/debs
mkdir -p "$debs"
(cd "$debs" && apt-get "${opts[@]}" download "${packages[@]}" >&2) \
    || die "apt-get download of ${packages[*]} failed"

rm -rf "$sysroot.tmp"
mkdir -p "$sysroot.tmp"
for deb in "$debs"/*.deb; do
    dpkg -x "$deb" "$sysroot.tmp"
done
rm -rf "$sysroot"
mv "$sysroot.tmp" "$sysroot"
rm -rf "$debs" "$state/archives" "$state/cache"

mkdir -p "$toolchain/bin"
cat >"$wrapper.tmp" <<'WRAPPER'
#!/bin/sh
# Runs Debian 13's ispc, unpacked by scripts/install_ispc.sh, through that tree's own loader.
root=$(cd "$(dirname "$0")/../ispc-root" && pwd)
lib=$root/usr/lib/x86_64-linux-gnu
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib:$root/lib/x86_64-linux-gnu" \
    "$root/usr/bin/ispc" "$@"
WRAPPER
chmod +x "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"
works "$wrapper" || die "the unpacked ispc does not run: $wrapper --version failed"
echo "install_ispc: $("$wrapper" --version | head -n 1)" >&2
echo "$wrapper"
