#!/usr/bin/env bash
# Replays the fuzz corpus of the C ABI (corpus/abi/) quickly.
#   ffi/fuzz/replay.sh            on stable: tests/tests/ffi_fuzz_replay.rs runs every corpus
#                                 input through the same harness (src/exercise.rs) as the target
#   ffi/fuzz/replay.sh --nightly  the libFuzzer target itself (ASan, leak detection), no mutation
# Fuzz for real (nightly, cargo-fuzz):
#   cd ffi/fuzz && cargo +nightly fuzz run abi corpus/abi -- -max_total_time=600
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "${1:-}" in
    "")
        cd "$here/../.."
        cargo test -p attnrt-tests --test ffi_fuzz_replay -- --nocapture
        ;;
    --nightly)
        cd "$here"
        cargo +nightly fuzz run abi corpus/abi -- -runs=0
        ;;
    *)
        echo "usage: $0 [--nightly]" >&2
        exit 2
        ;;
esac
