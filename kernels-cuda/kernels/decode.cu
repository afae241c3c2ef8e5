// Attention of new tokens over the paged KV cache (issue 7, flash-decoding).
//
// Cache layout (runtime/src/kv/mod.rs): block b holds, for KV head g, `block_size` token slots;
// slot i of head g starts at element ((b * KV + g) * block_size + i) * D of the K pool (and of
// the V pool). A sequence names its blocks in a table; logical key j lives in slot
// s = j (or j mod capacity for a rolling cache) of block table[s / block_size].
//
// Three kernels:
//   kv_append_<t>      writes the new tokens' k and v (RoPE applied) into their slots;
//   decode_<t>_l<L>_r<R>  one CTA per (work item, KV head, chunk of R query heads): a work item
//                      is one new token and one split (a range of keys it sees); the CTA reads
//                      each K/V element of the split once for the R query heads of the KV head
//                      (GQA packing) and writes their partial softmax state (max and sum in the
//                      log2 domain, unnormalised output);
//   decode_merge_<t>   one CTA per (new token, query head): combines the token's splits in a
//                      fixed order (split 0, 1, ...) and stores the output.
//
// Inside a decode CTA, L lanes hold one key row (8 elements each), so a warp reads 32 / L keys
// at a time; every group of L lanes keeps its own online-softmax state over the keys it read,
// with no cross-group reduction inside the loop; the groups are combined in shared memory at
// the end.
#include "common.cuh"

struct DecodeParams {
    const void* q;          // [n, H * D] new tokens' queries (RoPE applied), storage type
    const void* k;          // K pool
    const void* v;          // V pool
    const int4* work;       // [items] (token, sequence, first key, one past the last key)
    const unsigned* tables; // block tables of the call's sequences, concatenated
    const int2* seqs;       // [sequences] (offset of the table in `tables`, capacity in slots)
    float* part;            // [items, H, D] unnormalised partial outputs
    float2* ml;             // [items, H] (running max, sum), log2 domain
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

// Element offset of logical key j of sequence (table, cap) for KV head g, slot 0 of the row.
__device__ __forceinline__ size_t key_offset(const DecodeParams& p, const unsigned* table, int cap,
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
    size_t b = table[blk];
    return ((b * p.n_kv_head + g) * p.block_size + slot) * (size_t)p.head_dim;
}

#define DEC_THREADS 128

template <typename T, int L, int RP, int KB>
__device__ __forceinline__ void decode(const DecodeParams& p) {
    constexpr int NG = DEC_THREADS / L;  // key groups per CTA
    constexpr int DW = L * 8;            // row width the groups cover
    __shared__ float s_o[NG * RP * DW];
    __shared__ float2 s_ml[NG * RP];

    const int item = blockIdx.x, g = blockIdx.y, r0 = blockIdx.z * RP;
    const int tid = threadIdx.x, gl = tid % L, grp = tid / L;
    const int D = p.head_dim, H = p.n_head;
    const int nr = min(RP, p.group - r0);
    const int4 w = __ldg(&p.work[item]);
    const int token = w.x, lo = w.z, hi = w.w;
    const int2 sq = __ldg(&p.seqs[w.y]);
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
    for (int idx = tid; idx < nr * D; idx += DEC_THREADS) {
        const int r = idx / D, d = idx - r * D;
        float M = ATTNRT_NEG_INF;
        for (int k = 0; k < NG; ++k) M = fmaxf(M, s_ml[k * RP + r].x);
        float Ls = 0.0f, Os = 0.0f;
        for (int k = 0; k < NG; ++k) {
            const float2 ml = s_ml[k * RP + r];
            const float sc = ml.x == ATTNRT_NEG_INF ? 0.0f : exp2f(ml.x - M);
            Ls = fmaf(ml.y, sc, Ls);
            Os = fmaf(s_o[(k * RP + r) * DW + d], sc, Os);
        }
        const int h = g * p.group + r0 + r;
        const size_t row = (size_t)item * H + h;
        p.part[row * D + d] = Os;
        if (d == 0) p.ml[row] = make_float2(M, Ls);
    }
}

struct MergeParams {
    const float* part;   // [items, H, D]
    const float2* ml;    // [items, H]
    const int* tok_items;  // [n + 1] first work item of each new token
    void* o;             // [n, H * D] storage type
    int n_head;
    int head_dim;
};

// One CTA per (new token, query head): out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s.
template <typename T>
__device__ __forceinline__ void merge(const MergeParams& p) {
    const int token = blockIdx.x, h = blockIdx.y, D = p.head_dim, H = p.n_head;
    const int i0 = p.tok_items[token], i1 = p.tok_items[token + 1];
    float M = ATTNRT_NEG_INF;
    for (int i = i0; i < i1; ++i) M = fmaxf(M, p.ml[(size_t)i * H + h].x);
    T* out = reinterpret_cast<T*>(p.o) + ((size_t)token * H + h) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float Ls = 0.0f, Os = 0.0f;
        for (int i = i0; i < i1; ++i) {
            const size_t row = (size_t)i * H + h;
            const float2 ml = p.ml[row];
            const float sc = ml.x == ATTNRT_NEG_INF ? 0.0f : exp2f(ml.x - M);
            Ls = fmaf(ml.y, sc, Ls);
            Os = fmaf(p.part[row * D + d], sc, Os);
        }
        out[d] = from_f32<T>(Ls > 0.0f ? Os / Ls : 0.0f);
    }
}

struct AppendParams {
    const void* k;            // [n, KV * D] new keys, storage type
    const void* v;
    void* kpool;
    void* vpool;
    const long long* dst;     // [n] element offset of (block, head 0, slot) / D
    int n_kv_head;
    int head_dim;
    int block_size;
};

// One CTA per (new token, KV head).
template <typename T>
__device__ __forceinline__ void append(const AppendParams& p) {
    const int t = blockIdx.x, g = blockIdx.y, D = p.head_dim;
    const size_t src = ((size_t)t * p.n_kv_head + g) * D;
    const size_t dst = ((size_t)p.dst[t] + (size_t)g * p.block_size) * D;
    const T* k = reinterpret_cast<const T*>(p.k);
    const T* v = reinterpret_cast<const T*>(p.v);
    T* kp = reinterpret_cast<T*>(p.kpool);
    T* vp = reinterpret_cast<T*>(p.vpool);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        kp[dst + d] = k[src + d];
        vp[dst + d] = v[src + d];
    }
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
    ATTNRT_DECODE_L(TY, NAME, 32)                                                    \
    extern "C" __global__ void decode_merge_##NAME(MergeParams p) { merge<TY>(p); } \
    extern "C" __global__ void kv_append_##NAME(AppendParams p) { append<TY>(p); }

ATTNRT_DECODE_ALL(float, f32)
ATTNRT_DECODE_ALL(__nv_bfloat16, bf16)
ATTNRT_DECODE_ALL(__half, f16)
