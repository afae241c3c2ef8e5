#!/usr/bin/env bash
# Sets up, on a fresh machine without a GPU, everything `cargo build -p attnrt-cuda --features cuda`
# needs, in one command (run from anywhere; state goes under the repository root):
#   * .cuda-venv: nvcc 13.0.2 and the CUDA headers from PyPI, plus cuBLAS 13.1.0.3 (the version
#     the GPU machine's loader finds) and NCCL 2.28.3 (nvidia-nccl-cu13; the GPU machine has
#     libnccl.so.2 2.28.3) for linking;
#   * .cuda-stub/lib64: a link-time stand-in for the driver library (soname libcuda.so.1) that
#     defines every cu* function cust_raw declares, a libcublas.so link to the wheel's
#     libcublas.so.13 and a libnccl.so link to its libnccl.so.2. At run time the real driver,
#     cuBLAS and NCCL are loaded instead.
# Then it prints the environment to export (eval "$(scripts/cuda-toolchain.sh --env)" prints only that).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.cuda-venv"
stub="$root/.cuda-stub"
py="${PYTHON:-python3}"
quiet=0
[ "${1:-}" = "--env" ] && quiet=1
say() { [ $quiet = 1 ] || echo "$@" >&2; }

if [ ! -x "$venv/bin/pip" ]; then
  say "creating $venv"
  "$py" -m venv "$venv"
fi
site="$("$venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cu="$site/nvidia/cu13"
if [ ! -x "$cu/bin/nvcc" ] || [ ! -e "$cu/lib/libcublas.so.13" ]; then
  say "installing nvcc 13.0.2 and cuBLAS 13.1.0.3 from PyPI"
  "$venv/bin/pip" install -q "cuda-toolkit[nvcc,cudart,crt,nvvm,cccl]==13.0.2" "nvidia-cublas==13.1.0.3"
fi
nccl="$site/nvidia/nccl"
if [ ! -e "$nccl/lib/libnccl.so.2" ]; then
  say "installing NCCL 2.28.3 from PyPI"
  "$venv/bin/pip" install -q "nvidia-nccl-cu13==2.28.3"
fi
[ -e "$nccl/lib/libnccl.so.2" ] || { echo "libnccl.so.2 missing under $nccl/lib after install" >&2; exit 1; }
[ -x "$cu/bin/nvcc" ] || { echo "nvcc missing under $cu/bin after install" >&2; exit 1; }

# The cu* names cust_raw binds: read from its bindings in cargo's registry (fetched if needed).
bindings="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cust_raw-0.11.*/src/cuda.rs 2>/dev/null | head -1 || true)"
if [ -z "$bindings" ]; then
  say "fetching cust_raw sources (cargo fetch)"
  (cd "$root" && cargo fetch -q) || true
  bindings="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cust_raw-0.11.*/src/cuda.rs 2>/dev/null | head -1 || true)"
fi
[ -n "$bindings" ] || { echo "cust_raw bindings not found in the cargo registry" >&2; exit 1; }
mkdir -p "$stub/lib64"
if [ ! -e "$stub/lib64/libcuda.so" ] || [ "$bindings" -nt "$stub/lib64/libcuda.so" ] || [ "$0" -nt "$stub/lib64/libcuda.so" ]; then
  say "building the libcuda.so link stub from $bindings"
  grep -oE 'pub fn cu[A-Za-z0-9_]+' "$bindings" | awk '{print $3}' | sort -u >"$stub/symbols.txt"
  # Every function answers CUDA_ERROR_NO_DEVICE (100), so a binary linked against the stub and
  # run here with LD_LIBRARY_PATH="$stub/lib64" reports "no device" instead of crashing.
  awk '{printf "int %s(void) { return 100; }\n", $1}' "$stub/symbols.txt" >"$stub/libcuda_stub.c"
  ln -sf libcuda.so "$stub/lib64/libcuda.so.1"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/lib64/libcuda.so" "$stub/libcuda_stub.c"
  say "stub defines $(wc -l <"$stub/symbols.txt") symbols"
fi
ln -sf "$cu/lib/libcublas.so.13" "$stub/lib64/libcublas.so"
ln -sf "$cu/lib/libcublas.so.13" "$stub/lib64/libcublas.so.13"
ln -sf "$cu/lib/libcublasLt.so.13" "$stub/lib64/libcublasLt.so.13"
ln -sf "$nccl/lib/libnccl.so.2" "$stub/lib64/libnccl.so"
ln -sf "$nccl/lib/libnccl.so.2" "$stub/lib64/libnccl.so.2"

cat <<ENV
export ATTNRT_NVCC="$cu/bin/nvcc"
export CUDA_LIBRARY_PATH="$stub"
export ATTNRT_CUBLAS_LIB_DIR="$stub/lib64"
# Only to run CUDA-feature binaries on a machine without a GPU (they then report no device):
#   LD_LIBRARY_PATH="$stub/lib64"
ENV
