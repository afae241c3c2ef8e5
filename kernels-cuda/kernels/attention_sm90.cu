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
//   * one thread of a producer warpgroup loads Q, K and V tiles with the tensor-memory
//     accelerator (TMA: a whole 64-column box per instruction, swizzled by the hardware, zeros
//     past the sequence end) into a ring of stages guarded by mbarriers that count the bytes
//     in, so copies take no issue slots from the consumers (TMA writes, like wgmma reads, are
//     in the async proxy: no proxy fence);
//   * a grid smaller than the work (one CTA per SM) makes the kernel persistent: the producer
//     refills the ring with the next item's tiles while the consumers finish the current one.
//
// Entry points attn_wt_<dtype>_c<NC>_n<BN>_k<KST>v<VST>q<QB>: NC consumer warpgroups (rows =
// 64 * NC), BN keys a tile, KST K stages, VST V stages, QB Q buffers.
#include "attn_common.cuh"
#include "wgmma.cuh"

namespace {

constexpr int WG_D = 128;          // head_dim of this path
constexpr int ROW_BYTES = 128;     // one plane row: 64 16-bit elements

// wgmma shared-memory matrix descriptor: start address, leading / stride byte offsets (all in
// 16-byte units, 14 bits each), 128-byte swizzle (mode 1 in bits 62-63). Base offset 0: every
// tile starts on a 1024-byte boundary, the period of the swizzle pattern.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_wait0() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
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
        // One merged id for the whole tile: the group rule holds for every pair.
        const bool one_group = cls == TILE_PARTIAL_ONE_GROUP;
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = k0 + nb * 8 + tq * 2 + e;
                // Keys past T are never visible (j > i); their id is not read.
                const int gj = one_group ? 0 : group_of(p.mask, b, min(j, p.seq_len - 1));
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int gi = one_group ? 0 : row_g[hf];
                    if (!(row_ok[hf] && visible_ids(p.mask, len, row_q[hf], j, gi, gj)))
                        s[nb * 4 + hf * 2 + e] = ATTNRT_NEG_INF;
                }
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

// Warp specialisation: warpgroup 0 only copies (TMA, completing on mbarriers), NC consumer
// warpgroups only compute, so no CTA-wide barrier remains in the key loop and the consumers
// drift apart (one's softmax overlaps another's wgmma). Registers move from the producer to
// the consumers with setmaxnreg.
__device__ __forceinline__ void mbar_init(uint32_t a, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t a) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(a) : "memory");
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
// The same for the 4-D tensor `map` (the queries: columns, heads, tokens, batch rows).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const TmaDesc* map, int c0, int c1,
                                            int c2, int c3, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
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

// Dynamic shared memory: 1024 bytes of alignment slack, QB buffers of Q [64 * NC rows], KST
// stages of K and VST of V [BN rows], then the mbarriers (full and empty per K stage, V stage
// and Q buffer) and two work-item slots (11 ints each).
//
// Work items are (query tile, KV head, batch row), numbered heaviest query tile first (for
// causal masks). CTA c of a grid of G starts with item c; then its producer takes the next
// unclaimed one, G + atomicAdd(p.sched, 1) (the counter is zero at launch), so that CTAs which
// drew light items take more of them (greedy, heaviest first), and hands it, described (query
// range, merged ids, first tile), to the consumers in shared memory with the item's Q ("full
// Q"); a number past the last item ends the CTA. With a grid of one CTA per item each CTA runs
// one; with one CTA per SM (persistent) the producer runs ahead into the next item's Q and K/V
// tiles while the consumers finish the current one.
//
// Tile n counts over all of a CTA's items: K stage n % KST, V stage n % VST, each with its round
// (n / KST, n / VST). The producer waits for a stage's "empty" barrier of the previous round and
// loads K then V, each completing its "full" barrier by bytes. A consumer at tile n waits for
// K_n, issues S_n = Q K_n and O += P_{n-1} V_{n-1} (after V_{n-1}'s barrier), releases K_n's
// stage once S_n is done, runs the softmax of S_n while the second chain finishes, then releases
// V_{n-1}'s stage. Item k's Q goes to buffer k % QB once the consumers released that buffer's
// previous item (after its last S = Q K^T, "empty Q").
template <typename T, int NC, int BN, int KST, int VST, int QB, int PRODUCER_REGS,
          int CONSUMER_REGS>
__device__ __forceinline__ void attn_ws(const AttnParams& p, const TmaDesc* tmq, const TmaDesc* tmk,
                                        const TmaDesc* tmv) {
    constexpr int BM = 64 * NC;
    constexpr int SN = BN / 2;
    constexpr int KSTEPS = WG_D / 16;
    constexpr int PSTEPS = BN / 16;
    constexpr uint32_t Q_BYTES = BM * WG_D * 2, KV_BYTES = BN * WG_D * 2;

    extern __shared__ unsigned char smem_raw[];
    const uint32_t raw = smem_addr(smem_raw);
    const uint32_t sQ0 = (raw + 1023u) & ~1023u;
    const uint32_t sK0 = sQ0 + QB * Q_BYTES;
    const uint32_t sV0 = sK0 + KST * KV_BYTES;
    const uint32_t bars = sV0 + VST * KV_BYTES;  // 8 bytes each
    auto full_k = [&](int st) { return bars + 8u * st; };
    auto empty_k = [&](int st) { return bars + 8u * (KST + st); };
    auto full_v = [&](int st) { return bars + 8u * (2 * KST + st); };
    auto empty_v = [&](int st) { return bars + 8u * (2 * KST + VST + st); };
    auto full_q = [&](int qb) { return bars + 8u * (2 * KST + 2 * VST + qb); };
    auto empty_q = [&](int qb) { return bars + 8u * (2 * KST + 2 * VST + QB + qb); };
    const uint32_t slots = bars + 8u * (2 * KST + 2 * VST + 2 * QB);

    const int tid = threadIdx.x, wg = tid >> 7, wtid = tid & 127;
    const int lane = tid & 31, wrow = (wtid >> 5) * 16 + (lane >> 2), tq = lane & 3;
    const int R = p.group, BQ = p.q_per_cta, rows_used = BQ * R;
    const int D = p.head_dim, T_ = p.seq_len, KVH = p.n_kv_head;
    const int q_tiles = (T_ + BQ - 1) / BQ, items = q_tiles * KVH * p.batch;
    const int G = gridDim.x;
    const size_t qs = (size_t)p.n_head * D;

    if (tid == 0) {
        for (int st = 0; st < KST; ++st) {
            mbar_init(full_k(st), 1);
            mbar_init(empty_k(st), NC * 128);
        }
        for (int st = 0; st < VST; ++st) {
            mbar_init(full_v(st), 1);
            mbar_init(empty_v(st), NC * 128);
        }
        for (int qb = 0; qb < QB; ++qb) {
            mbar_init(full_q(qb), 1);
            mbar_init(empty_q(qb), NC * 128);
        }
    }
    __syncthreads();

    // What the producer derives from an item and hands to the consumers: the rows' query range,
    // the merged-id range of the queries, the keys' end and the first visited tile with its
    // class.
    struct Item {
        int index, q0, q1, g, b, len, qg_lo, qg_hi, kend, first, cls0;
    };
    // The item of each Q load, by its parity: the producer writes slot qn % 2 only after the
    // consumers released Q buffer qn % QB of item qn - QB (QB <= 2), so they have read slot
    // qn % 2 of item qn - 2. Plain accesses: the mbarrier arrive / wait around them are
    // release / acquire and compiler barriers ("memory" clobbers).
    static_assert(QB == 1 || QB == 2, "two item slots serve at most two Q buffers");
    Item* const item_slot = reinterpret_cast<Item*>(smem_raw + (slots - raw));
    // The next visited tile at or after k.
    auto next_tile = [&](const Item& it, int k, int& cls) {
        for (; k < it.kend; k += BN) {
            cls = classify_tile(p.mask, it.b, it.len, it.q0, it.q1, it.qg_lo, it.qg_hi, k, BN);
            if (cls != TILE_NONE) return k;
        }
        cls = TILE_NONE;
        return it.kend;
    };
    auto describe = [&](int i) {
        Item it;
        it.index = i;
        const int t = i / (KVH * p.batch), rest = i - t * (KVH * p.batch);
        it.g = rest % KVH;
        it.b = rest / KVH;
        it.q0 = (q_tiles - 1 - t) * BQ;
        it.q1 = min(it.q0 + BQ, T_);
        it.len = row_len(p.mask, it.b);
        it.qg_lo = it.qg_hi = 0;
        if (it.q0 < it.len && p.mask.groups)
            query_group_range(p.mask, it.b, it.q0, it.q1, it.qg_lo, it.qg_hi);
        it.kend = it.q0 < it.len ? min(it.q1, it.len) : 0;
        it.first = next_tile(it, key_lo(p.mask, it.q0, it.qg_lo) / BN * BN, it.cls0);
        return it;
    };

    if (wg == 0) {
        regs_dec<PRODUCER_REGS>();
        // One thread drives the tensor-memory accelerator: per tile, two 64-column boxes (the
        // two swizzled planes) of K, then of V; per item, the two planes of Q after its first
        // tile, so that the stage ring refills while the consumers finish the previous item.
        if (wtid != 0) return;
        int n = 0, qn = 0;
        // Hands an item (with its Q when it has keys to visit) to the consumers once they have
        // released its Q buffer's previous item; the consumers skip the item's description.
        auto hand_over = [&](const Item& it, bool with_q) {
            const int qb = qn % QB, qround = qn / QB;
            if (qround > 0) mbar_wait(empty_q(qb), (qround - 1) & 1);
            item_slot[qn & 1] = it;
            if (with_q) {
                // Box (64 columns, R heads, BQ queries, 1 row): rows in (query, head) order,
                // queries past T as zeros.
                const uint32_t sQ = sQ0 + qb * Q_BYTES;
                mbar_arrive_expect_tx(full_q(qb), rows_used * WG_D * 2);
                tma_load_4d(sQ, tmq, 0, it.g * R, it.q0, it.b, full_q(qb));
                tma_load_4d(sQ + BM * ROW_BYTES, tmq, 64, it.g * R, it.q0, it.b, full_q(qb));
            } else {
                mbar_arrive(full_q(qb));
            }
            ++qn;
        };
        for (int i = blockIdx.x; i < items; i = G + atomicAdd(p.sched, 1)) {
            const Item it = describe(i);
            if (it.first >= it.kend) {
                hand_over(it, false);
                continue;
            }
            int cls = it.cls0;
            for (int k0 = it.first; k0 < it.kend; k0 = next_tile(it, k0 + BN, cls), ++n) {
                const int ks = n % KST, kround = n / KST;
                if (kround > 0) mbar_wait(empty_k(ks), (kround - 1) & 1);
                mbar_arrive_expect_tx(full_k(ks), KV_BYTES);
                tma_load_3d(sK0 + ks * KV_BYTES, tmk, it.g * D, k0, it.b, full_k(ks));
                tma_load_3d(sK0 + ks * KV_BYTES + BN * ROW_BYTES, tmk, it.g * D + 64, k0, it.b,
                            full_k(ks));
                const int vs = n % VST, vround = n / VST;
                if (vround > 0) mbar_wait(empty_v(vs), (vround - 1) & 1);
                mbar_arrive_expect_tx(full_v(vs), KV_BYTES);
                tma_load_3d(sV0 + vs * KV_BYTES, tmv, it.g * D, k0, it.b, full_v(vs));
                tma_load_3d(sV0 + vs * KV_BYTES + BN * ROW_BYTES, tmv, it.g * D + 64, k0, it.b,
                            full_v(vs));
                if (k0 == it.first) hand_over(it, true);
            }
        }
        Item end{};
        end.index = items;
        hand_over(end, false);
        return;
    }

    regs_inc<CONSUMER_REGS>();
    const int cw = wg - 1;
    uint32_t q_wg = sQ0 + cw * 64 * ROW_BYTES;  // this warpgroup's rows of the item's Q
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
    float o[64];
    // V read transposed (MN-major): a k16 step is 16 keys = two 8-row atoms, 1024 bytes apart
    // (the stride byte offset); the head's two 64-column planes are a whole plane apart (the
    // leading byte offset).
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
    T* O = reinterpret_cast<T*>(p.o);
    int n = 0;
    for (int qn = 0;; ++qn) {
        const int qb = qn % QB;
        mbar_wait(full_q(qb), (qn / QB) & 1);
        const Item it = item_slot[qn & 1];
        if (it.index >= items) break;
        q_wg = sQ0 + qb * Q_BYTES + cw * 64 * ROW_BYTES;
        int row_q[2], row_h[2], row_g[2];
        bool row_ok[2];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = cw * 64 + wrow + hf * 8;
            row_q[hf] = it.q0 + r / R;
            row_h[hf] = it.g * R + r % R;
            row_ok[hf] = r < rows_used && row_q[hf] < it.q1;
            row_g[hf] = row_ok[hf] ? group_of(p.mask, it.b, row_q[hf]) : 0;
        }
        float m_row[2] = {ATTNRT_NEG_INF, ATTNRT_NEG_INF}, l_row[2] = {0.0f, 0.0f};
#pragma unroll
        for (int e = 0; e < 64; ++e) o[e] = 0.0f;

        if (it.first >= it.kend) {
            mbar_arrive(empty_q(qb));
        } else {
            uint32_t pa[PSTEPS][4];
            float s[SN], alpha[2];
            int cls = it.cls0, cur = it.first;
            mbar_wait(full_k(n % KST), (n / KST) & 1);
            issue_qk(s, n % KST);
            wg_wait0();
            mbar_arrive(empty_k(n % KST));
            softmax_tile<BN>(s, p, it.b, it.len, cls, cur, tq, row_q, row_ok, row_g, m_row, l_row,
                             alpha);
            pack_p(pa, s);
            int ncls;
            int nxt = next_tile(it, cur + BN, ncls);
            for (++n; nxt < it.kend; ++n) {
                cur = nxt;
                cls = ncls;
                const int ks = n % KST, prev = (n - 1) % VST;
                mbar_wait(full_k(ks), (n / KST) & 1);
                issue_qk(s, ks);
                mbar_wait(full_v(prev), ((n - 1) / VST) & 1);
                issue_pv(pa, prev);
                // The next tile's classification (group-table loads with documents) runs while
                // the tensor cores work.
                nxt = next_tile(it, cur + BN, ncls);
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                // S = Q K^T is done: K's stage may refill while the softmax runs.
                mbar_arrive(empty_k(ks));
                softmax_tile<BN>(s, p, it.b, it.len, cls, cur, tq, row_q, row_ok, row_g, m_row,
                                 l_row, alpha);
                wg_wait0();
                mbar_arrive(empty_v(prev));
#pragma unroll
                for (int nb = 0; nb < 16; ++nb) {
                    o[nb * 4 + 0] *= alpha[0];
                    o[nb * 4 + 1] *= alpha[0];
                    o[nb * 4 + 2] *= alpha[1];
                    o[nb * 4 + 3] *= alpha[1];
                }
                pack_p(pa, s);
            }
            // Every S = Q K^T of the item is done: Q's buffer may take a later item's.
            mbar_arrive(empty_q(qb));
            const int last = (n - 1) % VST;
            mbar_wait(full_v(last), ((n - 1) / VST) & 1);
            issue_pv(pa, last);
            wg_wait0();
            mbar_arrive(empty_v(last));
        }

#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float l = l_row[hf];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            if (!row_ok[hf]) continue;
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            T* dst = O + ((size_t)it.b * T_ + row_q[hf]) * qs + (size_t)row_h[hf] * D;
#pragma unroll
            for (int nb = 0; nb < 16; ++nb) {
                *reinterpret_cast<uint32_t*>(dst + nb * 8 + tq * 2) =
                    pack2<T>(o[nb * 4 + hf * 2] * inv, o[nb * 4 + hf * 2 + 1] * inv);
            }
        }
    }
}

// Q, K and V tiles by TMA: `tq` maps the [B, T, H * D] queries as 4-D (columns, heads,
// tokens, batch rows) with 64 x R x BQ x 1 boxes, `tk` / `tv` the [B, T, KV * D] keys and values
// as 3-D (columns, tokens, batch rows) with 64 x BN x 1 boxes, all with the 128-byte swizzle
// (src/gpu/tma.rs).
#define ATTNRT_WT(TY, NAME, NC, BN, KS, VS, QB, PR, CR)                                       \
    extern "C" __global__ void __launch_bounds__(128 * (NC + 1), 1)                          \
        attn_wt_##NAME##_c##NC##_n##BN##_k##KS##v##VS##q##QB(                                \
            AttnParams p, const __grid_constant__ TmaDesc tq, const __grid_constant__ TmaDesc tk, \
            const __grid_constant__ TmaDesc tv) {                                            \
        attn_ws<TY, NC, BN, KS, VS, QB, PR, CR>(p, &tq, &tk, &tv);                           \
    }
// Two consumer warpgroups (128 rows), 128-key tiles, three K stages, two V stages and two Q
// buffers (the next item's Q lands while the current item finishes): on an H200, causal
// T = 8192 ran at 604 TFLOP/s against 589 with three K/V stages and one Q buffer, 477 for three
// consumers with 64-key tiles x 5 stages, 491 for two with 64-key x 6, and 402 for the former
// cp.async producer (BENCHMARKS.md). Registers: 56 x 128 + 224 x 256 = the 64 Ki file (the
// producer describes the work items; 40 spilled there).
ATTNRT_WT(__nv_bfloat16, bf16, 2, 128, 3, 2, 2, 56, 224)
ATTNRT_WT(__half, f16, 2, 128, 3, 2, 2, 56, 224)
