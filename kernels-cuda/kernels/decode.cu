// Attention of new tokens over the paged KV cache (issue 7, flash-decoding).
//
// Cache layout (runtime/src/kv/mod.rs): block b holds, for KV head g, `block_size` token slots;
// slot i of head g starts at element ((b * KV + g) * block_size + i) * D of the K pool (and of
// the V pool). A sequence names its blocks in a table; logical key j lives in slot
// s = j (or j mod capacity for a rolling cache) of block table[s / block_size].
//
// The new tokens' k and v (RoPE applied) reach their slots before these kernels run: the
// norm/RoPE pass (`qkv_prep` in rope_norm.cu) stores them there.
//
// Kernels:
//   decode_tc_<t>_d<D>_w<W>_s<S>  (bf16 / f16 storage, head_dim D): one CTA per (work item,
//                      KV head, chunk of up to 8 query heads); a work item is one new token and
//                      one split (a range of keys it sees). Each of the CTA's W warps streams
//                      its own 16-key tiles of K and V through an S-stage cp.async pipeline in
//                      shared memory and computes S = Q K^T and O^T += V^T P^T with mma.sync on
//                      tensor cores: the query heads of the KV head are the rows of the Q
//                      fragment (GQA packing: each K/V element is read once for all of them),
//                      so the memory system, not the issue rate, bounds the kernel;
//   decode_<t>_l<L>_r<R>  the CUDA-core kernel for the other cases (f32, other head_dims):
//                      L lanes hold one key row (8 elements each), so a warp reads 32 / L keys
//                      at a time; every group of L lanes keeps its own online-softmax state,
//                      combined in shared memory at the end.
// Both write their split's state (max and sum in the log2 domain, unnormalised output), and the
// last split of a (token, KV head, head chunk) to finish merges all splits of the token in a
// fixed order (independent of which split finishes last) into the output: no separate merge
// launch. A token with a single split writes its output directly.
#include "common.cuh"

struct DecodeParams {
    const void* q;          // [n, H * D] new tokens' queries (RoPE applied), storage type
    const void* k;          // K pool
    const void* v;          // V pool
    const int4* work;       // [items] (token, sequence, first key, one past the last key)
    const int* tok_items;   // [n + 1] first work item of each new token
    const unsigned* tables; // block tables of the call's sequences, concatenated
    const int2* seqs;       // [sequences] (offset of the table in `tables`, capacity in slots)
    float* part;            // [items, H, D] unnormalised partial outputs
    float2* ml;             // [items, H] (running max, sum), log2 domain
    void* o;                // [n, H * D] attention output, storage type
    unsigned* counters;     // [n, KV, head chunks] splits finished; the merging CTA resets it to 0
    int n_head;
    int n_kv_head;
    int head_dim;
    int group;              // R = H / KV
    int block_size;
    int bs_shift;           // log2(block_size) when a power of two, else -1
    int rolling;            // 1: logical key j is slot j mod capacity
    float scale_log2;       // log2(e) / sqrt(D)
};

// Eight consecutive elements of a row as f32 (zeros for a missing chunk).
template <typename T> struct Chunk8;
template <> struct Chunk8<float> {
    uint4 a, b;
    __device__ __forceinline__ void load(const float* p) {
        a = __ldg(reinterpret_cast<const uint4*>(p));
        b = __ldg(reinterpret_cast<const uint4*>(p) + 1);
    }
    __device__ __forceinline__ void zero() { a = b = make_uint4(0, 0, 0, 0); }
    __device__ __forceinline__ void widen(float* f) const {
        f[0] = __uint_as_float(a.x); f[1] = __uint_as_float(a.y);
        f[2] = __uint_as_float(a.z); f[3] = __uint_as_float(a.w);
        f[4] = __uint_as_float(b.x); f[5] = __uint_as_float(b.y);
        f[6] = __uint_as_float(b.z); f[7] = __uint_as_float(b.w);
    }
};
__device__ __forceinline__ void widen2(uint32_t w, __nv_bfloat16*, float* f) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void widen2(uint32_t w, __half*, float* f) {
    __half2 h = *reinterpret_cast<__half2*>(&w);
    float2 v = __half22float2(h);
    f[0] = v.x;
    f[1] = v.y;
}
template <typename T> struct Chunk8 {
    uint4 a;
    __device__ __forceinline__ void load(const T* p) { a = __ldg(reinterpret_cast<const uint4*>(p)); }
    __device__ __forceinline__ void zero() { a = make_uint4(0, 0, 0, 0); }
    __device__ __forceinline__ void widen(float* f) const {
        widen2(a.x, (T*)nullptr, f);
        widen2(a.y, (T*)nullptr, f + 2);
        widen2(a.z, (T*)nullptr, f + 4);
        widen2(a.w, (T*)nullptr, f + 6);
    }
};

// Elements [c, c + 8) of a row of D elements as f32; zeros past D (any even D).
template <typename T>
__device__ __forceinline__ void load8(const T* row, int c, int D, float* f) {
    if (c + 8 <= D && (D & 7) == 0) {
        Chunk8<T> ch;
        ch.load(row + c);
        ch.widen(f);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = (c + e < D) ? to_f32(row[c + e]) : 0.0f;
    }
}

// Pool row of logical key j of sequence (table, cap) for KV head g (the pool has fewer than
// 2^32 rows: GpuKvCache::new checks).
__device__ __forceinline__ unsigned key_row(const DecodeParams& p, const unsigned* table, int cap,
                                            int g, int j) {
    int s = p.rolling ? j % cap : j;
    int blk, slot;
    if (p.bs_shift >= 0) {
        blk = s >> p.bs_shift;
        slot = s & (p.block_size - 1);
    } else {
        blk = s / p.block_size;
        slot = s - blk * p.block_size;
    }
    const unsigned b = table[blk];
    return (b * p.n_kv_head + g) * p.block_size + slot;
}

// Element offset of the row of logical key j.
__device__ __forceinline__ size_t key_offset(const DecodeParams& p, const unsigned* table, int cap,
                                             int g, int j) {
    return (size_t)key_row(p, table, cap, g, j) * p.head_dim;
}

// The (work item, KV head, first query head of the chunk) of this CTA. The grid is one
// dimension with the KV heads and head chunks of a work item next to each other, so that the
// CTAs reading one item's cache blocks are dispatched together (on an H200, with the split range
// loaded at the start, 32 x 8191 keys ran in 0.2553-0.2555 ms against 0.2563-0.2565 with the
// items of one KV head next to each other, three alternated runs of each in one call).
struct CtaWork {
    int item, g, r0;
};
// Head chunks of a KV head's query heads, `heads_per_cta` per CTA (the launch's `hchunks`).
__device__ __forceinline__ int head_chunks(const DecodeParams& p, int heads_per_cta) {
    return (p.group + heads_per_cta - 1) / heads_per_cta;
}
__device__ __forceinline__ CtaWork cta_work(const DecodeParams& p, int heads_per_cta) {
    const int chunks = head_chunks(p, heads_per_cta);
    const int x = blockIdx.x, g = x % p.n_kv_head, rest = x / p.n_kv_head;
    return CtaWork{rest / chunks, g, (rest % chunks) * heads_per_cta};
}

// Output columns [c, c + VW) of head h from the token's splits [i0, i1), given the heads' max
// M and sum L over all splits; VW consecutive floats per load, 16 loads in flight per thread.
template <typename T, int VW>
__device__ __forceinline__ void merge_columns(const DecodeParams& p, int token, int h, int c,
                                              int i0, int i1, float M, float L) {
    const int D = p.head_dim, H = p.n_head;
    float acc[VW];
#pragma unroll
    for (int e = 0; e < VW; ++e) acc[e] = 0.0f;
#pragma unroll 16
    for (int i = i0; i < i1; ++i) {
        const size_t row = (size_t)i * H + h;
        const float m = __ldcg(&p.ml[row]).x;
        const float sc = m == ATTNRT_NEG_INF ? 0.0f : exp2f(m - M);
        const float* src = p.part + row * D + c;
        if constexpr (VW == 4) {
            const float4 v = __ldcg(reinterpret_cast<const float4*>(src));
            acc[0] = fmaf(v.x, sc, acc[0]);
            acc[1] = fmaf(v.y, sc, acc[1]);
            acc[2] = fmaf(v.z, sc, acc[2]);
            acc[3] = fmaf(v.w, sc, acc[3]);
        } else {
            const float2 v = __ldcg(reinterpret_cast<const float2*>(src));
            acc[0] = fmaf(v.x, sc, acc[0]);
            acc[1] = fmaf(v.y, sc, acc[1]);
        }
    }
    T* out = reinterpret_cast<T*>(p.o) + ((size_t)token * H + h) * D + c;
#pragma unroll
    for (int e = 0; e < VW; ++e) out[e] = from_f32<T>(L > 0.0f ? acc[e] / L : 0.0f);
}

// The last CTA of (token, KV head g, head chunk) to finish merges the token's splits
// [i0, i1) for its nr heads, in split order, into the output: one warp per head finds the max
// and the sum over the splits, then every thread combines VW-float columns of the partial
// outputs. The other CTAs' states are read through L2 (ld.global.cg): they were written by
// other SMs during this launch.
template <typename T>
__device__ __forceinline__ void merge_if_last(const DecodeParams& p, int token, int g, int r0,
                                              int nr, int rps, int i0, int i1) {
    __shared__ unsigned s_last;
    __shared__ float2 s_tot[16];  // (max, sum) of each head of the chunk (at most 16)
    // Every thread's partial-state stores are visible device-wide before the CTA counts.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned* c =
            p.counters + ((size_t)token * p.n_kv_head + g) * head_chunks(p, rps) + r0 / rps;
        const unsigned done = atomicAdd(c, 1u) + 1u;
        const unsigned last = done == (unsigned)(i1 - i0);
        // Every other split has counted already: reset for the next launch.
        if (last) *c = 0u;
        s_last = last;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    const int D = p.head_dim, H = p.n_head;
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = threadIdx.x >> 5; r < nr; r += warps) {
        const int h = g * p.group + r0 + r;
        float M = ATTNRT_NEG_INF;
        for (int i = i0 + lane; i < i1; i += 32) M = fmaxf(M, __ldcg(&p.ml[(size_t)i * H + h]).x);
        M = warp_max(M);
        float L = 0.0f;
        for (int i = i0 + lane; i < i1; i += 32) {
            const float2 ml = __ldcg(&p.ml[(size_t)i * H + h]);
            L += ml.x == ATTNRT_NEG_INF ? 0.0f : ml.y * exp2f(ml.x - M);
        }
        L = warp_sum(L);
        if (lane == 0) s_tot[r] = make_float2(M, L);
    }
    __syncthreads();
    const int vw = (D & 3) == 0 ? 4 : 2;  // head_dim is even
    const int cols = D / vw;
    for (int idx = threadIdx.x; idx < nr * cols; idx += blockDim.x) {
        const int r = idx / cols, c = (idx - r * cols) * vw;
        const float2 t = s_tot[r];
        if (vw == 4) {
            merge_columns<T, 4>(p, token, g * p.group + r0 + r, c, i0, i1, t.x, t.y);
        } else {
            merge_columns<T, 2>(p, token, g * p.group + r0 + r, c, i0, i1, t.x, t.y);
        }
    }
}

// The work items [i0, i1) of one new token (its splits). Loaded at a CTA's start and read by
// its epilogue, so that the load's latency overlaps the key loop instead of delaying the end.
struct TokenSplits {
    int i0, i1;
};
__device__ __forceinline__ TokenSplits token_splits(const DecodeParams& p, int token) {
    return TokenSplits{__ldg(&p.tok_items[token]), __ldg(&p.tok_items[token + 1])};
}

// Combines the CTA's `parts` partial states (part k, head r: max/sum at sML[k * rps + r],
// output row at sO + (k * rps + r) * w) in a fixed order and stores the result: the output when
// the token has one split, else the split's state, then the merge if this split is the last.
template <typename T>
__device__ __forceinline__ void finish_cta(const DecodeParams& p, int item, int token,
                                           TokenSplits splits, int g, int r0, int nr,
                                           const float* sO, const float2* sML, int parts, int rps,
                                           int w) {
    const int D = p.head_dim, H = p.n_head;
    const int i0 = splits.i0, i1 = splits.i1;
    const bool single = i1 - i0 == 1;
    for (int idx = threadIdx.x; idx < nr * D; idx += blockDim.x) {
        const int r = idx / D, d = idx - r * D;
        float M = ATTNRT_NEG_INF;
        for (int k = 0; k < parts; ++k) M = fmaxf(M, sML[k * rps + r].x);
        float Ls = 0.0f, Os = 0.0f;
        for (int k = 0; k < parts; ++k) {
            const float2 ml = sML[k * rps + r];
            const float sc = ml.x == ATTNRT_NEG_INF ? 0.0f : exp2f(ml.x - M);
            Ls = fmaf(ml.y, sc, Ls);
            Os = fmaf(sO[(k * rps + r) * w + d], sc, Os);
        }
        const int h = g * p.group + r0 + r;
        if (single) {
            T* out = reinterpret_cast<T*>(p.o);
            out[((size_t)token * H + h) * D + d] = from_f32<T>(Ls > 0.0f ? Os / Ls : 0.0f);
        } else {
            const size_t row = (size_t)item * H + h;
            p.part[row * D + d] = Os;
            if (d == 0) p.ml[row] = make_float2(M, Ls);
        }
    }
    if (!single) merge_if_last<T>(p, token, g, r0, nr, rps, i0, i1);
}

#define DEC_THREADS 128

template <typename T, int L, int RP, int KB>
__device__ __forceinline__ void decode(const DecodeParams& p) {
    constexpr int NG = DEC_THREADS / L;  // key groups per CTA
    constexpr int DW = L * 8;            // row width the groups cover
    __shared__ float s_o[NG * RP * DW];
    __shared__ float2 s_ml[NG * RP];

    const CtaWork cw = cta_work(p, RP);
    const int item = cw.item, g = cw.g, r0 = cw.r0;
    const int tid = threadIdx.x, gl = tid % L, grp = tid / L;
    const int D = p.head_dim, H = p.n_head;
    const int nr = min(RP, p.group - r0);
    const int4 w = __ldg(&p.work[item]);
    const int token = w.x, lo = w.z, hi = w.w;
    const int2 sq = __ldg(&p.seqs[w.y]);
    const TokenSplits splits = token_splits(p, token);
    const unsigned* table = p.tables + sq.x;
    const int c = gl * 8;
    const T* K = reinterpret_cast<const T*>(p.k);
    const T* V = reinterpret_cast<const T*>(p.v);

    float q[RP][8], o[RP][8], m[RP], l[RP];
    const T* Q = reinterpret_cast<const T*>(p.q) + (size_t)token * H * D;
#pragma unroll
    for (int r = 0; r < RP; ++r) {
        const int h = g * p.group + r0 + min(r, nr - 1);
        load8(Q + (size_t)h * D, c, D, q[r]);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            q[r][e] *= p.scale_log2;
            o[r][e] = 0.0f;
        }
        m[r] = ATTNRT_NEG_INF;
        l[r] = 0.0f;
    }

    // The L lanes of a key group reduce their dot products with shuffles over the group's own
    // lanes only: groups of one warp (L < 32) may run different numbers of iterations (the
    // last keys of a split reach some groups and not others, e.g. a prefill token that sees
    // fewer keys than NG * KB), and a shuffle naming lanes that already left the loop would
    // wait for them forever while they wait at the __syncthreads below.
    const unsigned gmask =
        L == 32 ? 0xffffffffu : (((1u << (L & 31)) - 1u) << ((tid & 31) & ~(L - 1)));
    for (int kb = lo + grp * KB; kb < hi; kb += NG * KB) {
        float kf[KB][8], vf[KB][8];
#pragma unroll
        for (int i = 0; i < KB; ++i) {
            const int j = kb + i;
            if (j < hi) {
                const size_t off = key_offset(p, table, sq.y, g, j);
                load8(K + off, c, D, kf[i]);
                load8(V + off, c, D, vf[i]);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) kf[i][e] = vf[i][e] = 0.0f;
            }
        }
#pragma unroll
        for (int r = 0; r < RP; ++r) {
            float s[KB];
#pragma unroll
            for (int i = 0; i < KB; ++i) {
                float a = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; ++e) a = fmaf(q[r][e], kf[i][e], a);
#pragma unroll
                for (int x = L / 2; x > 0; x >>= 1) a += __shfl_xor_sync(gmask, a, x);
                s[i] = (kb + i < hi) ? a : ATTNRT_NEG_INF;
            }
            float mx = s[0];  // key kb < hi always exists
#pragma unroll
            for (int i = 1; i < KB; ++i) mx = fmaxf(mx, s[i]);
            const float mn = fmaxf(m[r], mx);
            const float alpha = exp2f(m[r] - mn);  // m = -inf gives 0
            m[r] = mn;
            float sum = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) o[r][e] *= alpha;
#pragma unroll
            for (int i = 0; i < KB; ++i) {
                const float pv = exp2f(s[i] - mn);
                sum += pv;
#pragma unroll
                for (int e = 0; e < 8; ++e) o[r][e] = fmaf(pv, vf[i][e], o[r][e]);
            }
            l[r] = l[r] * alpha + sum;
        }
    }

    // Combine the key groups (fixed order) and store the split's state.
#pragma unroll
    for (int r = 0; r < RP; ++r) {
#pragma unroll
        for (int e = 0; e < 8; ++e) s_o[(grp * RP + r) * DW + c + e] = o[r][e];
        if (gl == 0) s_ml[grp * RP + r] = make_float2(m[r], l[r]);
    }
    __syncthreads();
    finish_cta<T>(p, item, token, splits, g, r0, nr, s_o, s_ml, NG, RP, DW);
}

// ------------------------------------------------------------------------------------------
// Tensor-core decode (bf16 / f16 storage).
// ------------------------------------------------------------------------------------------
#include "decode_loads.cuh"

#define TC_KEYS 16  // keys per warp tile
#define TC_HEADS 8  // query heads per CTA (the n dimension of O^T += V^T P^T)

// Shared memory of one CTA: W warps x S stages x (K and V tiles of TC_KEYS rows), from a
// 128-byte boundary. The 8 rows an ldmatrix reads must lie in 8 distinct bank groups: rows of a
// multiple of 8 chunks (head_dim 64, 128, 256) are stored unpadded with 16-byte chunk c of row r
// at c xor (r mod 8), so a tile is one aligned run and a warp's 512-byte copy fills whole
// 128-byte lines; other rows are padded by one chunk (the odd stride does it). On an H200 the
// same loads read 5% slower into padded rows than into aligned unpadded ones, and 14% slower
// into unpadded rows that start 16 bytes after a 128-byte boundary (BENCHMARKS.md, twelfth
// session, `bench --decode-ladder`).
// The epilogue reuses the tiles' memory for the warps' states.
template <int D> struct TcTile {
    static constexpr int CPR = D / 8;                          // 16-byte chunks per row
    static constexpr bool SWIZZLED = CPR % 8 == 0;
    static constexpr int LDS = SWIZZLED ? CPR : CPR + 1;       // row stride in chunks
    static constexpr int CHUNKS = TC_KEYS * LDS;               // chunks of one K (or V) tile
    // Where chunk `ch` of row `row` of a tile lies.
    static __device__ __forceinline__ int at(int row, int ch) {
        return row * LDS + (SWIZZLED ? ch ^ (row & 7) : ch);
    }
};

// The first 128-byte boundary at or after `p` (the launch adds 128 bytes of slack: static
// shared variables come before the dynamic ones, which then start only 16-byte aligned).
__device__ __forceinline__ uint4* smem_align128(uint4* p) {
    return p + (((128u - (smem_addr(p) & 127u)) & 127u) >> 4);
}

// Diagnostic builds only (`-DATTNRT_DECODE_DIAG=N` through an `ATTNRT_NVCC` wrapper; never the
// runtime's, outputs meaningless): 1 keeps the tile loads and replaces the per-tile arithmetic by
// reading one word of each landed tile, 2 keeps the arithmetic and drops the loads. They split a
// step's time into what the loads alone and the arithmetic alone cost (BENCHMARKS.md, tenth
// session: loads alone ran 1.5% faster than the kernel, arithmetic alone took 23% of its time).
#ifndef ATTNRT_DECODE_DIAG
#define ATTNRT_DECODE_DIAG 0
#endif

// Whether a tile lies wholly inside its key range, as a type: the copies of a whole tile get a
// constant size, so they compile without the zero-fill operand the last tile needs.
struct WholeTile {
    static constexpr bool value = true;
};
struct PartialTile {
    static constexpr bool value = false;
};

// Diagnostic builds only (`-DATTNRT_DECODE_TIMELINE=1`, never the runtime's): thread 0 of every
// CTA of a process's 12th tensor-core decode launch of one grid size (warm, steady) records the
// global timer at its start, once its first tile is issued, once it has landed, at the end of
// its key loop, before its epilogue and at its end; the first CTA of the next launch prints the
// marks (`TL cta item kv_head sm t0 .. t5`, ns), which `tools/decode_timeline.py` summarises.
// It showed (BENCHMARKS.md, eleventh session) that CTAs on some SMs finish 25% before others,
// and that giving those SMs more work does not shorten the launch.
#ifndef ATTNRT_DECODE_TIMELINE
#define ATTNRT_DECODE_TIMELINE 0
#endif
#if ATTNRT_DECODE_TIMELINE
#define TL_CTAS 4096
__device__ unsigned long long attnrt_tl[TL_CTAS][6];
__device__ int3 attnrt_tl_who[TL_CTAS];
__device__ unsigned attnrt_tl_tickets;
__device__ __forceinline__ unsigned long long tl_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// Every CTA takes a ticket: the CTAs of launch k all take theirs before launch k + 1 starts,
// so ticket / grid size is the launch.
__device__ __forceinline__ bool tl_start(unsigned cta, int item, int g) {
    const unsigned ctas = gridDim.x;
    const unsigned ticket = atomicAdd(&attnrt_tl_tickets, 1u);
    const bool on = ticket / ctas == 11 && cta < TL_CTAS;
    if (on) {
        attnrt_tl[cta][0] = tl_now();
        unsigned sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        attnrt_tl_who[cta] = make_int3(item, g, (int)sm);
    }
    if (ticket == 12 * ctas) {
        for (unsigned i = 0; i < min(ctas, (unsigned)TL_CTAS); ++i) {
            const int3 w = attnrt_tl_who[i];
            const unsigned long long* t = attnrt_tl[i];
            printf("TL %u %d %d %d %llu %llu %llu %llu %llu %llu\n", i, w.x, w.y, w.z, t[0], t[1],
                   t[2], t[3], t[4], t[5]);
        }
    }
    return on;
}
#define TL_START(item, g)                                                                     \
    const unsigned tl_cta = blockIdx.x;                                                    \
    const bool tl_on = threadIdx.x == 0 && tl_start(tl_cta, item, g)
#define TL_MARK(i)                                        \
    do {                                                  \
        if (tl_on) attnrt_tl[tl_cta][i] = tl_now();       \
    } while (0)
#else
#define TL_START(item, g) static_assert(true, "")
#define TL_MARK(i) \
    do {           \
    } while (0)
#endif

template <typename T, int D, int W, int S>
__device__ __forceinline__ void decode_tc(const DecodeParams& p) {
    using Tile = TcTile<D>;
    constexpr int CPR = Tile::CPR, CH = Tile::CHUNKS;
    constexpr int KS = D / 16;               // k-steps of Q K^T = m-tiles of O^T
    constexpr int PER = TC_KEYS * CPR / 32;  // 16-byte copies per lane per K (or V) tile
    static_assert(D % 16 == 0 && (TC_KEYS * CPR) % 32 == 0, "head_dim must be a multiple of 16");
    static_assert(S >= 2, "at least two pipeline stages");
    extern __shared__ uint4 smem_raw[];
    uint4* const smem = smem_align128(smem_raw);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gq = lane >> 2, qq = lane & 3;  // fragment row group and lane in the quad
    const CtaWork cw = cta_work(p, TC_HEADS);
    const int item = cw.item, g = cw.g, r0 = cw.r0;
    TL_START(item, g);
    const int H = p.n_head;
    const int nr = min(TC_HEADS, p.group - r0);
    const int4 w = __ldg(&p.work[item]);
    const int token = w.x, lo = w.z, hi = w.w;
    const int2 sq = __ldg(&p.seqs[w.y]);
    const TokenSplits splits = token_splits(p, token);
    const unsigned* table = p.tables + sq.x;
    const T* K = reinterpret_cast<const T*>(p.k);
    const T* V = reinterpret_cast<const T*>(p.v);

    // A fragments of Q (rows: the chunk's query heads, zero past nr and in rows 8..15):
    // a0a1 = Q[gq][16 ks + 2 qq, +1], a4a5 = the same 8 columns further.
    uint32_t qa[KS][2];
    {
        const int h = g * p.group + r0 + min(gq, nr - 1);
        const uint32_t* q32 = reinterpret_cast<const uint32_t*>(reinterpret_cast<const T*>(p.q) +
                                                                ((size_t)token * H + h) * D);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            qa[ks][0] = gq < nr ? __ldg(q32 + ks * 8 + qq) : 0u;
            qa[ks][1] = gq < nr ? __ldg(q32 + ks * 8 + 4 + qq) : 0u;
        }
    }

    // This warp's tiles: t = 0, 1, ... cover keys lo + (warp + t W) TC_KEYS + [0, TC_KEYS).
    const int ntiles = (hi - lo + TC_KEYS - 1) / TC_KEYS;
    const int mine = ntiles > warp ? (ntiles - warp + W - 1) / W : 0;
    uint4* const sw = smem + warp * (S * 2 * CH);

    // Pool row of key (tile start + lane mod 16): one block-table lookup per lane, handed to
    // the copying lanes with shuffles.
    auto row_of = [&](int t) -> unsigned {
        const int j = lo + (warp + t * W) * TC_KEYS + (lane & (TC_KEYS - 1));
        return j < hi ? key_row(p, table, sq.y, g, j) : 0u;
    };
    // Coalesced copies: lane L moves chunk (L + 32 c) mod CPR of row (L + 32 c) / CPR.
    const uint64_t pol = decode_policy();
    auto issue_tile = [&](int key0, unsigned rows, int stage, auto whole) {
        uint4* dk = sw + stage * 2 * CH;
        uint4* dv = dk + CH;
#pragma unroll
        for (int c = 0; c < PER; ++c) {
            const int f = lane + 32 * c, row = f / CPR, ch = f - row * CPR;
            const unsigned ro = __shfl_sync(0xffffffffu, rows, row);
            const bool ok = decltype(whole)::value || key0 + row < hi;
            const size_t e = ok ? (size_t)ro * D + ch * 8 : 0;
            cp_async16_stream(dk + Tile::at(row, ch), K + e, ok, pol);
            cp_async16_stream(dv + Tile::at(row, ch), V + e, ok, pol);
        }
    };
    auto issue = [&](int t, unsigned rows, int stage) {
        if (ATTNRT_DECODE_DIAG == 2) return;
        const int key0 = lo + (warp + t * W) * TC_KEYS;
        if (key0 + TC_KEYS <= hi)
            issue_tile(key0, rows, stage, WholeTile{});
        else
            issue_tile(key0, rows, stage, PartialTile{});
    };

    unsigned off_next = mine > 0 ? row_of(0) : 0u;
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < mine) {
            issue(s, off_next, s);
            if (s + 1 < mine) off_next = row_of(s + 1);
        }
        cp_async_commit();
    }
    TL_MARK(1);

    // ldmatrix addresses: lanes 8i..8i+7 name the rows of matrix i = (keys 8 (i / 2) + [0, 8),
    // chunk i mod 2 of the 16 columns): matrices 0..3 are b0b1 / b2b3 of keys 0-7 and of keys
    // 8-15 (K, as B of Q K^T) and a0a1 / a2a3 / a4a5 / a6a7 (V transposed, as A of V^T P^T).
    const int lrow = ((lane >> 4) << 3) + (lane & 7), lch = (lane >> 3) & 1;
    float o[KS][4];  // O^T: c0 c1 = (d 16 mt + gq, heads 2 qq, 2 qq + 1), c2 c3 = d + 8
#pragma unroll
    for (int mt = 0; mt < KS; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.0f;
    float m = ATTNRT_NEG_INF, l = 0.0f;  // head gq: running max, this lane's share of the sum

    int stage = 0;
    for (int t = 0; t < mine; ++t) {
        const int tn = t + S - 1;
        if (tn < mine) {
            issue(tn, off_next, tn % S);
            if (tn + 1 < mine) off_next = row_of(tn + 1);
        }
        cp_async_commit();
        cp_async_wait<S - 1>();
        __syncwarp();
        if (t == 0) TL_MARK(2);
        const uint4* ks_ = sw + stage * 2 * CH;
        const uint4* vs_ = ks_ + CH;
        const int key0 = lo + (warp + t * W) * TC_KEYS;
        if (ATTNRT_DECODE_DIAG == 1) {
            o[0][0] += __uint_as_float((reinterpret_cast<const unsigned*>(ks_)[lane] ^
                                        reinterpret_cast<const unsigned*>(vs_)[lane]) &
                                       0x3f800000u);
            l = 1.0f;
            m = 0.0f;
            __syncwarp();
            stage = stage + 1 == S ? 0 : stage + 1;
            continue;
        }

        // S = Q K^T: two 8-key n-tiles, even and odd k-steps in separate accumulators.
        float acc[2][2][4];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int n = 0; n < 2; ++n) acc[a][n][0] = acc[a][n][1] = acc[a][n][2] = acc[a][n][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            uint32_t kb[4];
            ldmatrix_x4(kb, ks_ + Tile::at(lrow, ks * 2 + lch));
            const uint32_t a[4] = {qa[ks][0], 0u, qa[ks][1], 0u};
            Mma<T>::run(acc[ks & 1][0], a, kb[0], kb[1]);
            Mma<T>::run(acc[ks & 1][1], a, kb[2], kb[3]);
        }
        // Row gq (head) holds keys 8 n + 2 qq + e.
        float s[2][2], mx = ATTNRT_NEG_INF;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float v = (acc[0][n][e] + acc[1][n][e]) * p.scale_log2;
                s[n][e] = key0 + 8 * n + 2 * qq + e < hi ? v : ATTNRT_NEG_INF;
                mx = fmaxf(mx, s[n][e]);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m, mx);  // finite: the tile's first key is visible
        const float alpha = exp2f(m - mn);
        m = mn;
        float pr[2][2], sum = 0.0f;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                pr[n][e] = exp2f(s[n][e] - mn);
                sum += pr[n][e];
            }
        l = l * alpha + sum;
        // P as the B fragment of O^T += V^T P^T (k = keys, n = heads): b0b1 = keys 2 qq, +1 of
        // n-tile 0, b2b3 = of n-tile 1; the rescale factors of heads 2 qq, 2 qq + 1 come from
        // the quads that own those rows.
        const uint32_t pb0 = Mma<T>::pack(pr[0][0], pr[0][1]);
        const uint32_t pb1 = Mma<T>::pack(pr[1][0], pr[1][1]);
        const float a0 = __shfl_sync(0xffffffffu, alpha, qq * 8);
        const float a1 = __shfl_sync(0xffffffffu, alpha, qq * 8 + 4);
#pragma unroll
        for (int mt = 0; mt < KS; ++mt) {
            uint32_t vb[4];
            ldmatrix_x4_trans(vb, vs_ + Tile::at(lrow, mt * 2 + lch));
            o[mt][0] *= a0;
            o[mt][1] *= a1;
            o[mt][2] *= a0;
            o[mt][3] *= a1;
            Mma<T>::run(o[mt], vb, pb0, pb1);
        }
        __syncwarp();  // every lane is done with this stage before it is refilled
        stage = stage + 1 == S ? 0 : stage + 1;
    }
    TL_MARK(3);
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);

    // The warps' states into shared memory (the stages are free once every copy landed).
    cp_async_wait<0>();
    __syncthreads();
    float* sO = reinterpret_cast<float*>(smem);                    // [W][8][D]
    float2* sML = reinterpret_cast<float2*>(sO + W * TC_HEADS * D);  // [W][8]
    float* ow = sO + warp * TC_HEADS * D;
#pragma unroll
    for (int mt = 0; mt < KS; ++mt) {
        const int d = mt * 16 + gq;
        ow[(2 * qq) * D + d] = o[mt][0];
        ow[(2 * qq + 1) * D + d] = o[mt][1];
        ow[(2 * qq) * D + d + 8] = o[mt][2];
        ow[(2 * qq + 1) * D + d + 8] = o[mt][3];
    }
    if (qq == 0) sML[warp * TC_HEADS + gq] = make_float2(m, l);
    __syncthreads();
    TL_MARK(4);
    finish_cta<T>(p, item, token, splits, g, r0, nr, sO, sML, W, TC_HEADS, D);
#if ATTNRT_DECODE_TIMELINE
    __syncthreads();
    TL_MARK(5);
#endif
}

#define ATTNRT_DECODE(TY, NAME, L, RP, KB)                                                   \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) decode_##NAME##_l##L##_r##RP( \
        DecodeParams p) {                                                                    \
        decode<TY, L, RP, KB>(p);                                                            \
    }
#define ATTNRT_DECODE_L(TY, NAME, L)  \
    ATTNRT_DECODE(TY, NAME, L, 1, 4) \
    ATTNRT_DECODE(TY, NAME, L, 2, 4) \
    ATTNRT_DECODE(TY, NAME, L, 4, 4) \
    ATTNRT_DECODE(TY, NAME, L, 8, 2)
#define ATTNRT_DECODE_ALL(TY, NAME)                                                   \
    ATTNRT_DECODE_L(TY, NAME, 8)                                                     \
    ATTNRT_DECODE_L(TY, NAME, 16)                                                    \
    ATTNRT_DECODE_L(TY, NAME, 32)

ATTNRT_DECODE_ALL(float, f32)
ATTNRT_DECODE_ALL(__nv_bfloat16, bf16)
ATTNRT_DECODE_ALL(__half, f16)

#define ATTNRT_DECODE_TC(TY, NAME, D, W, S)                                          \
    extern "C" __global__ void __launch_bounds__(W * 32)                             \
        decode_tc_##NAME##_d##D##_w##W##_s##S(DecodeParams p) {                      \
        decode_tc<TY, D, W, S>(p);                                                   \
    }
// 4 warps x 2 stages (DECODE_TC_WARPS / DECODE_TC_STAGES in src/plan.rs): on an H200, 32 x
// 8192 and 1 x 32768 keys (head_dim 128) ran within 1% of the best of 1 to 8 warps and 2 to 4
// stages, with the least shared memory of the fastest.
#define ATTNRT_DECODE_TC_ALL(TY, NAME)     \
    ATTNRT_DECODE_TC(TY, NAME, 64, 4, 2)  \
    ATTNRT_DECODE_TC(TY, NAME, 96, 4, 2)  \
    ATTNRT_DECODE_TC(TY, NAME, 128, 4, 2) \
    ATTNRT_DECODE_TC(TY, NAME, 256, 4, 2)
ATTNRT_DECODE_TC_ALL(__nv_bfloat16, bf16)
ATTNRT_DECODE_TC_ALL(__half, f16)
