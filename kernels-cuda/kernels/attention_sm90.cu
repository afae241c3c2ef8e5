// Masked flash-attention forward on Hopper warpgroup MMA (wgmma, sm_90a), head_dim 128, bf16 /
// f16 storage, f32 accumulation. Same contract, row packing and mask handling as attention.cu's
// tensor-core kernel (read its header first); what differs is how the work is laid out:
//
//   * each consumer warpgroup (4 warps) owns 64 rows of the CTA's tile; S = Q K^T is one chain
//     of eight m64nBNk16 wgmma reading Q and K straight from shared memory, and O += P V is a
//     chain of m64n128k16 wgmma with P from registers (the S accumulator converted in place, as
//     in FlashAttention-2) and V from shared memory read transposed by the hardware; the
//     softmax of tile j runs while the tensor cores finish tile j - 1's P V (FlashAttention-3's
//     intra-warpgroup overlap);
//   * Q, K and V live in shared memory in the 128-byte-swizzled layout wgmma's descriptors
//     describe: a row of 128 elements is two 64-element "planes" of 128 bytes; in plane p,
//     row r's 16-byte chunk c sits at p * rows * 128 + r * 128 + ((c ^ (r % 8)) * 16), so the
//     eight rows of an 8-row atom spread each column over all banks;
//   * one thread of a producer warpgroup loads K/V tiles with the tensor-memory accelerator
//     (TMA: a whole 64-column x BN-row box per instruction, swizzled by the hardware, zeros
//     past the sequence end) into a ring of stages guarded by mbarriers that count the bytes
//     in; the rest of the producer only copies Q once (cp.async), so the copies no longer take
//     issue slots from the consumers. Consumers fence.proxy.async once after Q lands (its
//     generic-proxy writes become visible to the wgmma reads; TMA writes already are).
//
// Entry points attn_wt_<dtype>_c<NC>_n<BN>_s<STAGES>: NC consumer warpgroups (rows = 64 * NC),
// BN keys a tile, STAGES K/V stages.
#include "attn_common.cuh"
#include "wgmma.cuh"

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
template <> struct Wg<__half, 64> {
    __device__ __forceinline__ static void qk(float* d, uint64_t a, uint64_t b, int acc) {
        wgmma_ss_f16_n64(d, a, b, acc);
    }
};
template <> struct Wg<__nv_bfloat16, 128> {
    __device__ __forceinline__ static void qk(float* d, uint64_t a, uint64_t b, int acc) {
        wgmma_ss_bf16_n128(d, a, b, acc);
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

// Warp specialisation: warpgroup 0 only copies (TMA, and cp.async for Q, completing on
// mbarriers), NC consumer
// warpgroups only compute, so no CTA-wide barrier remains in the key loop and the consumers
// drift apart (one's softmax overlaps another's wgmma). Registers move from the producer to
// the consumers with setmaxnreg.
__device__ __forceinline__ void mbar_init(uint32_t a, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t a) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(a) : "memory");
}
// Arrives on the barrier when all of this thread's earlier cp.async have landed.
__device__ __forceinline__ void mbar_arrive_cp_async(uint32_t a) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(a) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t a, int parity) {
    asm volatile(
        "{\n.reg .pred P1;\nLAB_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" ::"r"(a),
        "r"(parity)
        : "memory");
}
// A TMA tensor map (CUtensorMap: 128 opaque bytes, 64-byte aligned), passed by value as a
// __grid_constant__ kernel parameter so that its generic address is valid for the TMA unit.
struct alignas(64) TmaDesc {
    unsigned long long opaque[16];
};
// Copies the box at (c0, c1, c2) of the 3-D tensor `map` into shared memory at `dst`; the bytes
// complete on barrier `bar`. Coordinates past the tensor's extent read as zeros.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const TmaDesc* map, int c0, int c1,
                                            int c2, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t a, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(a), "r"(bytes)
                 : "memory");
}
template <int N> __device__ __forceinline__ void regs_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void regs_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Dynamic shared memory: 1024 bytes of alignment slack, Q [64 * NC rows], STAGES stages of K and
// of V [BN rows], then the mbarriers (full K, full V, empty per stage; Q).
//
// Stage s of tile n (s = n % STAGES, round n / STAGES): the producer waits for the stage's
// "empty" barrier of the previous round, copies K then V, each arriving on its "full" barrier
// when the copy lands. A consumer at tile n waits for K_n, issues S_n = Q K_n and
// O += P_{n-1} V_{n-1} (after V_{n-1}'s barrier), runs the softmax of S_n while the second
// chain finishes, then releases tile n - 1's stage.
template <typename T, int NC, int BN, int STAGES, int PRODUCER_REGS, int CONSUMER_REGS>
__device__ __forceinline__ void attn_ws(const AttnParams& p, const TmaDesc* tmk,
                                        const TmaDesc* tmv) {
    constexpr int BM = 64 * NC;
    constexpr int SN = BN / 2;
    constexpr int KSTEPS = WG_D / 16;
    constexpr int PSTEPS = BN / 16;
    constexpr uint32_t Q_BYTES = BM * WG_D * 2, KV_BYTES = BN * WG_D * 2;

    extern __shared__ unsigned char smem_raw[];
    const uint32_t raw = smem_addr(smem_raw);
    const uint32_t sQ = (raw + 1023u) & ~1023u;
    const uint32_t sK0 = sQ + Q_BYTES;
    const uint32_t sV0 = sK0 + STAGES * KV_BYTES;
    const uint32_t bars = sV0 + STAGES * KV_BYTES;  // 8 bytes each
    auto full_k = [&](int st) { return bars + 8u * st; };
    auto full_v = [&](int st) { return bars + 8u * (STAGES + st); };
    auto empty = [&](int st) { return bars + 8u * (2 * STAGES + st); };
    const uint32_t full_q = bars + 8u * (3 * STAGES);

    const int tid = threadIdx.x, wg = tid >> 7, wtid = tid & 127;
    const int lane = tid & 31, wrow = (wtid >> 5) * 16 + (lane >> 2), tq = lane & 3;
    const int R = p.group, BQ = p.q_per_cta, rows_used = BQ * R;
    const int D = p.head_dim, T_ = p.seq_len;
    const int b = blockIdx.z, g = blockIdx.y;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
    const int q1 = min(q0 + BQ, T_);
    const int len = row_len(p.mask, b);
    const size_t qs = (size_t)p.n_head * D, ks = (size_t)p.n_kv_head * D;

    if (tid == 0) {
        for (int st = 0; st < STAGES; ++st) {
            mbar_init(full_k(st), 1);
            mbar_init(full_v(st), 1);
            mbar_init(empty(st), NC * 128);
        }
        mbar_init(full_q, 128);
    }
    __syncthreads();

    int qg_lo = 0, qg_hi = 0;
    if (q0 < len && p.mask.groups) query_group_range(p.mask, b, q0, q1, qg_lo, qg_hi);
    const int kend = q0 < len ? min(q1, len) : 0;
    // Producer and consumers walk the same tile sequence: the next visited tile at or after k.
    auto next_tile = [&](int k, int& cls) {
        for (; k < kend; k += BN) {
            cls = classify_tile(p.mask, b, len, q0, q1, qg_lo, qg_hi, k, BN);
            if (cls != TILE_NONE) return k;
        }
        cls = TILE_NONE;
        return kend;
    };
    int cls0;
    const int first = next_tile(key_lo(p.mask, q0, qg_lo) / BN * BN, cls0);

    if (wg == 0) {
        regs_dec<PRODUCER_REGS>();
        if (first >= kend) return;
        const T* Q = reinterpret_cast<const T*>(p.q);
        const T* K = reinterpret_cast<const T*>(p.k);
        const T* V = reinterpret_cast<const T*>(p.v);
        for (int idx = wtid; idx < BM * CHUNKS; idx += 128) {
            const int r = idx / CHUNKS, cc = idx % CHUNKS;
            const int qi = q0 + r / R, h = g * R + r % R;
            const bool valid = r < rows_used && qi < T_;
            const T* src = Q + ((size_t)b * T_ + (valid ? qi : 0)) * qs + (size_t)h * D + cc * 8;
            cp_async16_zfill(sQ + swz(BM, r, cc), src, valid);
        }
        mbar_arrive_cp_async(full_q);
        int cls = cls0;
        // One thread drives the tensor-memory accelerator: per tile, two 64-column boxes
        // (the two swizzled planes) of K, then of V.
        if (wtid == 0) {
            for (int k0 = first, n = 0; k0 < kend; k0 = next_tile(k0 + BN, cls), ++n) {
                const int st = n % STAGES, round = n / STAGES;
                if (round > 0) mbar_wait(empty(st), (round - 1) & 1);
                mbar_arrive_expect_tx(full_k(st), KV_BYTES);
                tma_load_3d(sK0 + st * KV_BYTES, tmk, g * D, k0, b, full_k(st));
                tma_load_3d(sK0 + st * KV_BYTES + BN * ROW_BYTES, tmk, g * D + 64, k0, b,
                            full_k(st));
                mbar_arrive_expect_tx(full_v(st), KV_BYTES);
                tma_load_3d(sV0 + st * KV_BYTES, tmv, g * D, k0, b, full_v(st));
                tma_load_3d(sV0 + st * KV_BYTES + BN * ROW_BYTES, tmv, g * D + 64, k0, b,
                            full_v(st));
            }
        }
        cp_async_wait<0>();
        return;
    }

    regs_inc<CONSUMER_REGS>();
    const int cw = wg - 1;
    int row_q[2], row_h[2], row_g[2];
    bool row_ok[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int r = cw * 64 + wrow + hf * 8;
        row_q[hf] = q0 + r / R;
        row_h[hf] = g * R + r % R;
        row_ok[hf] = r < rows_used && row_q[hf] < q1;
        row_g[hf] = row_ok[hf] ? group_of(p.mask, b, row_q[hf]) : 0;
    }
    float o[64];
    float m_row[2] = {ATTNRT_NEG_INF, ATTNRT_NEG_INF}, l_row[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;

    if (first < kend) {
        const uint32_t q_wg = sQ + cw * 64 * ROW_BYTES;
        auto issue_qk = [&](float* s, int st) {
            const uint32_t kt = sK0 + st * KV_BYTES;
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
        // V read transposed (MN-major): a k16 step is 16 keys = two 8-row atoms, 1024 bytes
        // apart (the stride byte offset); the head's two 64-column planes are a whole plane
        // apart (the leading byte offset).
        auto issue_pv = [&](const uint32_t (*pa)[4], int st) {
            const uint32_t vt = sV0 + st * KV_BYTES;
            wg_fence();
#pragma unroll
            for (int t = 0; t < PSTEPS; ++t)
                pv<T>(o, pa[t], smem_desc(vt + t * 16 * ROW_BYTES, BN * ROW_BYTES, 1024));
            wg_commit();
        };
        auto pack_p = [&](uint32_t (*pa)[4], const float* s) {
#pragma unroll
            for (int t = 0; t < PSTEPS; ++t) {
                pa[t][0] = pack2<T>(s[8 * t + 0], s[8 * t + 1]);
                pa[t][1] = pack2<T>(s[8 * t + 2], s[8 * t + 3]);
                pa[t][2] = pack2<T>(s[8 * t + 4], s[8 * t + 5]);
                pa[t][3] = pack2<T>(s[8 * t + 6], s[8 * t + 7]);
            }
        };
        uint32_t pa[PSTEPS][4];
        float s[SN], alpha[2];
        mbar_wait(full_q, 0);
        fence_proxy_async();
        int cls = cls0, cur = first, n = 0;
        mbar_wait(full_k(0), 0);
        issue_qk(s, 0);
        wg_wait0();
        softmax_tile<BN>(s, p, b, len, cls, cur, tq, row_q, row_ok, row_g, m_row, l_row, alpha);
        pack_p(pa, s);
        int ncls;
        int nxt = next_tile(cur + BN, ncls);
        for (n = 1; nxt < kend; ++n) {
            cur = nxt;
            cls = ncls;
            const int st = n % STAGES, prev = (n - 1) % STAGES;
            mbar_wait(full_k(st), (n / STAGES) & 1);
            issue_qk(s, st);
            mbar_wait(full_v(prev), ((n - 1) / STAGES) & 1);
            issue_pv(pa, prev);
            // The next tile's classification (group-table loads with documents) runs while the
            // tensor cores work.
            nxt = next_tile(cur + BN, ncls);
            asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
            softmax_tile<BN>(s, p, b, len, cls, cur, tq, row_q, row_ok, row_g, m_row, l_row, alpha);
            wg_wait0();
            mbar_arrive(empty(prev));
#pragma unroll
            for (int nb = 0; nb < 16; ++nb) {
                o[nb * 4 + 0] *= alpha[0];
                o[nb * 4 + 1] *= alpha[0];
                o[nb * 4 + 2] *= alpha[1];
                o[nb * 4 + 3] *= alpha[1];
            }
            pack_p(pa, s);
        }
        const int last = (n - 1) % STAGES;
        mbar_wait(full_v(last), ((n - 1) / STAGES) & 1);
        issue_pv(pa, last);
        wg_wait0();
    }

    T* O = reinterpret_cast<T*>(p.o);
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

// K and V tiles by TMA: `tk` / `tv` map the [B, T, KV * D] tensors as 3-D (columns, tokens,
// batch rows) with 64 x BN x 1 boxes and the 128-byte swizzle (src/gpu/tma.rs).
#define ATTNRT_WT(TY, NAME, NC, BN, ST, PR, CR)                                               \
    extern "C" __global__ void __launch_bounds__(128 * (NC + 1), 1)                          \
        attn_wt_##NAME##_c##NC##_n##BN##_s##ST(AttnParams p, const __grid_constant__ TmaDesc tk, \
                                                const __grid_constant__ TmaDesc tv) {        \
        attn_ws<TY, NC, BN, ST, PR, CR>(p, &tk, &tv);                                        \
    }
// Two consumer warpgroups (128 rows), 128-key tiles, three stages: on an H200, causal T = 8192
// ran at 578 TFLOP/s against 477 for three consumers with 64-key tiles x 5 stages, 491 for two
// with 64-key x 6, and 402 for the former cp.async producer (BENCHMARKS.md). Registers: 40 x 128
// + 232 x 256 = the 64 Ki file.
ATTNRT_WT(__nv_bfloat16, bf16, 2, 128, 3, 40, 232)
ATTNRT_WT(__half, f16, 2, 128, 3, 40, 232)
