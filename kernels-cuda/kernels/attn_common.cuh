// What the attention kernels of attention.cu (mma.sync, sm_80+) and attention_sm90.cu (wgmma,
// sm_90a) share: the launch parameters (mirrored by `AttnParams` in src/gpu.rs).
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
    int batch;       // B (the wgmma kernel numbers its work items over it)
    int* sched;      // the wgmma kernel's work counter, zero at launch
};
