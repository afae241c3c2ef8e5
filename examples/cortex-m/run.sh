#!/usr/bin/env bash
# Builds the Cortex-M4F firmware (release) and runs it under QEMU's mps2-an386 with a timeout,
# printing what it prints. Installs nothing: it needs `rustup target add thumbv7em-none-eabihf`
# and `apt-get install qemu-system-arm` done beforehand.
#
#   examples/cortex-m/run.sh                 # the build CI checks
#   examples/cortex-m/run.sh --icount        # QEMU counts instructions: SysTick becomes
#                                            # deterministic, 1 tick = 40 instructions (25 MHz)
#   FEATURES=defmt examples/cortex-m/run.sh  # cargo features of the firmware
#
# CARGO_TARGET_DIR is honoured; the default is examples/cortex-m/target.
set -euo pipefail
cd "$(dirname "$0")"

icount=()
if [[ "${1:-}" == "--icount" ]]; then
    icount=(-icount shift=0)
fi

target_dir="${CARGO_TARGET_DIR:-target}"
cargo build --release --target thumbv7em-none-eabihf ${FEATURES:+--features "$FEATURES"}
elf="$target_dir/thumbv7em-none-eabihf/release/attnrt-cortex-m"

timeout 60 qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic \
    -semihosting-config enable=on,target=native "${icount[@]}" -kernel "$elf"
