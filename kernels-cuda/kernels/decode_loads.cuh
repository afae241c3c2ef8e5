// The tensor-core decode kernel's K/V tile load (decode.cu), shared with the read probes of
// `bench --read-roofline` (probe.cu) so that they measure the same instruction and hints.
#pragma once
#include "common.cuh"

// The K/V tile loads' L2 hints: the prefetch size of each 16-byte request (0: none, 128 or 256
// bytes) and an evict-first L2 policy for the pool, which is streamed once per step. On an
// H200 (BENCHMARKS.md, fourth session) 128-byte prefetch with evict-first read 2.9% more on
// 32 x 8191 keys and 5% more on 1 x 32767 than no hint; 256-byte prefetch alone was slower on
// the single sequence. Both stay overridable (-D) for such comparisons.
#ifndef ATTNRT_DECODE_PREFETCH
#define ATTNRT_DECODE_PREFETCH 128
#endif
#ifndef ATTNRT_DECODE_EVICT_FIRST
#define ATTNRT_DECODE_EVICT_FIRST 1
#endif
#if ATTNRT_DECODE_PREFETCH == 256
#define ATTNRT_DECODE_PF ".L2::256B"
#elif ATTNRT_DECODE_PREFETCH == 128
#define ATTNRT_DECODE_PF ".L2::128B"
#else
#define ATTNRT_DECODE_PF ""
#endif
__device__ __forceinline__ uint64_t decode_policy() {
    uint64_t pol = 0;
#if ATTNRT_DECODE_EVICT_FIRST
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
#endif
    return pol;
}
// 16 bytes when `valid`, else 16 zero bytes (nothing read; `src` must still be a valid
// address), with the hints above (`pol` from `decode_policy`).
__device__ __forceinline__ void cp_async16_stream(void* dst, const void* src, bool valid,
                                                  uint64_t pol) {
#if ATTNRT_DECODE_EVICT_FIRST
    asm volatile("cp.async.cg.shared.global.L2::cache_hint" ATTNRT_DECODE_PF
                 " [%0], [%1], 16, %2, %3;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(valid ? 16 : 0), "l"(pol));
#else
    (void)pol;
    asm volatile("cp.async.cg.shared.global" ATTNRT_DECODE_PF " [%0], [%1], 16, %2;\n" ::"r"(
                     smem_addr(dst)),
                 "l"(src), "r"(valid ? 16 : 0));
#endif
}
