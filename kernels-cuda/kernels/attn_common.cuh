// What the attention kernels of attention.cu (mma.sync, sm_80+) and attention_sm90.cu (wgmma,
// sm_90a) share: the launch parameters (mirrored by `AttnParams` in src/gpu.rs) and the
// asynchronous-copy helpers.
#pragma once

#include "common.cuh"

struct AttnParams {
    const void* q;  // [B, T, H * D]
    const void* k;  // [B, T, KV * D]
    const void* v;  // [B, T, KV * D]
    void* o;        // [B, T, H * D]
    int seq_len;
    int n_head;
    int n_kv_head;
    int head_dim;
    int group;       // R = H / KV
    int q_per_cta;   // queries per CTA (BQ); BQ * R <= rows of the CTA
    float scale;     // 1 / sqrt(D)
    float scale_log2;  // log2(e) / sqrt(D)
    MaskParams mask;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}

// 16 bytes from `src`, or 16 zero bytes when `valid` is false (the source is then not read).
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
