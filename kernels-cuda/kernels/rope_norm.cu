// The steps between the projections and attention (SPEC.md steps 1-5 after the GEMM), fused
// into one pass per token and part (q, k, v): bias, QK RMSNorm (full or per head), rotary
// embedding (interleaved or half-split, from a cos/sin table), and the store of q, k, v in the
// attention's storage type (k and v of a cached call straight into the KV cache). Plus the
// small element-wise kernels of the executor (bias on the output, f32 -> storage conversion,
// storage -> f32 widening of a reduced output).
//
// Full QK-norm in a head split across devices takes two passes: `qkv_sumsq` writes each
// token's sums of squares over this device's q (and k) heads, the caller sums them across the
// devices (an all-reduce of 2 floats per token), and `qkv_prep` then normalises with those
// global sums (`stats`) instead of computing them over its own heads. On one device `stats` is
// null and `qkv_prep` is the single fused pass.
#include "common.cuh"

struct PrepParams {
    const float* qkv;       // [B*T, H*D + 2*KV*D]: the fused projection, f32
    const float* bias;      // [H*D + 2*KV*D] or null (absent biases are zeros)
    const float* q_norm;    // [D] or [H*D], or null
    const float* k_norm;    // [D] or [KV*D], or null
    const float* cs;        // rotary cos/sin rows [*, D] ((cos, sin) pairs), or null
    const int* cs_rows;     // [B*T] row of `cs` for each token, or null (row = token % cs_period)
    void* q;                // [B*T, H*D] storage type
    void* k;                // [B*T, KV*D]
    void* v;                // [B*T, KV*D]
    const float* stats;     // full QK-norm across devices: [2 * tokens] global sums of squares
                            // (q sums, then k sums), or null (sums over this row's heads)
    int cs_period;          // T when the rows are the positions 0..T, B*T when gathered per token
    int n_head;
    int n_kv_head;
    int head_dim;
    int full_norm;          // 1: RMSNorm over the whole projected row; 0: per head
    int half_split;         // rotary convention: 1 half-split, 0 interleaved
    float eps;
    int tokens;             // with `stats`: tokens of the call (offset of the k sums)
    int q_width;            // with `stats`: the unsplit q row's width (divisor of the q mean)
    int k_width;            // with `stats`: the unsplit k row's width
    // A cached call's append, fused: with `dst`, k and v go straight into the KV cache's
    // pools (row (dst[token] + head * block_size) of `kpool` / `vpool`) instead of `k` / `v`.
    void* kpool;
    void* vpool;
    const long long* dst;   // [B*T] pool row of (block, head 0, slot) of each new token, or null
    int block_size;
};

__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.0f;
    return warp_sum(t);
}

// One part (q or k) of one token: n heads of D values at `src`, into `dst` (head h's row at
// dst + h * hstride). With `gsum` (full QK-norm across devices), the token's global sum of
// squares and `gwidth` its divisor.
template <typename T>
__device__ void prep_part(const PrepParams& p, float* buf, float* red, const float* src,
                          const float* bias, const float* norm, const float* cs, T* dst,
                          size_t hstride, int n, const float* gsum, int gwidth) {
    const int D = p.head_dim, len = n * D;
    const int tid = threadIdx.x, nt = blockDim.x;
    const int lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    for (int i = tid; i < len; i += nt) buf[i] = src[i] + (bias ? bias[i] : 0.0f);
    __syncthreads();
    if (norm) {
        if (p.full_norm) {
            float ss, width;
            if (gsum) {  // uniform across the block: no divergence around block_sum
                ss = *gsum;
                width = (float)gwidth;
            } else {
                ss = 0.0f;
                for (int i = tid; i < len; i += nt) ss += buf[i] * buf[i];
                ss = block_sum(ss, red);
                width = (float)len;
            }
            const float inv = 1.0f / sqrtf(ss / width + p.eps);
            for (int i = tid; i < len; i += nt) buf[i] = buf[i] * inv * norm[i];
        } else {
            for (int h = warp; h < n; h += nw) {
                float* z = buf + h * D;
                float ss = 0.0f;
                for (int d = lane; d < D; d += 32) ss += z[d] * z[d];
                ss = warp_sum(ss);
                const float inv = 1.0f / sqrtf(ss / (float)D + p.eps);
                for (int d = lane; d < D; d += 32) z[d] = z[d] * inv * norm[d];
            }
        }
        __syncthreads();
    }
    if (cs) {
        const int half = D / 2;
        for (int pi = tid; pi < n * half; pi += nt) {
            const int h = pi / half, i = pi - h * half;
            const int a = p.half_split ? i : 2 * i;
            const int bb = p.half_split ? i + half : 2 * i + 1;
            const float c = cs[2 * i], s = cs[2 * i + 1];
            const float x = buf[h * D + a], y = buf[h * D + bb];
            dst[h * hstride + a] = from_f32<T>(x * c - y * s);
            dst[h * hstride + bb] = from_f32<T>(x * s + y * c);
        }
    } else {
        for (int i = tid; i < len; i += nt) {
            const int h = i / D;
            dst[h * hstride + (i - h * D)] = from_f32<T>(buf[i]);
        }
    }
}

// Grid: (B*T tokens, 3 parts: q, k, v), so that a decode step's few tokens still fill a
// few dozen SMs and the parts' dependent load-normalise-store chains run side by side;
// dynamic shared memory: max(H, KV) * D floats.
template <typename T>
__device__ void qkv_prep(const PrepParams& p) {
    extern __shared__ float prep_smem[];
    __shared__ float red[32];
    const int token = blockIdx.x, part = blockIdx.y;
    const int D = p.head_dim;
    const int qd = p.n_head * D, kvd = p.n_kv_head * D, width = qd + 2 * kvd;
    const float* row = p.qkv + (size_t)token * width;
    const float* bias = p.bias;
    const float* cs = nullptr;  // the token's rotary (cos, sin) row
    if (p.cs) cs = p.cs + (size_t)(p.cs_rows ? p.cs_rows[token] : token % p.cs_period) * D;
    if (part == 0) {
        const float* qs = p.stats ? p.stats + token : nullptr;
        prep_part<T>(p, prep_smem, red, row, bias, p.q_norm, cs, (T*)p.q + (size_t)token * qd,
                     D, p.n_head, qs, p.q_width);
        return;
    }
    // k and v: this token's rows in the pools (a cached call), else in the k / v buffers.
    const bool pooled = p.dst != nullptr;
    const size_t hstride = pooled ? (size_t)p.block_size * D : (size_t)D;
    const size_t base = pooled ? (size_t)p.dst[token] * D : (size_t)token * kvd;
    if (part == 1) {
        const float* ks = p.stats ? p.stats + p.tokens + token : nullptr;
        T* k = (T*)(pooled ? p.kpool : p.k) + base;
        prep_part<T>(p, prep_smem, red, row + qd, bias ? bias + qd : nullptr, p.k_norm, cs, k,
                     hstride, p.n_kv_head, ks, p.k_width);
        return;
    }
    T* v = (T*)(pooled ? p.vpool : p.v) + base;
    for (int i = threadIdx.x; i < kvd; i += blockDim.x) {
        const int h = i / D;
        v[h * hstride + (i - h * D)] =
            from_f32<T>(row[qd + kvd + i] + (bias ? bias[qd + kvd + i] : 0.0f));
    }
}

extern "C" __global__ void __launch_bounds__(256) qkv_prep_f32(PrepParams p) { qkv_prep<float>(p); }
extern "C" __global__ void __launch_bounds__(256) qkv_prep_bf16(PrepParams p) { qkv_prep<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(256) qkv_prep_f16(PrepParams p) { qkv_prep<__half>(p); }

// Full QK-norm across devices, first pass: token t's sum of squares of (projection + bias)
// over this device's q heads into stats[t] and over its k heads into stats[tokens + t] (0 when
// the device does not count its k heads: a KV head replicated on several devices counts on
// the first of them only). Grid: one CTA per token.
struct SumsqParams {
    const float* qkv;  // [tokens, q_dim + 2 kv_dim], f32
    const float* bias; // [q_dim + 2 kv_dim] or null
    float* stats;      // [2 * tokens]
    int tokens;
    int q_dim;
    int kv_dim;
    int count_k;
};
extern "C" __global__ void __launch_bounds__(256) qkv_sumsq(SumsqParams p) {
    __shared__ float red[32];
    const int token = blockIdx.x;
    const float* row = p.qkv + (size_t)token * (p.q_dim + 2 * p.kv_dim);
    const int width = p.q_dim + (p.count_k ? p.kv_dim : 0);
    float sq = 0.0f, sk = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float v = row[i] + (p.bias ? p.bias[i] : 0.0f);
        if (i < p.q_dim) sq += v * v;
        else sk += v * v;
    }
    sq = block_sum(sq, red);
    sk = block_sum(sk, red);
    if (threadIdx.x == 0) {
        p.stats[token] = sq;
        p.stats[p.tokens + token] = sk;
    }
}

// y[r, c] += bias[c] over rows x cols.
struct BiasParams {
    float* y;
    const float* bias;
    long long rows;
    int cols;
};
extern "C" __global__ void add_bias_f32(BiasParams p) {
    long long n = p.rows * (long long)p.cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        p.y[i] += p.bias[i % p.cols];
}

// f32 -> storage type, n elements. Eight per thread and step where both ends are 16-byte
// aligned (two 16-byte loads, one 16-byte store): one element per thread left this
// memory-bound pass at a fraction of the bandwidth.
struct ConvertParams {
    const float* in;
    void* out;
    long long n;
};
template <typename T>
__device__ void convert(const ConvertParams& p) {
    T* out = (T*)p.out;
    long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    long long vec = ((((uintptr_t)p.in | (uintptr_t)p.out) & 15) == 0) ? p.n / 8 : 0;
    for (long long i = first; i < vec; i += stride) {
        float4 a = ((const float4*)p.in)[2 * i];
        float4 b = ((const float4*)p.in)[2 * i + 1];
        alignas(16) T h[8] = {from_f32<T>(a.x), from_f32<T>(a.y), from_f32<T>(a.z),
                              from_f32<T>(a.w), from_f32<T>(b.x), from_f32<T>(b.y),
                              from_f32<T>(b.z), from_f32<T>(b.w)};
        ((uint4*)out)[i] = *(const uint4*)h;
    }
    for (long long i = vec * 8 + first; i < p.n; i += stride) out[i] = from_f32<T>(p.in[i]);
}
extern "C" __global__ void convert_f32_bf16(ConvertParams p) { convert<__nv_bfloat16>(p); }
extern "C" __global__ void convert_f32_f16(ConvertParams p) { convert<__half>(p); }

// dst[i] = src[i] for n 16-byte words, src in page-locked host memory mapped into the device's
// address space: a cached step's metadata upload as a kernel. In a replayed graph a copy-engine
// upload followed by a kernel cost about 10 us more than the copy itself (H200, CUPTI timeline);
// kernel-to-kernel edges cost well under one.
struct UploadParams {
    const uint4* src;
    uint4* dst;
    long long n;
};
extern "C" __global__ void upload_u4(UploadParams p) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.n; i += stride)
        p.dst[i] = p.src[i];
}

// out[i] = in[i] (storage type, widened) + bias[(col0 + i) mod cols] (or 0 without a bias) for
// n elements of [*, cols] rows starting at column col0: the output of a head split reduced in
// the storage type (all of it, or one device's part), back to f32 with the bias added once.
struct WidenParams {
    const void* in;
    float* out;
    const float* bias;
    long long n;
    int cols;
    int col0;
};
template <typename T>
__device__ void widen_bias(const WidenParams& p) {
    const T* in = (const T*)p.in;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.n;
         i += (long long)gridDim.x * blockDim.x)
        p.out[i] = to_f32(in[i]) + (p.bias ? p.bias[(p.col0 + i) % p.cols] : 0.0f);
}
extern "C" __global__ void widen_bias_bf16(WidenParams p) { widen_bias<__nv_bfloat16>(p); }
extern "C" __global__ void widen_bias_f16(WidenParams p) { widen_bias<__half>(p); }

// The head split's all-to-all puts each sender's block of attention output ([rows, width]
// contiguous) at its columns of the receiver's [rows, pitch] rows. A driver 2-D copy moves
// these narrow rows (a few KiB each) at well under the bandwidth of a plain kernel, so the
// blocks are copied here, PLACE_MAX per launch (blockIdx.y), in units of `unit` bytes (16 when
// every address, width and pitch allows it). Widths, column offsets and pitch are in units.
#define PLACE_MAX 8
struct PlaceParams {
    const void* src[PLACE_MAX];
    long long dst_col[PLACE_MAX];
    long long width[PLACE_MAX];
    void* dst;
    long long pitch;
    long long rows;
    int blocks;
    int unit;
};
template <typename U>
__device__ void place(const PlaceParams& p, int b) {
    const U* src = (const U*)p.src[b];
    U* dst = (U*)p.dst + p.dst_col[b];
    long long w = p.width[b];
    long long n = p.rows * w;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / w;
        dst[r * p.pitch + (i - r * w)] = src[i];
    }
}
extern "C" __global__ void __launch_bounds__(256) place_blocks(PlaceParams p) {
    int b = blockIdx.y;
    if (b >= p.blocks) return;
    switch (p.unit) {
        case 16: place<uint4>(p, b); break;
        case 8: place<uint2>(p, b); break;
        case 4: place<unsigned>(p, b); break;
        case 2: place<unsigned short>(p, b); break;
        default: place<unsigned char>(p, b); break;
    }
}

// The f32 all-reduce of a head split's small outputs (decode steps), without NCCL: every
// device reads every device's partial output from its memory (peer access, NVLink) and sums
// them in rank order, so that every device gets the same bits (for two devices, the bits of
// NCCL's sum). A collective of a few hundred KiB is latency-bound; this costs one launch and
// one flag exchange instead of NCCL's protocol (about 20 us on H100).
//
// Arrival: each device's first CTA writes the step's epoch into its slot of every peer's
// flag array (release, system scope: the partial, written by earlier kernels of its stream,
// is visible to the peers first); every CTA waits until every peer's slot of its own flags
// holds the epoch (acquire). The epoch is this device's step counter + 1; the last CTA to
// finish stores it back. The host synchronises every device between steps, so a device
// never runs ahead into the next step while a peer still reads its partial. A peer that never
// arrives (its call failed before its launch) traps the kernel after 10 s instead of hanging.
#define PEER_MAX 8
struct PeerSumParams {
    const float* src[PEER_MAX];  // every rank's partial output (peer addresses)
    unsigned* flags[PEER_MAX];   // every rank's flag array, PEER_MAX slots
    float* dst;                  // this rank's output (not any rank's partial)
    unsigned* counter;           // this rank's [step counter, CTAs finished]
    long long n;                 // f32 elements
    int ranks;
    int rank;
    int vec4;                    // every address 16-byte aligned and n % 4 == 0
};
__device__ __forceinline__ void st_release_sys(unsigned* p, unsigned v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ unsigned ld_acquire_sys(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
extern "C" __global__ void __launch_bounds__(256) peer_sum_f32(PeerSumParams p) {
    __shared__ unsigned epoch;
    if (threadIdx.x == 0) {
        unsigned e = *(volatile unsigned*)p.counter + 1u;
        epoch = e;
        if (blockIdx.x == 0) {
            __threadfence_system();
            for (int r = 0; r < p.ranks; ++r)
                if (r != p.rank) st_release_sys(p.flags[r] + p.rank, e);
        }
        const unsigned* mine = p.flags[p.rank];
        unsigned long long t0 = global_ns();
        for (int r = 0; r < p.ranks; ++r) {
            if (r == p.rank) continue;
            while ((int)(ld_acquire_sys(mine + r) - e) < 0) {
                if (global_ns() - t0 > 10000000000ull) __trap();
            }
        }
    }
    __syncthreads();
    long long stride = (long long)gridDim.x * blockDim.x;
    long long i0 = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (p.vec4) {
        long long n4 = p.n / 4;
        for (long long i = i0; i < n4; i += stride) {
            float4 acc = __ldcg((const float4*)p.src[0] + i);
            for (int r = 1; r < p.ranks; ++r) {
                float4 v = __ldcg((const float4*)p.src[r] + i);
                acc.x += v.x;
                acc.y += v.y;
                acc.z += v.z;
                acc.w += v.w;
            }
            ((float4*)p.dst)[i] = acc;
        }
    } else {
        for (long long i = i0; i < p.n; i += stride) {
            float acc = __ldcg(p.src[0] + i);
            for (int r = 1; r < p.ranks; ++r) acc += __ldcg(p.src[r] + i);
            p.dst[i] = acc;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(p.counter + 1, 1u) == gridDim.x - 1) {
            p.counter[1] = 0;
            *(volatile unsigned*)p.counter = epoch;
        }
    }
}
