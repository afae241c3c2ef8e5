// Masked flash-attention forward on Hopper warpgroup MMA (wgmma, sm_90a), head_dim 128, bf16 /
// f16 storage, f32 accumulation. Same contract, row packing and mask handling as attention.cu's
// tensor-core kernel (read its header first); what differs is how the two matrix products run:
//
//   * each warpgroup (4 warps) owns 64 rows of the CTA's tile; S = Q K^T is one chain of eight
//     m64nBNk16 wgmma reading Q and K straight from shared memory, and O += P V is a chain of
//     m64n128k16 wgmma with P from registers (the S accumulator converted in place, as in
//     FlashAttention-2) and V from shared memory read transposed by the hardware;
//   * Q, K and V live in shared memory in the 128-byte-swizzled layout wgmma's descriptors
//     describe: a row of 128 elements is two 64-element "planes" of 128 bytes; in plane p,
//     row r's 16-byte chunk c sits at p * rows * 128 + r * 128 + ((c ^ (r % 8)) * 16), so the
//     eight rows of an 8-row atom spread each column over all banks;
//   * K/V tiles are double-buffered with cp.async (zero-filled past the sequence end), issued a
//     tile ahead; the fence.proxy.async after the wait makes the generic-proxy writes visible
//     to the wgmma (async proxy) reads.
//
// Entry points attn_wg_<dtype>_w<NWG>_n<BN>: NWG warpgroups (rows = 64 * NWG), BN keys a tile.
#include "attn_common.cuh"
#include "wgmma.cuh"

// The transposed V descriptor's offsets (overridable to probe the encoding on a new GPU).
#ifndef ATTNRT_WG_V_SWAP
#define V_LBO (BN * ROW_BYTES)
#define V_SBO 1024
#else
#define V_LBO 1024
#define V_SBO (BN * ROW_BYTES)
#endif

namespace {

constexpr int WG_D = 128;          // head_dim of this path
constexpr int ROW_BYTES = 128;     // one plane row: 64 16-bit elements
constexpr int CHUNKS = WG_D / 8;   // 16-byte chunks per row

// wgmma shared-memory matrix descriptor: start address, leading / stride byte offsets (all in
// 16-byte units, 14 bits each), 128-byte swizzle (mode 1 in bits 62-63). Base offset 0: every
// tile starts on a 1024-byte boundary, the period of the swizzle pattern.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// Byte offset of element chunk `cc` (0..15) of row `r` in a swizzled tile of `rows` rows.
__device__ __forceinline__ uint32_t swz(int rows, int r, int cc) {
    const int plane = cc >> 3, c = cc & 7;
    return (uint32_t)(plane * rows * ROW_BYTES + r * ROW_BYTES + ((c ^ (r & 7)) << 4));
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_wait0() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T, int BN> struct Wg;
template <> struct Wg<__nv_bfloat16, 64> {
    __device__ __forceinline__ static void qk(float* d, uint64_t a, uint64_t b, int acc) {
        wgmma_ss_bf16_n64(d, a, b, acc);
    }
};
template <> struct Wg<__nv_bfloat16, 128> {
    __device__ __forceinline__ static void qk(float* d, uint64_t a, uint64_t b, int acc) {
        wgmma_ss_bf16_n128(d, a, b, acc);
    }
};
template <> struct Wg<__half, 64> {
    __device__ __forceinline__ static void qk(float* d, uint64_t a, uint64_t b, int acc) {
        wgmma_ss_f16_n64(d, a, b, acc);
    }
};
template <> struct Wg<__half, 128> {
    __device__ __forceinline__ static void qk(float* d, uint64_t a, uint64_t b, int acc) {
        wgmma_ss_f16_n128(d, a, b, acc);
    }
};
template <typename T> __device__ __forceinline__ void pv(float* d, const uint32_t* a, uint64_t b);
template <> __device__ __forceinline__ void pv<__nv_bfloat16>(float* d, const uint32_t* a, uint64_t b) {
    wgmma_rs_bf16_n128(d, a, b);
}
template <> __device__ __forceinline__ void pv<__half>(float* d, const uint32_t* a, uint64_t b) {
    wgmma_rs_f16_n128(d, a, b);
}

}  // namespace

// The online-softmax update of one S tile held in wgmma accumulator layout (FlashAttention-2's,
// in the log2 domain): masks it when the tile is partial or a row invalid (row_g: the rows'
// group ids), turns it into P in place, and returns each row's rescale factor for the output
// accumulated so far.
template <int BN>
__device__ __forceinline__ void softmax_tile(float* s, const AttnParams& p, int b, int len, int cls,
                                             int k0, int tq, const int* row_q, const bool* row_ok,
                                             const int* row_g, float* m_row, float* l_row,
                                             float* alpha) {
    if (cls != TILE_ALL || !row_ok[0] || !row_ok[1]) {
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = k0 + nb * 8 + tq * 2 + e;
                // Keys past T are never visible (j > i); their id is not read.
                const int gj = group_of(p.mask, b, min(j, p.seq_len - 1));
#pragma unroll
                for (int hf = 0; hf < 2; ++hf)
                    if (!(row_ok[hf] && visible_ids(p.mask, len, row_q[hf], j, row_g[hf], gj)))
                        s[nb * 4 + hf * 2 + e] = ATTNRT_NEG_INF;
            }
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float mx = ATTNRT_NEG_INF;
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 2; ++e) mx = fmaxf(mx, s[nb * 4 + hf * 2 + e]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // Scores stay unscaled until here: scale * (s - max) in one FMA per element.
        const float m_new = fmaxf(m_row[hf], mx * p.scale_log2);
        const float m_use = m_new == ATTNRT_NEG_INF ? 0.0f : m_new;
        alpha[hf] = exp2f(m_row[hf] - m_use);
        m_row[hf] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float pv = exp2f(fmaf(s[nb * 4 + hf * 2 + e], p.scale_log2, -m_use));
                s[nb * 4 + hf * 2 + e] = pv;
                sum += pv;
            }
        l_row[hf] = l_row[hf] * alpha[hf] + sum;
    }
}

// Dynamic shared memory: 1024 bytes of alignment slack, Q [64 * NWG rows], STAGES stages of K
// and of V [BN rows]; 128 * 2 bytes a row.
//
// Pipeline of key tile j (FlashAttention-3's intra-warpgroup overlap, without its producer
// warp): the CTA waits for tile j's copy, starts copying tile j + AHEAD + 1, then issues
// S_j = Q K_j and O += P_{j-1} V_{j-1} back to back; the softmax of S_j runs while the tensor
// cores finish P_{j-1} V_{j-1}. During iteration j the stages of tiles j - 1 (its V), j (its K)
// and j + 1 .. j + AHEAD (in flight) are taken, so the new copy needs STAGES = AHEAD + 3; it
// goes to the stage of tile j - 2, free once every thread has passed the iteration's barrier.
template <typename T, int NWG, int BN, int STAGES>
__device__ __forceinline__ void attn_wg(const AttnParams& p) {
    static_assert(STAGES >= 3, "tile j - 1's V and tile j's K stay resident while copying");
    constexpr int BM = 64 * NWG;
    constexpr int NTHREADS = 128 * NWG;
    constexpr int SN = BN / 2;           // S accumulator registers per thread (m64nBN)
    constexpr int KSTEPS = WG_D / 16;    // k16 steps of Q K^T
    constexpr int PSTEPS = BN / 16;      // k16 steps of P V
    constexpr int AHEAD = STAGES - 3;    // copies in flight beyond the current tile
    constexpr uint32_t Q_BYTES = BM * WG_D * 2, KV_BYTES = BN * WG_D * 2;

    extern __shared__ unsigned char smem_raw[];
    const uint32_t raw = smem_addr(smem_raw);
    const uint32_t sQ = (raw + 1023u) & ~1023u;
    const uint32_t sK0 = sQ + Q_BYTES;                 // stage s: K at sK0 + s * KV_BYTES
    const uint32_t sV0 = sK0 + STAGES * KV_BYTES;      //          V at sV0 + s * KV_BYTES

    const int tid = threadIdx.x, wg = tid >> 7, wtid = tid & 127;
    const int lane = tid & 31, wrow = (wtid >> 5) * 16 + (lane >> 2), tq = lane & 3;
    const int R = p.group, BQ = p.q_per_cta, rows_used = BQ * R;
    const int D = p.head_dim, T_ = p.seq_len;
    const int b = blockIdx.z, g = blockIdx.y;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
    const int q1 = min(q0 + BQ, T_);
    const int len = row_len(p.mask, b);
    const size_t qs = (size_t)p.n_head * D, ks = (size_t)p.n_kv_head * D;
    const T* Q = reinterpret_cast<const T*>(p.q);
    const T* K = reinterpret_cast<const T*>(p.k);
    const T* V = reinterpret_cast<const T*>(p.v);
    T* O = reinterpret_cast<T*>(p.o);

    // The two rows this thread's accumulator fragments hold (hf = 0: wrow, 1: wrow + 8).
    int row_q[2], row_h[2], row_g[2];
    bool row_ok[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int r = wg * 64 + wrow + hf * 8;
        row_q[hf] = q0 + r / R;
        row_h[hf] = g * R + r % R;
        row_ok[hf] = r < rows_used && row_q[hf] < q1;
        row_g[hf] = row_ok[hf] ? group_of(p.mask, b, row_q[hf]) : 0;
    }

    float o[64];
    float m_row[2] = {ATTNRT_NEG_INF, ATTNRT_NEG_INF}, l_row[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;

    if (q0 < len) {
        for (int idx = tid; idx < BM * CHUNKS; idx += NTHREADS) {
            const int r = idx / CHUNKS, cc = idx % CHUNKS;
            const int qi = q0 + r / R, h = g * R + r % R;
            const bool valid = r < rows_used && qi < T_;
            const T* src = Q + ((size_t)b * T_ + (valid ? qi : 0)) * qs + (size_t)h * D + cc * 8;
            cp_async16_zfill(sQ + swz(BM, r, cc), src, valid);
        }

        int qg_lo = 0, qg_hi = 0;
        if (p.mask.groups) query_group_range(p.mask, b, q0, q1, qg_lo, qg_hi);
        const int kend = min(q1, len);
        // The visited tiles in order: the next one at or after key k (kend when none).
        auto next_tile = [&](int k, int& cls) {
            for (; k < kend; k += BN) {
                cls = classify_tile(p.mask, b, len, q0, q1, qg_lo, qg_hi, k, BN);
                if (cls != TILE_NONE) return k;
            }
            cls = TILE_NONE;
            return kend;
        };
        // Copies tile k0 into `stage` (nothing when k0 == kend) and closes a copy group, so
        // that "all but the newest AHEAD groups" is always "up to the current tile".
        auto load_kv = [&](int k0, int stage) {
            if (k0 < kend) {
                const uint32_t dk = sK0 + stage * KV_BYTES, dv = sV0 + stage * KV_BYTES;
                for (int idx = tid; idx < BN * CHUNKS; idx += NTHREADS) {
                    const int c = idx / CHUNKS, cc = idx % CHUNKS;
                    const int j = k0 + c;
                    const bool valid = j < T_;
                    const size_t off =
                        ((size_t)b * T_ + (valid ? j : 0)) * ks + (size_t)g * D + cc * 8;
                    const uint32_t at = swz(BN, c, cc);
                    cp_async16_zfill(dk + at, K + off, valid);
                    cp_async16_zfill(dv + at, V + off, valid);
                }
            }
            cp_async_commit();
        };

        // Ring of the current tile and the AHEAD tiles after it.
        int tk[AHEAD + 1], tc[AHEAD + 1];
        tk[0] = next_tile(key_lo(p.mask, q0) / BN * BN, tc[0]);
#pragma unroll
        for (int a = 1; a <= AHEAD; ++a) tk[a] = next_tile(tk[a - 1] + BN, tc[a]);
#pragma unroll
        for (int a = 0; a <= AHEAD; ++a) load_kv(tk[a], a);  // Q rides in the first group

        const uint32_t q_wg = sQ + wg * 64 * ROW_BYTES;
        // Waits for the current tile's copy, then starts the copy of tile j + AHEAD + 1 into
        // the stage that held tile j - 2 (every thread is past its last read: barrier).
        auto advance = [&](int stage) {
            cp_async_wait<AHEAD>();
            fence_proxy_async();
            __syncthreads();
            int ncls;
            const int nk = next_tile(tk[AHEAD] + BN, ncls);
            load_kv(nk, (stage + AHEAD + 1) % STAGES);
#pragma unroll
            for (int a = 0; a < AHEAD; ++a) {
                tk[a] = tk[a + 1];
                tc[a] = tc[a + 1];
            }
            tk[AHEAD] = nk;
            tc[AHEAD] = ncls;
        };
        auto issue_qk = [&](float* s, int stage) {
            const uint32_t kt = sK0 + stage * KV_BYTES;
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
                const uint32_t off = (kk & 3) << 5;
                const uint64_t da = smem_desc(q_wg + (kk >> 2) * BM * ROW_BYTES + off, 16, 1024);
                const uint64_t db = smem_desc(kt + (kk >> 2) * BN * ROW_BYTES + off, 16, 1024);
                Wg<T, BN>::qk(s, da, db, kk > 0);
            }
            wg_commit();
        };
        // V read transposed (MN-major): 16 keys a k16 step = two 8-row atoms (SBO apart); the
        // head's two 64-column planes are LBO apart.
        auto issue_pv = [&](const uint32_t (*pa)[4], int stage) {
            const uint32_t vt = sV0 + stage * KV_BYTES;
#pragma unroll
            for (int t = 0; t < PSTEPS; ++t)
                pv<T>(o, pa[t], smem_desc(vt + t * 16 * ROW_BYTES, V_LBO, V_SBO));
            wg_commit();
        };
        // P's k16 step t is S's column blocks 2t and 2t + 1, packed to pairs.
        auto pack_p = [&](uint32_t (*pa)[4], const float* s) {
#pragma unroll
            for (int t = 0; t < PSTEPS; ++t) {
                pa[t][0] = pack2<T>(s[8 * t + 0], s[8 * t + 1]);
                pa[t][1] = pack2<T>(s[8 * t + 2], s[8 * t + 3]);
                pa[t][2] = pack2<T>(s[8 * t + 4], s[8 * t + 5]);
                pa[t][3] = pack2<T>(s[8 * t + 6], s[8 * t + 7]);
            }
        };

        if (tk[0] < kend) {
            uint32_t pa[PSTEPS][4];
            float s[SN], alpha[2];
            // Tile 0: nothing to overlap with yet.
            int stage = 0, cur = tk[0], cls = tc[0];
            advance(stage);
            issue_qk(s, stage);
            wg_wait0();
            softmax_tile<BN>(s, p, b, len, cls, cur, tq, row_q, row_ok, row_g, m_row, l_row, alpha);
            pack_p(pa, s);
            int prev_stage = stage;
            stage = (stage + 1) % STAGES;
            while (tk[0] < kend) {
                cur = tk[0];
                cls = tc[0];
                advance(stage);
                issue_qk(s, stage);
                wg_fence();
                issue_pv(pa, prev_stage);
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                softmax_tile<BN>(s, p, b, len, cls, cur, tq, row_q, row_ok, row_g, m_row, l_row, alpha);
                wg_wait0();
#pragma unroll
                for (int nb = 0; nb < 16; ++nb) {
                    o[nb * 4 + 0] *= alpha[0];
                    o[nb * 4 + 1] *= alpha[0];
                    o[nb * 4 + 2] *= alpha[1];
                    o[nb * 4 + 3] *= alpha[1];
                }
                pack_p(pa, s);
                prev_stage = stage;
                stage = (stage + 1) % STAGES;
            }
            wg_fence();
            issue_pv(pa, prev_stage);
            wg_wait0();
        }
        cp_async_wait<0>();
    }

    // Epilogue: finish the row sums across the quad, normalise, store pairs.
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float l = l_row[hf];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (!row_ok[hf]) continue;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        T* dst = O + ((size_t)b * T_ + row_q[hf]) * qs + (size_t)row_h[hf] * D;
#pragma unroll
        for (int nb = 0; nb < 16; ++nb) {
            *reinterpret_cast<uint32_t*>(dst + nb * 8 + tq * 2) =
                pack2<T>(o[nb * 4 + hf * 2] * inv, o[nb * 4 + hf * 2 + 1] * inv);
        }
    }
}

#define ATTNRT_WG(TY, NAME, NWG, BN, ST)                                                     \
    extern "C" __global__ void __launch_bounds__(128 * NWG, 1)                                \
        attn_wg_##NAME##_w##NWG##_n##BN##_s##ST(AttnParams p) {                              \
        attn_wg<TY, NWG, BN, ST>(p);                                                          \
    }
#define ATTNRT_WG_ALL(TY, NAME)    \
    ATTNRT_WG(TY, NAME, 3, 64, 5)  \
    ATTNRT_WG(TY, NAME, 3, 64, 4)  \
    ATTNRT_WG(TY, NAME, 2, 64, 5)  \
    ATTNRT_WG(TY, NAME, 2, 128, 3)

ATTNRT_WG_ALL(__nv_bfloat16, bf16)
ATTNRT_WG_ALL(__half, f16)
