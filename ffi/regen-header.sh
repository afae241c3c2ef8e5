#!/usr/bin/env bash
# Regenerates ffi/include/attnrt.h with a pinned cbindgen (installed if missing).
#   ffi/regen-header.sh          rewrite the header
#   ffi/regen-header.sh --check  fail (exit 1, with a diff) if the committed header is stale
set -euo pipefail

CBINDGEN_VERSION=0.27.0
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
header="$here/include/attnrt.h"

cbindgen="${CBINDGEN:-$(command -v cbindgen || true)}"
if [[ -z "$cbindgen" && -x "$HOME/.cargo/bin/cbindgen" ]]; then
    cbindgen="$HOME/.cargo/bin/cbindgen"
fi
if [[ -z "$cbindgen" ]] || [[ "$("$cbindgen" --version)" != "cbindgen $CBINDGEN_VERSION" ]]; then
    echo "installing cbindgen $CBINDGEN_VERSION" >&2
    cargo install cbindgen --version "$CBINDGEN_VERSION" --locked >&2
    cbindgen="$HOME/.cargo/bin/cbindgen"
fi

generate() {
    # cbindgen warns about every private item it skips; only errors matter here.
    (cd "$here" && "$cbindgen" --quiet --config cbindgen.toml --crate attnrt-ffi --output "$1" .)
}

case "${1:-}" in
    --check)
        tmp="$(mktemp)"
        trap 'rm -f "$tmp"' EXIT
        generate "$tmp"
        if ! diff -u "$header" "$tmp"; then
            echo "ffi/include/attnrt.h is stale: run ffi/regen-header.sh and commit it" >&2
            exit 1
        fi
        echo "ffi/include/attnrt.h is up to date (cbindgen $CBINDGEN_VERSION)"
        ;;
    "")
        generate "$header"
        echo "wrote $header"
        ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac
