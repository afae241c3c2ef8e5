#!/usr/bin/env bash
# Builds the C ABI in release mode and installs header, libraries, pkg-config file and CMake
# package config under PREFIX (default /usr/local):
#   ffi/install.sh [PREFIX]
# With ATTNRT_LIB_DIR set, installs the libattnrt_ffi.a (and .so, when there) already built in
# that folder instead of building (the C++ client test installs the libraries it was built with).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="${1:-/usr/local}"
target="${CARGO_TARGET_DIR:-$here/../target}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -n 1)"

if [[ -n "${ATTNRT_LIB_DIR:-}" ]]; then
    libs="$ATTNRT_LIB_DIR"
else
    (cd "$here/.." && cargo build --release -p attnrt-ffi)
    libs="$target/release"
fi
install -d "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/attnrt"
install -m 644 "$here/include/attnrt.h" "$prefix/include/"
install -m 644 "$libs/libattnrt_ffi.a" "$prefix/lib/"
if [[ -f "$libs/libattnrt_ffi.so" ]]; then
    install -m 755 "$libs/libattnrt_ffi.so" "$prefix/lib/"
fi
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/attnrt.pc.in" \
    > "$prefix/lib/pkgconfig/attnrt.pc"
install -m 644 "$here/cmake/attnrtConfig.cmake" "$prefix/lib/cmake/attnrt/"
sed -e "s|@VERSION@|$version|" "$here/cmake/attnrtConfigVersion.cmake.in" \
    > "$prefix/lib/cmake/attnrt/attnrtConfigVersion.cmake"
echo "installed attnrt $version under $prefix"
