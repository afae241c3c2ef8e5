#!/usr/bin/env bash
# Builds the C ABI in release mode and installs header, libraries, pkg-config file and CMake
# package config under PREFIX (default /usr/local):
#   ffi/install.sh [PREFIX]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="${1:-/usr/local}"
target="${CARGO_TARGET_DIR:-$here/../target}"
version="$(cd "$here" && cargo pkgid -p attnrt-ffi | sed 's/.*[#@]//')"

(cd "$here/.." && cargo build --release -p attnrt-ffi)
install -d "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/attnrt"
install -m 644 "$here/include/attnrt.h" "$prefix/include/"
install -m 644 "$target/release/libattnrt_ffi.a" "$prefix/lib/"
install -m 755 "$target/release/libattnrt_ffi.so" "$prefix/lib/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/attnrt.pc.in" \
    > "$prefix/lib/pkgconfig/attnrt.pc"
install -m 644 "$here/cmake/attnrtConfig.cmake" "$prefix/lib/cmake/attnrt/"
sed -e "s|@VERSION@|$version|" "$here/cmake/attnrtConfigVersion.cmake.in" \
    > "$prefix/lib/cmake/attnrt/attnrtConfigVersion.cmake"
echo "installed attnrt $version under $prefix"
