// Shared device helpers of attnrt's CUDA kernels: storage types, the mask descriptor on the
// device (the same rules as runtime/src/mask.rs), and small reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "attnrt's CUDA kernels need compute capability 8.0 or newer (mma.sync bf16)"
#endif

#define ATTNRT_NEG_INF (-__int_as_float(0x7f800000))

// Widening / narrowing of the storage types.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Tokens per granule of the group min/max tables (GROUP_GRANULE in src/plan.rs).
#define ATTNRT_GRANULE 32

// The mask of one call, as the kernels see it. Key j is visible to query i of row b iff
//   j <= i && i - j < window && i < len[b] && (groups == null || groups[b][i] == groups[b][j]).
// `groups` merges document ids and varlen segments into one id per token (host side, see
// src/plan.rs), ranked so that a segment's ids are below the next segment's; `gmin`/`gmax` hold
// each granule's smallest and largest id, so a tile's ids form an interval the classifier uses.
struct MaskParams {
    int seq_len;          // T
    int window;           // W, or INT_MAX
    const int* seq_lens;  // [B] valid lengths, or null (all T)
    const int* groups;    // [B, T] merged ids, or null
    const int* gmin;      // [B, ceil(T / GRANULE)]
    const int* gmax;
    int granules;         // ceil(T / GRANULE)
};

// TILE_PARTIAL_ONE_GROUP: partial by position (causal, window, padding) while every query and
// key of the tile has the same merged id, so the per-element test needs no id loads; kernels
// that do not tell it apart treat it as TILE_PARTIAL.
enum TileClass { TILE_NONE = 0, TILE_PARTIAL = 1, TILE_ALL = 2, TILE_PARTIAL_ONE_GROUP = 3 };

__device__ __forceinline__ int tile_both(int a, int b) {
    if (a == TILE_NONE || b == TILE_NONE) return TILE_NONE;
    if (a == TILE_ALL && b == TILE_ALL) return TILE_ALL;
    return TILE_PARTIAL;
}

__device__ __forceinline__ int row_len(const MaskParams& m, int b) {
    return m.seq_lens ? m.seq_lens[b] : m.seq_len;
}

// Range of merged ids over tokens [t0, t1) of row b, from the granule tables (t1 > t0, t1 <= T).
__device__ __forceinline__ void group_range(const MaskParams& m, int b, int t0, int t1, int& lo, int& hi) {
    const int* mn = m.gmin + (size_t)b * m.granules;
    const int* mx = m.gmax + (size_t)b * m.granules;
    int g0 = t0 / ATTNRT_GRANULE, g1 = (t1 - 1) / ATTNRT_GRANULE;
    lo = mn[g0];
    hi = mx[g0];
    for (int g = g0 + 1; g <= g1; ++g) {
        lo = min(lo, mn[g]);
        hi = max(hi, mx[g]);
    }
}

// Exact range of merged ids over queries [q0, q1) (a query tile can start inside a granule):
// from the granule tables when the tile is whole granules, else from the ids.
__device__ __forceinline__ void query_group_range(const MaskParams& m, int b, int q0, int q1, int& lo, int& hi) {
    if (q0 % ATTNRT_GRANULE == 0 && (q1 % ATTNRT_GRANULE == 0 || q1 == m.seq_len)) {
        group_range(m, b, q0, q1, lo, hi);
        return;
    }
    const int* g = m.groups + (size_t)b * m.seq_len;
    lo = g[q0];
    hi = g[q0];
    for (int t = q0 + 1; t < q1; ++t) {
        lo = min(lo, g[t]);
        hi = max(hi, g[t]);
    }
}

// Classification of queries [q0, q1) (q1 <= T) against keys [k0, k0 + kn) (the tile as loaded;
// keys at or past T are never visible, which the causal rule already implies since i < T).
// Same rules as RowMask::classify; the group rule uses id intervals (disjoint => none).
__device__ __forceinline__ int classify_tile(const MaskParams& m, int b, int len, int q0, int q1,
                                             int qg_lo, int qg_hi, int k0, int kn) {
    int k1 = k0 + kn;
    int causal = (k0 > q1 - 1) ? TILE_NONE : ((k1 - 1 <= q0) ? TILE_ALL : TILE_PARTIAL);
    int padding = (q0 >= len) ? TILE_NONE : ((q1 <= len) ? TILE_ALL : TILE_PARTIAL);
    int c = tile_both(causal, padding);
    if (m.window != 0x7fffffff) {
        int w;
        if (q0 >= k1 && q0 - (k1 - 1) >= m.window) w = TILE_NONE;
        else if (max(q1 - 1 - k0, 0) < m.window) w = TILE_ALL;
        else w = TILE_PARTIAL;
        c = tile_both(c, w);
    }
    if (c == TILE_NONE || m.groups == nullptr) return c;
    int kt1 = min(k1, m.seq_len);
    if (kt1 <= k0) return TILE_NONE;
    int klo, khi;
    group_range(m, b, k0, kt1, klo, khi);
    int g;
    if (qg_lo == qg_hi && klo == khi && qg_lo == klo) g = TILE_ALL;
    else if (qg_hi < klo || khi < qg_lo) g = TILE_NONE;
    else g = TILE_PARTIAL;
    if (c == TILE_PARTIAL && g == TILE_ALL) return TILE_PARTIAL_ONE_GROUP;
    return tile_both(c, g);
}

__device__ __forceinline__ bool visible(const MaskParams& m, int b, int len, int i, int j) {
    if (j > i || i - j >= m.window || i >= len) return false;
    if (m.groups) {
        const int* g = m.groups + (size_t)b * m.seq_len;
        return g[i] == g[j];
    }
    return true;
}

// Merged group id of token t (< T) of row b; 0 when the call has no groups, so that every pair
// passes the group rule of visible_ids.
__device__ __forceinline__ int group_of(const MaskParams& m, int b, int t) {
    return m.groups ? __ldg(m.groups + (size_t)b * m.seq_len + t) : 0;
}

// visible() with both group ids already at hand (group_of): a partial tile reads each key's id
// once for all the rows a thread holds, instead of two loads per element.
__device__ __forceinline__ bool visible_ids(const MaskParams& m, int len, int i, int j, int gi, int gj) {
    return j <= i && i - j < m.window && i < len && gi == gj;
}

// First key of the loop for queries [q0, q1): the window's reach, and with groups the tile's
// smallest merged id qg_lo (an id is the index of its group's first token, src/plan.rs, so no
// earlier key shares an id with the tile's queries).
__device__ __forceinline__ int key_lo(const MaskParams& m, int q0, int qg_lo) {
    const int w = m.window == 0x7fffffff ? 0 : max(0, q0 + 1 - m.window);
    return m.groups ? max(w, qg_lo) : w;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Tensor-core helpers (attention.cu, decode.cu): mma.sync m16n8k16 with f32 accumulation,
// ldmatrix from shared memory, cp.async of 16-byte chunks.
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    __device__ __forceinline__ static void run(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};
template <> struct Mma<__half> {
    __device__ __forceinline__ static void run(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
